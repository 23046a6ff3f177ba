"""`ponder eval`: evaluate a model on tasks and write results.json and samples.jsonl; or compare results."""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

from ponder.errors import UserError
from ponder.files import blocked, blocking_file, check_writable, make_dir, read_user_text, write_atomic
from ponder.metrics import DEFAULT_REFLECTION_WORDS
from ponder.templates import with_chat_options

PASS_K = re.compile(r"pass@[0-9]{1,9}")  # as ponder eval names them: another (a hand-edited pass@3x) is not shown
FIGURE_LABELS = {
    "problems": "problems", "scored_problems": "scored (gold parses)", "pass@1": "pass@1", "pass@1_ci": "pass@1 95% CI",
    "greedy": "greedy",
    "mean_score": "mean score", "answer_rate": "answered", "format_rate": "format", "mean_length": "length (tokens)",
    "truncation_rate": "truncated", "reflection_rate": "reflection", "mixing_rate": "language mixing",
}


def _json_object(text: str) -> dict:
    """--chat-template-kwargs: a JSON object, else argparse's one line naming the option."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object; give one, e.g. '{{\"enable_thinking\": false}}'")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on the `ponder` command's subparsers; the parsed args' `func(args)` runs it."""
    p = subparsers.add_parser(
        "eval", help="evaluate a model: pass@1 over k samples, cons@k, pass@k",
        description="Sample k answers per problem and report pass@1 (mean over k, bootstrap 95% CI), cons@k and "
        "pass@k, scored by the tasks' own verifiers. Or lay earlier results side by side with --compare.",
    )
    p.add_argument("--model", help="Hugging Face model directory, Hub id owner/name[@revision] or built-in name (tiny-random, tiny-base)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model run its own code (custom Hub architectures)")
    p.add_argument("--tasks", help="comma-separated task names; NAME:PATH for file-based tasks (jsonl:my.jsonl, gsm8k:test.jsonl), "
                   "reasoning_gym:DATASET")
    p.add_argument("--k", type=int, default=16, help="samples per problem (default 16)")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens less likely than this share of the most likely one (default 0: off)")
    p.add_argument("--max-tokens", type=int, default=1024, help="token budget per answer (default 1024)")
    p.add_argument("--greedy", action="store_true", help="also report the accuracy of one greedy answer per problem")
    p.add_argument("--split", default="test", help="task split (default test)")
    p.add_argument("--n", type=int, default=None, help="problems per task (default: the task's own)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option for every task, repeatable")
    p.add_argument("--template", default="r1_zero", help="prompt template: r1_zero, plain or chat")
    p.add_argument("--chat-template-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='options of the chat template (--template chat), e.g. \'{"enable_thinking": false}\' for Qwen3')
    p.add_argument("--extract", default="tags_or_boxed", help="answer extraction: tags_or_boxed, tags, boxed or none")
    p.add_argument("--stop", nargs="*", default=["</answer>"], metavar="TEXT",
                   help="stop strings, kept in the answer (default: </answer>; --stop alone: none, as a recipe's empty rollout.stop)")
    p.add_argument("--reflection-words", default=",".join(DEFAULT_REFLECTION_WORDS),
                   help="comma-separated words whose presence counts as reflection (default: %(default)s)")
    p.add_argument("--engine", default="fast",
                   help="rollout engine: fast (default; falls back to hf for architectures it does not support) or hf")
    p.add_argument("--batch-size", type=int, default=256,
                   help="sequences generated at once (default 256); the answers depend on it, as on the seed")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    p.add_argument("--data-seed", type=int, default=0,
                   help="seed of procedural tasks' problems (default 0; a training run's evaluation uses the run's seed)")
    p.add_argument("--out", help="output directory (default runs/eval/<model>-<timestamp>)")
    p.add_argument("--compare", nargs="+", metavar="RESULT", help="result directories or results.json files to show side by side")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ponder.tasks import tasks_named_by

    with tasks_named_by("flags"):  # a task's error gives its fix as --tasks and --option
        return _run(args)


def _run(args) -> int:
    if args.compare:
        paths = [f for r in args.compare for f in _result_files(r)]
        results = [load_result(r) for r in paths]
        _console().print(compare_table(results, [_label(r) for r in paths]))
        if _different_problems(results):
            _console().print("note: the results were computed on different problem sets (task hashes differ)", style="yellow")
        return 0
    if not args.model or not args.tasks:
        raise UserError("ponder eval needs --model and --tasks (e.g. --model tiny-base --tasks arithmetic), or --compare A B")
    from ponder.config import MAX_EXAMPLES
    from ponder.rewards.extract import MODES

    # what can be checked now is, rather than after every problem has been sampled
    if args.extract not in MODES:
        raise UserError(f"--extract '{args.extract}' is not an answer extraction mode; choose one of: {', '.join(MODES)}")
    for flag, ok, allowed in (("--k", args.k >= 1, "at least 1"), ("--temperature", args.temperature >= 0, "0 or more"),
                              ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
                              ("--top-k", args.top_k >= 0, "0 (off) or more"),
                              ("--min-p", 0 <= args.min_p < 1, "in [0, 1) (0: off)"),
                              ("--max-tokens", args.max_tokens is None or args.max_tokens >= 1, "at least 1"),
                              ("--n", args.n is None or 1 <= args.n <= MAX_EXAMPLES,
                               f"at least 1 and at most {MAX_EXAMPLES:,} (or left out: the task's default)"),
                              ("--stop", all(args.stop), "non-empty strings (an empty one ends every answer at once)")):
        if not ok:
            from ponder.config import shown

            raise UserError(f"{flag} must be {allowed}; got {shown(getattr(args, flag[2:].replace('-', '_')))}")
    out = Path(args.out) if args.out else Path("runs/eval") / f"{Path(args.model).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if blocking_file(out) is not None:  # before the model loads
        raise blocked(out, "--out")
    for name in ("results.json", "samples.jsonl"):
        if (out / name).exists():
            raise UserError(f"{out / name} already exists; choose another --out, or delete it to evaluate again")
    check_writable(out, "--out")  # not after every problem is sampled
    import torch

    from ponder.evaluation.runner import evaluate
    from ponder.rollout import engine_keys
    from ponder import models, positions
    from ponder.tasks import check_prompts, load_examples

    labelled = parse_tasks(args.tasks, split=args.split, n=args.n, options=parse_options(args.option))
    examples = []
    for name, spec in labelled:
        rows = load_examples(spec, seed=args.data_seed)
        if name != spec.name:  # report `jsonl:a.jsonl` and `jsonl:b.jsonl` apart
            rows = [dict(ex, eval_group=name) for ex in rows]
        examples += rows
    # prompts under the template before the model loads (minutes for a large one); the tokenizer loads in a moment
    tokenizer = functools.cache(lambda: with_chat_options(models.load_tokenizer(args.model, args.trust_remote_code),
                                                          args.chat_template_kwargs))
    chat = tokenizer() if args.template == "chat" else None
    for notice in check_prompts(examples, args.template, chat):
        print(notice, file=sys.stderr)
    prompt_sets = [(examples, args.max_tokens, "--max-tokens")]
    unchecked = positions.check_before_loading(prompt_sets, args.template, args.model, args.trust_remote_code, tokenizer)
    device = _device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    loaded = tokenizer() if tokenizer.cache_info().currsize else None
    model, tokenizer = models.load(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code, tokenizer=loaded)
    with_chat_options(tokenizer, args.chat_template_kwargs)
    positions.check_loaded(unchecked, args.template, model, tokenizer)
    model.to(device)
    with engine_keys("--max-tokens", "--k, --batch-size"):  # (the engine's lines named its own max_tokens and n)
        result = evaluate(
            model, tokenizer, examples, template=args.template, k=args.k, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, min_p=args.min_p, max_new_tokens=args.max_tokens, engine=args.engine, greedy=args.greedy,
            seed=args.seed, stop=tuple(args.stop), progress=not args.quiet, extract=args.extract,
            batch_size=args.batch_size, reflection_words=[w.strip() for w in args.reflection_words.split(",") if w.strip()],
        )
    samples = result.pop("samples")
    head = {
        "model": args.model, "model_path": _model_path(args.model), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "task_specs": [{"label": label, "name": s.name, "path": s.path, "split": s.split, "n": s.n, "options": s.options}
                       for label, s in labelled],
        "data_seed": args.data_seed, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
    }
    result = head | result
    write_results(out, result, samples)
    console = _console()
    console.print(compare_table([result], [Path(args.model).name]))
    console.print(f"wrote {out / 'results.json'} and {out / 'samples.jsonl'}", soft_wrap=True)
    return 0


def _model_path(name: str) -> str:
    """Where the weights came from: the directory, or for a Hub id the cached snapshot (named by its commit)."""
    from ponder.models import HubModel, hub_snapshot, resolve

    where = resolve(name)
    return str((hub_snapshot(where) or where) if isinstance(where, HubModel) else where)


def parse_tasks(text: str, *, split: str, n: int | None, options: dict) -> list:
    """(label, TaskSpec) per comma-separated item: NAME, NAME:PATH for file tasks, reasoning_gym:DATASET."""
    from ponder.config import TaskSpec

    specs, seen = [], set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item in seen:
            raise UserError(f"task '{item}' is named twice in --tasks; name it once")
        seen.add(item)
        name, _, arg = item.partition(":")
        if arg and name != "reasoning_gym" and not _registered(name):  # one's own (file.py:fn), as a recipe names it
            name, arg = item, ""
        spec = TaskSpec(name=name, n=n, split=split, options=dict(options))
        if arg and name == "reasoning_gym":
            spec.options["dataset"] = arg
        elif arg:
            spec.path = arg
        specs.append((item, spec))
    if not specs:
        raise UserError("--tasks names no task; give e.g. --tasks first_digit or --tasks jsonl:my.jsonl")
    return specs


def _registered(name: str) -> bool:
    from ponder.tasks import TASKS, get_task

    try:  # imports the built-in tasks, which register themselves
        get_task(name)
    except UserError:
        pass
    return name in TASKS


def parse_options(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--option '{item}' is not KEY=VALUE; e.g. --option digit=3")
        out[key] = yaml.safe_load(value)
    return out


def write_results(out: Path, result: dict, samples: list[dict]) -> None:
    """results.json (figures and settings) and samples.jsonl (every answer), each written whole or not at all."""
    make_dir(out, "--out")
    write_atomic(out / "results.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def load_result(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise UserError(f"no results at '{path}'; give a directory written by ponder eval or its results.json")
    try:
        result = json.loads(read_user_text(p))
    except ValueError as e:  # (a number past int()'s 4,300 digits is a ValueError of its own)
        why = e.msg if isinstance(e, json.JSONDecodeError) else "a number of more than 4,300 digits"
        raise UserError(f"{p}: not valid JSON ({why}); give a results.json written by ponder eval") from None
    if isinstance(result, dict) and result and "tasks" not in result and all(
            isinstance(v, dict) and "metrics" in v for v in result.values()):
        return _run_result(result, f"{p.parent.name}/{p.stem}", p)
    if not isinstance(result, dict) or "tasks" not in result:
        raise UserError(f"{p} has no 'tasks' figures; give a results.json written by ponder eval, or a run's "
                        "eval_before.json / eval_after.json")
    _check_shape(result, p)
    return result


def _check_shape(result: dict, path: Path, where: str = "") -> None:
    """The nesting that --compare reads, or one line naming the file and the key. The rule for a hand-edited file:
    a shape other than ponder eval's is this error; a figure in it that is no number (or a CI no pair of numbers) is
    shown as "-", as a figure the result lacks, and a figure name ponder eval does not write is not shown."""
    tasks, hashes = result.get("tasks"), result.get("task_hashes", {})
    for key, ok, what in (
            ("metrics", isinstance(result.get("metrics", {}), dict), "a mapping of figure names to values"),
            ("tasks", isinstance(tasks, dict) and all(isinstance(f, dict) for f in tasks.values()),
             "a mapping of task names to figures"),
            ("settings", isinstance(result.get("settings", {}), dict), "a mapping of sampling settings"),
            ("task_hashes", isinstance(hashes, dict) and all(isinstance(h, str) for h in hashes.values()),
             "a mapping of task names to hashes"),
            ("task_hash", isinstance(result.get("task_hash", ""), str), "a hash (text)")):
        if not ok:
            raise UserError(f"{path}: '{key}'{where} must be {what}, as ponder eval writes it; give a results.json "
                            "written by ponder eval, or a run's eval_before.json / eval_after.json")


def _run_result(result: dict, model: str, path: Path) -> dict:
    """A run's eval_<tag>.json as ponder eval's results.json: the run keys a result per task set "name/split",
    ponder eval its figures by task name. Keyed as written, a run's figures and ponder eval's on the same weights
    (the same numbers, docs/evaluation.md) fell in rows of their own, and without a hash per task every such
    comparison was "on different problem sets". So each task is keyed by its name (with its split only where
    the run evaluates one name on two splits), with its own problems' hash."""
    rows = []  # (task, split, figures, hash of its problems)
    for key, r in result.items():
        split = key.rpartition("/")[2]
        inner = r.get("tasks") or {key: r["metrics"]}
        _check_shape(r | {"tasks": inner}, path, f" of '{key}'")
        hashes = r.get("task_hashes") or ({next(iter(inner)): r.get("task_hash")} if len(inner) == 1 else {})
        rows += [(name, split, figs, hashes.get(name)) for name, figs in inner.items()]
    names = Counter(name for name, *_ in rows)
    keys = [name if names[name] == 1 else f"{name}/{split}" for name, split, *_ in rows]
    first = next(iter(result.values()))
    return {"model": model, "settings": first.get("settings", {}), "tasks": {k: row[2] for k, row in zip(keys, rows)},
            "task_hashes": {k: row[3] for k, row in zip(keys, rows) if row[3]}}


def _result_files(path: str) -> list[str]:
    """What one --compare argument names: a run directory (no results.json) is its before and after evaluations."""
    p = Path(path)
    if p.is_dir() and (p / "student" / "config.yaml").is_file() and (p / "stages").is_dir():  # a distill run: its student's
        p = p / "student"
    if p.is_dir() and not (p / "results.json").exists():
        files = [str(p / name) for name in ("eval_before.json", "eval_after.json") if (p / name).is_file()]
        if not files and (p / "config.yaml").is_file():  # a training run's directory
            raise UserError(_unevaluated_run(p))
        return files or [str(p)]  # neither: load_result names the problem
    return [path]


def _unevaluated_run(run: Path) -> str:
    """Why a training run has no eval_before.json / eval_after.json to compare, and what to compare instead."""
    from ponder import checkpoint
    from ponder.resume import load_saved

    evaluation = (load_saved(run / "config.yaml") or {}).get("eval")
    why = ("it evaluated nothing (its eval.tasks is empty)" if not (isinstance(evaluation, dict) and evaluation.get("tasks"))
           else "its evaluation before the first step was never written (stopped before it?)")
    model = checkpoint.latest(run / "checkpoints") or run / "checkpoints" / "step-N"
    return (f"'{run}' is a training run without eval_before.json / eval_after.json: {why}; evaluate one of its "
            f"checkpoints with `ponder eval --model {model} --tasks ...` and compare that, or give a directory written by "
            "ponder eval")


def _different_problems(results: list[dict]) -> bool:
    """Whether one task's figures come from different problems: per task where the results say (task_hashes, or
    the hash of a result of one task), else by the hash of each result's whole problem set."""
    per_task, whole = {}, set()
    for r in results:
        hashes = r.get("task_hashes") or ({next(iter(r["tasks"])): r.get("task_hash")} if len(r["tasks"]) == 1 else None)
        if hashes is None:  # an older results.json of several tasks
            whole.add(r.get("task_hash"))
            continue
        for task, h in hashes.items():
            per_task.setdefault(task, set()).add(h)
    return len(whole) > 1 or any(len(h) > 1 for h in per_task.values())


def compare_table(results: list[dict], labels: list[str]):
    """One row per task and figure, one column per result."""
    from rich.table import Table

    table = Table(title="evaluation" if len(results) == 1 else "evaluation: side by side")
    table.add_column("task")
    table.add_column("figure")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_row("", "model", *[str(r.get("model", "-")) for r in results])
    table.add_row("", "sampling", *[_settings(r.get("settings", {})) for r in results], end_section=True)
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    for t in tasks:
        names = list(dict.fromkeys(f for r in results for f in _ordered(r["tasks"].get(t, {}))))
        for i, name in enumerate(names):
            cells = [_fmt(name, r["tasks"].get(t, {}).get(name)) for r in results]
            table.add_row(t if i == 0 else "", FIGURE_LABELS.get(name, name), *cells, end_section=i == len(names) - 1)
    return table


def _ordered(figs: dict) -> list[str]:
    order = ["problems"]
    if figs.get("scored_problems", figs.get("problems")) != figs.get("problems"):
        order.append("scored_problems")  # shown where some gold did not parse
    order += ["pass@1", "pass@1_ci"]
    order += [f for f in figs if f.startswith("cons@")]
    order += sorted((f for f in figs if PASS_K.fullmatch(f) and f not in order), key=lambda f: int(f[5:]))
    order += ["greedy", "mean_score", "answer_rate", "format_rate", "mean_length", "truncation_rate", "reflection_rate", "mixing_rate"]
    return [f for f in order if f in figs]


def _fmt(name: str, value) -> str:
    if name == "pass@1_ci":
        pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_number, value))
        return f"[{value[0]:.3f}, {value[1]:.3f}]" if pair else "-"
    if not _number(value):  # missing, or not a figure (see _check_shape)
        return "-"
    if name in ("problems", "scored_problems"):
        return str(value)
    if name == "mean_length":
        return f"{value:.1f}"
    return f"{value:.3f}"


def _number(value) -> bool:
    """An int or float, not true/false nor an integer past a float's range (whose format overflows)."""
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and abs(value) <= sys.float_info.max)


def _settings(s: dict) -> str:
    if not s:
        return "-"
    cuts = "".join(f" {key}={s[key]}" for key in ("top_k", "min_p") if s.get(key))
    return f"k={s.get('k')} T={s.get('temperature')} p={s.get('top_p')}{cuts} max={s.get('max_new_tokens')}"


def _label(path: str) -> str:
    p = Path(path)
    if p.name == "results.json":
        return p.parent.name
    # a run's eval_after.json: with its run's name, as two runs' files would share one
    return f"{p.parent.name}/{p.stem}" if p.suffix == ".json" else p.name


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}, but {torch.cuda.device_count()} CUDA GPUs are visible (cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1})")
        # the current GPU: Triton launches and CUDA graph captures go to the current GPU, not the tensors' own
        torch.cuda.set_device(device)
    return device


def _console():
    from rich.console import Console

    return Console(width=max(100, Console().width), markup=False)  # model and run names are text, not styles


def main(argv: list[str] | None = None) -> int:
    """`python -m ponder.evaluate ...`: the eval command on its own."""
    parser = argparse.ArgumentParser(prog="ponder")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
