"""`--resume` continues a run with the settings it was started with, not silently with others.

On resume the recipe and overrides are compared with the run's config.yaml. Keys that only say how long to
run, how often to save or log, and where the figures go may change (SAFE_ON_RESUME); any other difference
is an error naming each key with its old and new value, unless `--allow-changes` is given. Every change
that goes through, safe or allowed, is recorded in config.yaml under `changes:` (key, old, new, and the
first step trained with the new value), so config.yaml says what the run actually used:

    changes:
    - {key: optim.lr, old: 0.001, new: 0.0001, from_step: 51}

`changes:` is history, not a setting: a recipe that has one (config.yaml used as a recipe) is read without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ponder.config import build, to_dict
from ponder.errors import UserError
from ponder.files import write_atomic

# keys that change neither what a step computes nor what the run is: how long (with a cosine or linear schedule,
# train.steps is also the schedule's length: the rates from the resume on follow the new length), how often, where
# figures go. And
# how a GRPO run is laid out over processes (torchrun): every checkpoint loads into every train.sharding, on any
# number of ranks (sharded/ through torch.distributed.checkpoint; an unsharded one is split as it loads)
SAFE_ON_RESUME = {
    "train": ("train.steps", "train.save_every", "train.keep_last", "train.log_samples", "guardrails.non_finite.max_nan_steps",
              "train.threads", "train.log_to", "eval.every", "train.sharding", "train.collective_timeout"),
    "sft": ("train.steps", "train.epochs", "train.save_every", "train.keep_last", "train.log_samples",
            "train.sample_max_new_tokens", "train.max_nan_steps", "train.threads", "train.log_to",
            "optim.token_budget"),  # SFT: how many tokens a micro-batch holds, the same gradient
}
LOCATION = ("name", "output_dir")
# keys that decide the shapes of the saved adapters and optimizer state: no resume can change them
SHAPES = ("model.lora", "model.lora.r", "model.lora.target_modules")


def add_arguments(parser, kind: str) -> None:
    """--resume and --allow-changes for a command whose runs resume (`kind`: a key of SAFE_ON_RESUME)."""
    parser.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint, exactly")
    parser.add_argument("--allow-changes", action="store_true",
                        help="with --resume: continue with settings that differ from the run's config.yaml (each change "
                        "is recorded there with the step it applies from); without it only "
                        + ", ".join(SAFE_ON_RESUME[kind]) + " may change")  # they say where the run is, so they match by construction
CHANGES_KEY = "changes"


@dataclass
class ResumeChanges:
    """What a resume changes, to record in config.yaml once the trainer has written it."""

    previous: list = field(default_factory=list)  # the `changes:` of earlier resumes
    changed: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, old, new)

    def describe(self) -> str:
        return describe(self.changed)


def describe(changed: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {_fmt(o)} -> {_fmt(n)}" for k, o, n in changed)


def check(cfg, command: str, allow_changes: bool) -> ResumeChanges:
    """Compare `cfg` with the run's config.yaml; raise for changes that are not safe unless allowed."""
    from ponder.checkpoint import latest, saved_config

    path = cfg.run_dir / "config.yaml"
    saved = load_saved(path)
    if saved is None:  # deleted or damaged: the newest checkpoint keeps the settings it was written with
        last = latest(cfg.run_dir / "checkpoints")
        saved = saved_config(last) if last is not None else None
        if saved is None:
            return ResumeChanges()
        path = last / "trainer_state.pt"
    refuse_other_kind(cfg.run_dir, saved, command)
    previous = saved.pop(CHANGES_KEY, None) or []
    previous = previous if isinstance(previous, list) else []  # (a hand-edited `changes: 5` was a traceback)
    saved = as_today(saved, type(cfg), command) or saved  # (a key since removed: compare what is there)
    changed = diff(saved, to_dict(cfg))
    edited = hand_edits(cfg, saved, previous, command) if path.name == "config.yaml" else []
    if edited:  # their old value is the one trained with; one the run's overrides change again counts once
        changed = [c for c in changed if c[0] not in {k for k, _, _ in edited}] + edited
    shapes = [(k, o, n) for k, o, n in changed if k in SHAPES]
    if shapes:
        raise UserError(f"--resume cannot change {describe(shapes)}: the run's saved adapters and optimizer state have "
                        "the shapes it started with; start a new run (another name=) with these settings")
    _refuse_fewer_steps(cfg)
    safe = SAFE_ON_RESUME[command]
    unsafe = [(k, o, n) for k, o, n in changed if k not in safe]
    if edited and not allow_changes and any(k not in safe for k, _, _ in edited):
        raise UserError(f"--resume: {path} differs from the settings its run's newest checkpoint was trained with, and "
                        f"no `changes:` entry records it (edited by hand?): {describe(edited)}; pass --allow-changes to "
                        "continue with them (config.yaml then records each change), or undo the edit")
    if unsafe and not allow_changes:
        raise UserError(f"--resume with settings that differ from the run's {path}: {describe(unsafe)}; pass --allow-changes "
                        "to continue with them (config.yaml records each change and the step it applies from), or "
                        f"leave them out. Safe to change on resume: {', '.join(safe)}")
    return ResumeChanges(previous if isinstance(previous, list) else [previous], changed)


