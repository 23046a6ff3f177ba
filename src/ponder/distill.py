"""`ponder distill RECIPE`: teacher -> rejection sampling -> SFT of a student, as one resumable command.

Stages and what they leave in runs/<name>/:
  sample  traces.jsonl (+ .summary.json, .unsolved.txt), stages/sample.done
  sft     student/ (an SFT run directory: checkpoints, metrics, final), stages/sft.done
A stage whose marker exists is skipped under --resume; an interrupted SFT stage continues from its
last checkpoint. --resume refuses settings that differ from the run's config.yaml for a stage that has
begun (an interrupted stage may change what `ponder sample` and `ponder sft` let a resume change), so
config.yaml says what each stage used. `--stage sample|sft` runs one stage: `--stage sample`, then
`--stage sft` with the same recipe, trains the student on those traces (a later stage needs no --resume;
the settings of the stages before it may not change). Traces are text, so the teacher and the student may
use different tokenizers: the student's own tokenizer encodes them.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ponder.config import to_dict
from ponder.console import make_console
from ponder.errors import UserError
from ponder.files import make_dir, write_atomic
from ponder.runtime import dump_yaml
from ponder.sample import SampleConfig
from ponder.sft.config import SFTConfig

console = make_console()
STAGES = ("sample", "sft")


@dataclass
class DistillConfig:
    name: str = "distill"
    output_dir: str = "runs"
    seed: int = 0  # the seed of both stages (their own `seed` keys are set from it)
    sample: SampleConfig = field(default_factory=SampleConfig)  # `model` is the teacher; `out` is set by distill
    sft: SFTConfig = field(default_factory=SFTConfig)  # `model` is the student; the traces are added to data.files

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_distill_config(path, overrides=()) -> DistillConfig:
    from ponder.config import load_config
    from ponder.sample import check as check_sample
    from ponder.sft.config import check as check_sft

    cfg = load_config(path, list(overrides), cls=DistillConfig)
    run = cfg.run_dir
    _say_set_by_distill(cfg)
    cfg.sample.seed = cfg.sft.seed = cfg.seed
    cfg.sample.out = str(run / "traces.jsonl")
    cfg.sft.output_dir, cfg.sft.name = str(run), "student"
    if cfg.sample.out not in cfg.sft.data.files:
        cfg.sft.data.files = [cfg.sample.out, *cfg.sft.data.files]
    for section, check in (("sample", check_sample), ("sft", check_sft)):
        try:
            check(getattr(cfg, section))
        except UserError as e:  # the commands' own checks name their keys from their own top level
            msg = str(e)
            raise UserError(msg.replace("config ", f"config {section}.", 1) if msg.startswith("config ") else msg) from None
    return cfg


def _say_set_by_distill(cfg: DistillConfig) -> None:
    """A line for each key of the stages' own that distill sets, given a value it does not take (sample.out=x.jsonl
    went unused, unsaid). Those of a distill run's own config.yaml (another run's, as a recipe) are its settings."""
    from ponder.distributed import say_once

    own = Path(cfg.sample.out).name == "traces.jsonl" and cfg.sft.name == "student"
    for key, value, default, by in (("sample.out", cfg.sample.out, SampleConfig.out, "output_dir and name"),
                                    ("sft.output_dir", cfg.sft.output_dir, SFTConfig.output_dir, "output_dir and name"),
                                    ("sft.name", cfg.sft.name, SFTConfig.name, "output_dir and name"),
                                    ("sample.seed", cfg.sample.seed, SampleConfig.seed, "seed"),
                                    ("sft.seed", cfg.sft.seed, SFTConfig.seed, "seed")):
        seed = key.endswith(".seed")
        if not (value == default or (seed and value == cfg.seed) or (own and not seed)):
            say_once(f"ponder: {key}={value} is not taken: ponder distill sets it from {by} (the run's directory holds "
                     "the traces and the student); set those instead")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="teacher -> rejection sampling -> SFT of a student, resumable",
        description="Distil a teacher into a student from a YAML recipe with a `sample:` section (the teacher and "
        "the filters, keys of ponder.sample.SampleConfig) and an `sft:` section (the student, keys of "
        "ponder.sft.SFTConfig). Writes runs/<name>/: traces.jsonl, student/, stages/*.done.",
    )
    p.add_argument("recipe", help="YAML recipe (see recipes/distill-tiny.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. sample.k=16 sft.train.epochs=2")
    p.add_argument("--stage", choices=STAGES, help="run only this stage")
    p.add_argument("--resume", action="store_true", help="skip finished stages and continue an interrupted one")
    p.set_defaults(func=lambda a: distill(load_distill_config(a.recipe, a.overrides), stage=a.stage, resume=a.resume))


def marker(cfg: DistillConfig, stage: str) -> Path:
    return cfg.run_dir / "stages" / f"{stage}.done"


def distill(cfg: DistillConfig, stage: str | None = None, resume: bool = False, quiet: bool = False) -> dict:
    """Run the stages (or one); returns {stage: marker contents}."""
    run = cfg.run_dir
    done = {s: marker(cfg, s).is_file() for s in STAGES}
    traces = Path(cfg.sample.out)
    begun = {"sample": done["sample"] or traces.exists() or traces.with_name(traces.name + ".partial.json").is_file(),
             "sft": done["sft"] or (cfg.sft.run_dir / "checkpoints").is_dir()}
    stages = STAGES if stage is None else (stage,)
    # only a stage that is to run again needs --resume: `--stage sft` after `--stage sample` uses its traces (every
    # begun stage counted, and the documented two-step use was refused)
    if any(begun[s] for s in stages) and not resume:
        raise UserError(f"run directory {run} already holds distill stages; pass --resume to continue it, or choose another name (name=...)")
    if any(begun.values()):  # the traces (or the student) were made with the run's settings: they stay in config.yaml
        _refuse_changes(cfg, begun, done, "--resume" if resume else f"--stage {stage}")
    loaded = _check_before_sampling(cfg, [s for s in stages if not done[s]])
    make_dir(run, "output_dir/name")
    write_atomic(run / "config.yaml", dump_yaml(to_dict(cfg)))
    out = {}
    for s in stages:
        if done[s]:
            out[s] = _finished(marker(cfg, s))
            if not quiet:
                console.print(f"stage {s}: done earlier ({marker(cfg, s)}), skipped")
            continue
        # the sample stage takes the teacher's problems as the checks loaded them (a large dataset read once), and
        # lets them go before the student trains
        out[s] = STAGE_FNS[s](cfg, quiet, resume, **({"examples": loaded} if s == "sample" else {}))
        loaded = None
        marker(cfg, s).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker(cfg, s), json.dumps(out[s] | {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    return out


def _finished(path: Path) -> dict:
    """A finished stage's marker: what the stage wrote when it ended."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):  # (damaged bytes: a traceback)
        data = None
    if not isinstance(data, dict):
        raise UserError(f"{path} is damaged (not what the stage wrote when it finished); delete it to run the stage "
                        "again (with --resume), or restore it")
    return data


