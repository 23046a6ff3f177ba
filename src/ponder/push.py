"""`ponder push RUN_DIR/checkpoints/step-N --repo user/name`: upload a checkpoint to the Hugging Face Hub.

What goes up: the checkpoint's model and tokenizer files (not trainer_state.pt, which only resumes the run),
a model card (README.md) that records how the model was made, the run's resolved recipe as recipe.yaml, and
the evaluation files the card's figures come from (eval_after.json, eval_before.json; eval_step-N.json for
a checkpoint evaluated during the run). `--dry-run OUT_DIR` writes exactly that folder and uploads nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import yaml

from ponder.errors import UserError

SKIP = {"trainer_state.pt"}  # what a checkpoint holds only to resume its run


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `push` on the `ponder` command's subparsers."""
    p = subparsers.add_parser(
        "push", help="upload a checkpoint to the Hugging Face Hub with a model card",
        description="Upload a run's checkpoint (model and tokenizer in Hugging Face format) to the Hugging Face Hub, "
        "with a model card recording the recipe, the run's held-out figures (eval_after.json, eval_before.json) and "
        "the command that made it. Log in first (`hf auth login` or HF_TOKEN, with write access).",
    )
    p.add_argument("checkpoint", help="a run's checkpoint folder, e.g. runs/zero-tiny/checkpoints/step-80")
    p.add_argument("--repo", required=True, help="the model repository to create or update: owner/name")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", metavar="OUT_DIR",
                   help="write the folder and model card that would be uploaded to OUT_DIR, and upload nothing")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    files = plan(args.checkpoint, args.repo)
    if args.dry_run:
        out = write_folder(files, Path(args.dry_run))
        print(f"dry run: wrote {len(files)} files to {out} (nothing uploaded); model card: {out / 'README.md'}")
        return 0
    url = upload(files, args.repo, private=args.private, message=f"ponder push {args.checkpoint}")
    print(f"pushed {args.checkpoint} to {url}")
    return 0


# ---------------------------------------------------------------------------------------------
# what goes up