def as_today(settings: dict, cls, command: str) -> dict | None:
    """A run's saved settings (its config.yaml or a checkpoint's copy, without `changes:`) as today's recipe reads
    them: a key that has moved since at its new place, keys added since filled in with their defaults. None where they
    no longer build (a key since removed)."""
    if command == "train":
        _move_key(settings, "train.max_nan_steps", "guardrails.non_finite.max_nan_steps")
    try:
        return to_dict(build(cls, settings))
    except UserError:
        return None


def hand_edits(cfg, saved: dict, previous: list, command: str) -> list[tuple[str, Any, Any]]:
    """Settings of the run's config.yaml (`saved`) that differ from those its newest checkpoint was trained with, where
    no `changes:` entry records the change: config.yaml edited by hand, which a resume naming the run's directory
    took as its recipe, and so compared with itself. (key, the checkpoint's value, the value the run would go on
    with); safe keys left out."""
    from ponder.checkpoint import latest, saved_config

    last = latest(cfg.run_dir / "checkpoints")
    written = saved_config(last) if last is not None else None
    if written is None:
        return []
    written.pop(CHANGES_KEY, None)
    written = as_today(written, type(cfg), command)
    if written is None:
        return []  # a key since removed: the run's own config.yaml is all there is to go by
    recorded = {(c.get("key"), json.dumps(_plain(c.get("new")))) for c in previous if isinstance(c, dict)}
    now, safe = _flatten(to_dict(cfg)), SAFE_ON_RESUME[command]
    return [(k, o, now.get(k, n)) for k, o, n in diff(_plain(written), _plain(saved))
            if k not in safe and (k, json.dumps(_plain(n))) not in recorded and not _same(o, now.get(k, n))]


def _refuse_fewer_steps(cfg) -> None:
    """train.steps below the step the run's newest checkpoint reached: nothing would run, and config.yaml would record
    a change from a step past the end (the bar read 10/3)."""
    from ponder.checkpoint import STEP_RE, latest

    last = latest(cfg.run_dir / "checkpoints")
    steps = getattr(getattr(cfg, "train", None), "steps", None)
    if last is None or steps is None:
        return
    reached = int(STEP_RE.match(last.name).group(1))
    if steps < reached:
        raise UserError(f"--resume: train.steps={steps} is below the step the run reached ({reached}); give "
                        f"train.steps={reached} or more to train on, or leave it out")


def recipe_of(command: str, recipe: str, overrides: list[str], resume: bool = True) -> tuple[str, list[str]]:
    """The recipe and overrides that `ponder <command> RECIPE [--resume]` runs with. With --resume, RECIPE may be the
    run's directory (`ponder sft --resume runs/x`): its config.yaml, with the directory where it is now (a run moved,
    or one named from another working directory, has another place than its config.yaml's relative output_dir).
    A run of another command, named by its directory or its config.yaml, is refused in one line here: read as
    this command's recipe it ended in an unknown key, or in a list of every setting as a change. A run's directory
    without --resume is told as one (it was a recipe 'not found', a directory that is there)."""
    p = Path(recipe)
    if p.is_dir():
        saved = load_saved(p / "config.yaml")
        if saved is None and (p / "config.yaml").is_file():  # there, but edited into something that is no recipe
            from ponder.config import read_recipe
            from ponder.files import read_user_text

            if not any(l.strip() and not l.lstrip().startswith("#") for l in read_user_text(p / "config.yaml").splitlines()):
                raise UserError(f"{p / 'config.yaml'} holds no settings; restore it, or resume with the recipe the run "
                                f"started from (`ponder {command} RECIPE --resume`)")
            read_recipe(p / "config.yaml")  # its own line: where the YAML breaks, or what it holds instead of settings
        if saved is None:
            raise UserError(f"'{recipe}' is a directory without a run's config.yaml; give a YAML recipe, or the directory "
                            f"of a `ponder {command}` run to resume")
        refuse_other_kind(p, saved, command)
        if not resume:
            raise UserError(f"'{recipe}' is a run directory, not a recipe; add --resume to continue the run "
                            f"(`ponder {command} {recipe} --resume`), or give a YAML recipe to start a new one")
        # quoted: a directory named 2024 or true is a name, not a number or a flag
        return str(p / "config.yaml"), [f"output_dir={json.dumps(str(p.parent))}", f"name={json.dumps(p.name)}", *overrides]
    if resume and not p.exists():  # else read_recipe's line, which names a recipe alone
        raise UserError(f"'{recipe}' not found; with --resume give the directory of a `ponder {command}` run "
                        "(runs/NAME) or the recipe it started from")
    if resume and p.name == "config.yaml" and (p.parent / "checkpoints").is_dir():  # a run's own config.yaml
        saved = load_saved(p)
        if saved is not None:
            refuse_other_kind(p.parent, saved, command)
    return recipe, overrides