def _refuse_changes(cfg: DistillConfig, begun: dict, done: dict, flag: str) -> None:
    """A stage that has begun keeps the settings it began with: the traces and the student were made with them."""
    from ponder.config import build
    from ponder.resume import SAFE_ON_RESUME, describe, diff, load_saved

    path = cfg.run_dir / "config.yaml"
    saved = load_saved(path)
    if saved is None:  # (a damaged one was passed over, then rewritten with whatever settings were given)
        raise UserError(f"{flag}: {path} is missing or damaged, so the settings the run's stages began with are unknown; "
                        "restore it, or choose another name (name=...) to start a new run")
    try:  # keys added to ponder since the run started take their defaults
        saved = to_dict(build(DistillConfig, saved))
    except UserError:
        pass
    # an interrupted stage takes what its own command's resume takes (where and how fast for sampling; SFT's safe
    # keys, which the student's config.yaml records); a finished one takes nothing, as nothing more runs with it
    safe = set() if done["sample"] else {"sample.threads", "sample.device"}
    safe |= set() if done["sft"] else {f"sft.{k}" for k in SAFE_ON_RESUME["sft"]}
    refused = [(k, o, n) for k, o, n in diff(saved, to_dict(cfg), lists=True) if k not in safe
               and any(begun[s] for s in (STAGES if k.split(".")[0] == "seed" else (k.split(".")[0],)))]
    if refused:
        raise UserError(f"{flag} with settings that differ from the run's {path}: {describe(refused)}; the stages "
                        "begun used the old ones, so leave these out to continue the run, or choose another name "
                        "(name=...) to start a new one")


def _check_before_sampling(cfg: DistillConfig, stages: list[str]) -> list[list[dict]] | None:
    """What the stages to run need and can be checked in a moment, checked before the sampling takes its time. The
    examples of sample.tasks, loaded to check them (None where the sample stage does not run)."""
    from ponder.metrics import require_backends
    from ponder.models import check_loadable, resolve
    from ponder.runtime import pick_device
    from ponder.tasks import load_examples, tasks_named_by
    from ponder.templates import TEMPLATES

    loaded = None
    if "sample" in stages:
        resolve(cfg.sample.model)
        with tasks_named_by("sample.tasks"):  # loaded as the stage loads them: a path or option missing, too
            loaded = [load_examples(spec, cfg.sample.seed) for spec in cfg.sample.tasks]
    if "sft" in stages:
        check_loadable(cfg.sft.model.path)
        if cfg.sft.data.template not in (*TEMPLATES, "chat"):
            raise UserError(f"config sft.data.template: unknown template '{cfg.sft.data.template}'; choose one of: "
                            f"{', '.join([*TEMPLATES, 'chat'])}")
        for f in cfg.sft.data.files:
            if f != cfg.sample.out and not Path(f).is_file():
                raise UserError(f"config sft.data.files: '{f}' not found; give an existing JSONL file or leave it out")
        require_backends(cfg.sft.train.log_to, "sft.train.log_to")
        if cfg.sft.train.device == "cuda":  # only then: pick_device would start CUDA here under "auto"
            with _sft_key("train.device"):
                pick_device(cfg.sft.train.device)
        _check_sft_inputs(cfg)
        if cfg.sft.model.lora is not None:
            with _sft_key("model.lora"):
                _check_lora_targets(cfg.sft.model)
    return loaded