def plan(checkpoint: str | Path, repo: str) -> dict[str, Path | str]:
    """{name in the repository: a file to copy (Path) or text} for a run's checkpoint."""
    from ponder.models import hub_id

    hub = hub_id(repo)
    if hub is None or hub.revision:
        raise UserError(f"--repo '{repo}' is not a Hub repository id; give owner/name (e.g. your-name/zero-tiny-grpo)")
    ckpt = Path(checkpoint).expanduser()
    if not ckpt.is_dir() or not (ckpt / "config.json").is_file():
        raise UserError(f"'{checkpoint}' is not a model checkpoint (a folder with config.json); "
                        f"give one like runs/NAME/checkpoints/step-N")
    ckpt = ckpt.resolve()  # runs/NAME/final is a link to checkpoints/step-N
    run_dir = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{checkpoint}' is not a checkpoint of a ponder run (no config.yaml in "
                        f"{run_dir if ckpt.parent.name == 'checkpoints' else ckpt.parent}); give RUN_DIR/checkpoints/step-N")
    check_finished(ckpt, checkpoint)
    check_complete(ckpt)
    config = run_dir / "config.yaml"
    try:
        recipe_text = config.read_text(encoding="utf-8")
        recipe = yaml.safe_load(recipe_text) or {}
    except UnicodeDecodeError:
        raise UserError(f"{config} is damaged (not UTF-8 text); restore it from the checkpoint's settings or a copy") from None
    except yaml.YAMLError as e:
        raise UserError(f"{config} is not valid YAML ({str(e).splitlines()[0]})") from None
    odd = "its top level" if not isinstance(recipe, dict) else next(
        (f"'{k}'" for k in ("model", "train", "data") if not isinstance(recipe.get(k) or {}, dict)), None)
    if odd:  # (the model card read them as sections: a traceback)
        raise UserError(f"{config} is not a ponder run's settings ({odd} must be a mapping, as ponder writes it); "
                        "restore it")

    files: dict[str, Path | str] = {p.name: p for p in sorted(ckpt.iterdir())
                                    if p.is_file() and p.name not in SKIP and not p.name.startswith(".")}
    files["recipe.yaml"] = recipe_text
    evals = {}
    for tag, name in (("before", "eval_before.json"), ("after", _after_file(ckpt, run_dir, recipe))):
        if name and (run_dir / name).is_file():
            try:
                evals[tag] = json.loads((run_dir / name).read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise UserError(f"{run_dir / name}: not valid JSON ({e.msg}); the run's evaluation file is damaged") from None
            except UnicodeDecodeError:
                raise UserError(f"{run_dir / name}: not UTF-8 text; the run's evaluation file is damaged") from None
            if not _evaluation(evals[tag]):  # (the card's table read it as one: a traceback)
                raise UserError(f"{run_dir / name} is not an evaluation ponder wrote (task names, each with its "
                                "'metrics' and 'settings' mappings); the run's evaluation file is damaged")
            files[name] = run_dir / name
    files["README.md"] = model_card(repo, ckpt, run_dir, recipe, evals.get("before"), evals.get("after"))
    return files


def _evaluation(data) -> bool:
    return isinstance(data, dict) and all(isinstance(r, dict) and isinstance(r.get("metrics"), dict)
                                          and isinstance(r.get("settings", {}), dict) for r in data.values())


def check_complete(ckpt: Path) -> None:
    """A checkpoint whose weights or tokenizer are gone or cut short (a disk's damage, a hand's deletion) went up as a
    model: the card and the config without what they describe."""
    from ponder.models import damaged_safetensors

    if not any(ckpt.glob("*.safetensors")):
        raise UserError(f"{ckpt} holds no weights (*.safetensors); push a complete checkpoint")
    bad = damaged_safetensors(ckpt)
    if bad is not None:
        raise UserError(f"{ckpt / bad[0]} is damaged ({bad[1][:80]}); push another checkpoint")
    if not any((ckpt / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{ckpt} holds no tokenizer (tokenizer.json); push a complete checkpoint")


def check_finished(ckpt: Path, given: str | Path) -> None:
    """Refuses a folder of checkpoints/ that is not a finished step-N: the temporary folder of a save that a kill
    interrupted (.tmp-step-N-PID, its weights possibly cut, no trainer_state.pt) was pushed as a checkpoint."""
    from ponder.checkpoint import STEP_RE, list_checkpoints

    if STEP_RE.match(ckpt.name) and (ckpt / "trainer_state.pt").is_file():
        return
    finished = ", ".join(p.name for p in list_checkpoints(ckpt.parent))
    raise UserError(f"'{given}' is not a finished checkpoint (a save that was interrupted leaves such a folder); push "
                    + (f"one of {ckpt.parent}: {finished}" if finished else f"a finished step-N: {ckpt.parent} holds none"))


def _after_file(ckpt: Path, run_dir: Path, recipe: dict) -> str | None:
    """The evaluation of this very checkpoint: eval_after.json for the run's last step, eval_step-N.json for a
    step evaluated during the run, else None."""
    from ponder.checkpoint import STEP_RE, latest

    m = STEP_RE.match(ckpt.name)
    steps = (recipe.get("train") or {}).get("steps")
    last = m is not None and (int(m.group(1)) == steps if isinstance(steps, int) else latest(ckpt.parent) == ckpt)
    if last:
        return "eval_after.json"
    return f"eval_{ckpt.name}.json" if m is not None else None


def command(recipe: dict) -> str:
    """The command that repeats the run from the recipe uploaded beside the model."""
    return f"ponder {'train' if 'rollout' in recipe or 'algorithm' in recipe else 'sft'} recipe.yaml"


def model_card(repo: str, ckpt: Path, run_dir: Path, recipe: dict, before: dict | None, after: dict | None) -> str:
    from ponder import __version__
    from ponder.models import hub_id

    model = recipe.get("model") or {}
    base = str(model.get("path", "?"))
    kind = "GRPO (`ponder train`)" if command(recipe).startswith("ponder train") else "supervised fine-tuning (`ponder sft`)"
    steps = (recipe.get("train") or {}).get("steps")
    head = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            "tags: [ponder, reasoning, " + ("grpo, rlvr]" if "GRPO" in kind else "sft]")]
    if hub_id(base) is not None and not Path(base).expanduser().is_dir():
        head.append(f"base_model: {hub_id(base).repo_id}")
    head += ["---", ""]
    lines = [
        f"# {repo}", "",
        f"Trained from `{base}` by {kind} with ponder {__version__}: run `{recipe.get('name', run_dir.name)}`, "
        f"checkpoint `{ckpt.name}`" + (f" of {steps} steps." if isinstance(steps, int) else "."), "",
        "## Evaluation", "",
    ]
    if after is None and before is None:
        lines += ["No held-out evaluation of this checkpoint was recorded in the run (give the recipe `eval.tasks`).", ""]
    else:
        lines += figures_table(before, after, base, ckpt.name)
        settings = next(iter((after or before).values()), {}).get("settings", {})
        cuts = "".join(f", {key.replace('_', '-')} {settings[key]}" for key in ("top_k", "min_p") if settings.get(key))
        lines += ["", "Measured by the run itself on held-out problems (`eval_before.json`, `eval_after.json`): pass@1 is "
                  f"the mean correctness over k={settings.get('k')} samples per problem at temperature "
                  f"{settings.get('temperature')}, top-p {settings.get('top_p')}{cuts}, at most {settings.get('max_new_tokens')} "
                  f"new tokens, `{settings.get('template')}` template; 95% CI by bootstrap over problems.", ""]
        if after is None:
            lines += [f"Only the starting model's figures were recorded; `{ckpt.name}` itself was not evaluated.", ""]
    lines += [
        "## How it was made", "",
        "```bash", command(recipe), "```", "",
        "`recipe.yaml` (in this repository) is the run's resolved recipe: the recipe it was started from with every "
        "command-line override applied. The same command with the same seed repeats the run (add `output_dir=DIR` "
        "or `name=NAME` to write it elsewhere).", "",
        "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", "",
        "## Use", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
        "```", "",
        f"or with ponder: `ponder eval --model {repo} --tasks ...`; prompts use the `{(recipe.get('data') or {}).get('template', '?')}` "
        "template (ponder.templates).", "",
    ]
    return "\n".join(head + lines).rstrip() + "\n"


def figures_table(before: dict | None, after: dict | None, base: str, step: str) -> list[str]:
    """Markdown rows: task, figure, before (the starting model), after (this checkpoint)."""
    from ponder.evaluation.command import FIGURE_LABELS, _fmt, _ordered

    cols = [c for c, r in ((f"before (`{base}`)", before), (f"after (`{step}`)", after)) if r is not None]
    rows = [f"| task | figure | {' | '.join(cols)} |", "|---|---|" + "---:|" * len(cols)]
    results = [r for r in (before, after) if r is not None]
    for task in dict.fromkeys(t for r in results for t in r):
        figs = [r.get(task, {}).get("metrics", {}) for r in results]
        names = list(dict.fromkeys(f for m in figs for f in _ordered(m)))
        for i, name in enumerate(names):
            cells = [_fmt(name, m.get(name)) for m in figs]
            rows.append(f"| {task if i == 0 else ''} | {FIGURE_LABELS.get(name, name)} | {' | '.join(cells)} |")
    return rows


# ---------------------------------------------------------------------------------------------
# writing and uploading


def write_folder(files: dict[str, Path | str], out: Path) -> Path:
    """Write the folder that would be uploaded; refuses to write into a non-empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--dry-run: '{out}' already exists and is not an empty folder; give a new folder")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:  # (a folder under a file: a traceback)
        raise UserError(f"--dry-run: cannot make '{out}' ({e.strerror}); give a new folder") from None
    for name, src in files.items():
        if isinstance(src, Path):
            shutil.copyfile(src, tmp / name)
        else:
            (tmp / name).write_text(src, encoding="utf-8")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def upload(files: dict[str, Path | str], repo: str, *, private: bool, message: str) -> str:
    """Create the repository (if new) and upload the files in one commit; returns the repository's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from ponder.models import hub_offline

    if hub_offline():
        raise UserError("HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset it to push (or give --dry-run OUT_DIR)")
    if not get_token():
        raise UserError("not logged in to the Hugging Face Hub: run `hf auth login` or set HF_TOKEN (a token with write access)")
    api = HfApi()
    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(src) if isinstance(src, Path) else src.encode("utf-8"))
           for name, src in files.items()]
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.create_commit(repo, operations=ops, commit_message=message, repo_type="model")
    except HfHubHTTPError as e:
        raise UserError(f"push to '{repo}' failed: {str(e).splitlines()[0]}") from None
    except OSError as e:  # connection errors
        raise UserError(f"push to '{repo}' failed: the Hugging Face Hub cannot be reached ({e})") from None
    except Exception as e:  # httpx's network errors are not OSErrors
        if type(e).__module__.split(".")[0].startswith("httpx"):
            raise UserError(f"push to '{repo}' failed: the Hugging Face Hub cannot be reached ({e})") from None
        raise
    return str(url)