def refuse_other_kind(run_dir: Path, saved: dict, command: str) -> None:
    kind = run_kind(saved)
    if kind is not None and kind != command:
        from ponder.checkpoint import latest, saved_config

        last = latest(Path(run_dir) / "checkpoints")
        written = saved_config(last) if last is not None else None
        if written is not None and run_kind(written) == command:  # config.yaml cut short: SFT's sections are GRPO's few
            lost = ", ".join(sorted(set(written) - set(saved) - {CHANGES_KEY}))
            raise UserError(f"{Path(run_dir) / 'config.yaml'} lacks sections of the `ponder {command}` run its checkpoints "
                            f"were trained by ({lost}): cut short? Restore it, or delete it and resume with the recipe "
                            f"the run started from (`ponder {command} RECIPE --resume`; {last.name} holds its settings)")
        where = run_dir if kind in SAFE_ON_RESUME else Path(run_dir) / "config.yaml"  # only these take a directory
        raise UserError(f"{run_dir} is a `ponder {kind}` run, not a `ponder {command}` one; resume it with "
                        f"`ponder {kind} {where} --resume`")


def run_kind(saved: dict) -> str | None:
    """The command whose run wrote this config.yaml, told by its top-level sections alone: each command's config.yaml
    holds every section of its own recipe, and SFT's sections are a subset of GRPO's, so it is the recipe with the
    fewest sections that has them all. None where none has. Not by building the recipe: a config.yaml is history as
    well as settings (`changes:`, a key moved or removed since it was written), which failed every build, and an
    undecided kind let any command resume the run, write its checkpoints into it and overwrite its config.yaml."""
    import dataclasses
    import importlib

    from ponder.config import RECIPE_CLASSES

    keys = set(saved) - {CHANGES_KEY}
    fits = []
    for command, (module, name) in RECIPE_CLASSES.items():
        sections = {f.name for f in dataclasses.fields(getattr(importlib.import_module(module), name))}
        if keys <= sections:
            fits.append((len(sections), command))
    return min(fits)[1] if keys and fits else None


def _move_key(data: dict, old: str, new: str) -> None:
    """A setting that has moved since the run started is read at its new place (a run's config.yaml is not a
    recipe the user wrote, so it gets no error for it)."""
    *head, last = old.split(".")
    node = data
    for part in head:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or last not in node:
        return
    value = node.pop(last)
    *head, last = new.split(".")
    node = data
    for part in head:
        node = node.setdefault(part, {})
    node.setdefault(last, value)


def record(run_dir: Path, changes: ResumeChanges, step: int) -> None:
    """Add the changes, applied from step `step + 1`, to the config.yaml the trainer has just written."""
    if not changes.previous and not changes.changed:
        return
    path = Path(run_dir) / "config.yaml"
    data = load_saved(path) or {}
    data.pop(CHANGES_KEY, None)
    new = [{"key": k, "old": _plain(o), "new": _plain(n), "from_step": step + 1} for k, o, n in changes.changed]
    data[CHANGES_KEY] = list(changes.previous) + new
    write_atomic(path, yaml.safe_dump(data, sort_keys=False))


def diff(old: dict, new: dict, lists: bool = False) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for each setting that differs. With `lists`, two lists of sections of the same length (tasks)
    are compared item by item, so a message says tasks[0].n 20 -> 30 rather than both whole lists."""
    out = []
    for key, o, n in _pairs(_flatten(old), _flatten(new)):
        if key.split(".")[0] in LOCATION or key.split(".")[0] == CHANGES_KEY:
            continue
        if lists and _sections(o) and _sections(n) and len(o) == len(n):
            for i, (x, y) in enumerate(zip(o, n)):
                out += [(f"{key}[{i}].{k}", p, q) for k, p, q in _pairs(_flatten(x), _flatten(y))]
        else:
            out.append((key, o, n))
    return out


def _pairs(a: dict, b: dict) -> list[tuple[str, Any, Any]]:
    """(key, old, new) of the flattened settings that differ, a missing one as None (so a section that is null on one
    side, as model.lora without LoRA, shows as its keys from or to null, not as `model.lora null -> null`)."""
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k), b.get(k)) for k in keys if not _same(a.get(k), b.get(k))]


def _sections(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_saved(path: Path) -> dict | None:
    """A run's config.yaml as a dict, or None where there is none (or it does not parse)."""
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):  # (bytes damaged on disk: a traceback)
        return None
    return data if isinstance(data, dict) else None


def _plain(v):
    return json.loads(json.dumps(v, default=str))


def _fmt(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)