@contextlib.contextmanager
def _sft_key(key: str, *also: str):
    """The sft command's own checks name its keys from its top level (model.lora.r), or none (a task's options);
    in a distill recipe the key to edit is sft.<key>: renamed where the message names it, else put in front."""
    try:
        yield
    except UserError as e:
        msg, named = str(e), 0
        for k in (key, *also):  # not inside a longer key or a path (a file named my.data.files.jsonl)
            msg, n = re.subn(rf"(?<![\w./]){re.escape(k)}", f"sft.{k}", msg)
            named += n
        raise UserError(msg if named else f"config sft.{key}: {msg}") from None


def _check_sft_inputs(cfg: DistillConfig) -> None:
    """What the SFT stage reads before the student's weights, less the traces, read as it reads them: the rows of
    its other data files and its cold-start traces, one of each shape under the template (ponder.sft.data.read_data,
    in its parts), and its eval tasks' examples with one prompt of each shape under the template (as `ponder train`
    checks its eval tasks at start). The SFT stage evaluates only once it has loaded the student."""
    from ponder.models import load_tokenizer
    from ponder.sft.coldstart import coldstart_rows
    from ponder.sft.data import check_template, read_rows
    from ponder.tasks import check_prompts, load_examples
    from ponder.templates import require_chat_template, with_chat_options

    s, d = cfg.sft, cfg.sft.data
    rows = read_rows([f for f in d.files if f != cfg.sample.out])  # its errors name the file and line
    for i, spec in enumerate(d.coldstart):
        with _sft_key(f"data.coldstart[{i}]", "data.coldstart"):
            rows += coldstart_rows(spec, s.seed)  # procedural problems: a moment
    with _sft_key("data.template", "data.add_eos"):
        tokenizer = check_template(rows, s) if rows else None  # the student's tokenizer, which loads in a moment
        chat = None
        if d.template == "chat":
            chat = tokenizer or with_chat_options(load_tokenizer(s.model.path, s.model.trust_remote_code),
                                                  s.model.chat_template_kwargs)
            require_chat_template(chat)
    for i, spec in enumerate(s.eval.tasks):
        with _sft_key(f"eval.tasks[{i}]"):
            check_prompts(load_examples(spec, s.seed), d.template, chat)


def _check_lora_targets(m) -> None:
    """model.lora's checks of models.load_trainable, on the student built from its config alone (no weights, a
    moment: positions.weightless)."""
    from ponder.models import check_lora_targets, require_peft
    from ponder.positions import weightless

    require_peft()  # also where the student's config is not at hand
    model = weightless(m.path, m.trust_remote_code)
    if model is not None:  # else no config at hand (a Hub model not downloaded yet): the SFT stage's loading checks
        check_lora_targets(model, m.lora)


def _sample_stage(cfg: DistillConfig, quiet: bool, resume: bool, examples: list[list[dict]] | None = None) -> dict:
    from ponder.sample import sample
    from ponder.tasks import tasks_named_by

    if not quiet:
        console.rule(f"stage sample: teacher {cfg.sample.model}")
    with tasks_named_by("sample.tasks"):
        summary = sample(cfg.sample, progress=not quiet, resume=resume, examples=examples)  # an interrupted one continues
    if summary["accepted"] == 0:
        # the empty traces.jsonl would make the next attempt, with looser settings, a resume of this one
        Path(cfg.sample.out).unlink()
        raise UserError(f"no teacher answer passed the filters (see {Path(cfg.sample.out).with_suffix('.summary.json')}); "
                        "raise sample.k or sample.max_new_tokens, or loosen sample.filters")
    return {"traces": cfg.sample.out, "accepted": summary["accepted"], "unsolved_prompts": summary["unsolved_prompts"]}


def _sft_stage(cfg: DistillConfig, quiet: bool, resume: bool) -> dict:
    from ponder import checkpoint
    from ponder.sft import sft

    if not marker(cfg, "sample").is_file():
        traces = Path(cfg.sample.out)
        if traces.exists() or traces.with_name(traces.name + ".partial.json").is_file():  # begun, never marked done
            raise UserError(f"stage sft needs the teacher's traces, and the sample stage in {cfg.run_dir} did not finish: "
                            "continue it with `ponder distill ... --stage sample --resume`")
        raise UserError(f"stage sft needs the teacher's traces: run `ponder distill ... --stage sample` first ({marker(cfg, 'sample')} is missing)")
    if not quiet:
        console.rule(f"stage sft: student {cfg.sft.model.path}")
    ckpts = cfg.sft.run_dir / "checkpoints"
    trainer = sft(cfg.sft, resume=checkpoint.latest(ckpts) is not None, quiet=quiet)
    return {"student": str(cfg.sft.run_dir / "final"), "steps": trainer.step_no}


STAGE_FNS = {"sample": _sample_stage, "sft": _sft_stage}
