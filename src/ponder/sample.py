"""`ponder sample`: rejection sampling. k answers per prompt, scored by the tasks' verifiers and the
filters of ponder.filters; the accepted ones are written as JSONL that `ponder sft` trains on.

Each accepted row: prompt, completion, answer, task, prompt_id, sample (index among the k), tokens,
rewards (accuracy, format, language, repetition), source (model and sampling settings), meta (the
example's other fields). Beside the output: <out>.summary.json (per-task acceptance and rejections by
filter) and <out>.unsolved.txt (ids of prompts with no accepted answer, one a line).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ponder.config import TaskSpec, to_dict
from ponder.evaluation.runner import task_hash
from ponder.errors import UserError
from ponder.filters import ORDER, Candidate, FilterConfig, check_config, select
from ponder.files import blocking_file, check_writable, make_dir, write_atomic


@dataclass
class SampleConfig:
    model: str = "tiny-base"  # the model that writes the traces (teacher): a directory, built-in name or Hub id
    trust_remote_code: bool = False  # let the model run its own code (Hub models with custom architectures)
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # the chat template's options (Qwen3: enable_thinking)
    tasks: list[TaskSpec] = field(default_factory=lambda: [TaskSpec(name="arithmetic")])
    template: str = "r1_zero"
    k: int = 8  # answers sampled per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    extract: str = "tags_or_boxed"  # how the answer is found for the correctness check (ponder.rewards.extract)
    engine: str = "fast"  # fast (default; falls back to hf for architectures it does not support) or hf
    batch_size: int = 256  # sequences generated at once
    seed: int = 0  # fixes the problems of procedural tasks and the sampling
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0
    filters: FilterConfig = field(default_factory=FilterConfig)
    out: str = "runs/samples/traces.jsonl"


def load_sample_config(path, overrides=()) -> SampleConfig:
    from ponder.config import load_config

    cfg = load_config(path, list(overrides), cls=SampleConfig)
    check(cfg)
    return cfg


def check(cfg: SampleConfig) -> None:
    if cfg.k < 1:
        raise UserError(f"config k must be at least 1 (answers per prompt); got {cfg.k}")
    if not cfg.tasks:
        raise UserError("config tasks is empty; name at least one task, e.g. --tasks arithmetic")
    from ponder.config import check_sampling, check_tasks, need, need_seed, need_threads
    from ponder.rewards.extract import MODES

    need_threads(cfg.threads, "threads")
    need_seed(cfg.seed)
    need(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "at least 1 (sequences generated at once)")
    need(bool(str(cfg.out).strip()), "out", cfg.out, "a file to write, e.g. traces.jsonl")
    check_tasks("tasks", cfg.tasks)
    check_sampling("", cfg.temperature, cfg.top_p, cfg.max_new_tokens, stop=cfg.stop, top_k=cfg.top_k, min_p=cfg.min_p)

    if cfg.extract not in MODES:  # found out only when the first answers are scored otherwise
        raise UserError(f"config extract: unknown answer extraction mode '{cfg.extract}'; choose one of: {', '.join(MODES)}")
    check_config(cfg.filters)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="rejection sampling: k answers per prompt, keep the verified ones as SFT data",
        description="Sample k answers per prompt from a model, keep those that pass the filters (correct answer, "
        "format, one language, no repeated phrases, length bounds, no duplicates, at most m per prompt) and write "
        "them as JSONL with provenance. Give a recipe (keys of ponder.sample.SampleConfig, as under `sample:` in "
        "recipes/distill-tiny.yaml) and/or flags; flags win over the recipe and key=value overrides.",
    )
    p.add_argument("args", nargs="*", metavar="RECIPE_OR_OVERRIDE", help="optional YAML recipe, then key=value overrides")
    p.add_argument("--model", help="model directory, built-in name or Hub id owner/name[@revision] (teacher)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model run its own code (custom Hub architectures)")
    p.add_argument("--tasks", help="comma-separated tasks: arithmetic,countdown; NAME:PATH for file tasks")
    p.add_argument("--split", help="task split (default train)")
    p.add_argument("--n", type=int, help="prompts per task")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option for every task, repeatable")
    p.add_argument("--k", type=int, help="answers per prompt (default 8)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--min-p", type=float, help="drop tokens less likely than this share of the most likely one (0: off)")
    p.add_argument("--max-tokens", type=int, help="token budget per answer")
    p.add_argument("--per-prompt", type=int, help="m: most answers kept per prompt (default 4; 0: no cap)")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output JSONL (default runs/samples/traces.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run with the same settings and --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> None:
    recipe = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(recipe) > 1:
        raise UserError(f"ponder sample takes one recipe, got {', '.join(recipe)}; give overrides as key=value")
    cfg = load_sample_config(recipe[0] if recipe else None, overrides)
    for flag, key in (("model", "model"), ("k", "k"), ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                      ("min_p", "min_p"), ("max_tokens", "max_new_tokens"), ("seed", "seed"), ("out", "out")):
        if getattr(args, flag) is not None:
            setattr(cfg, key, getattr(args, flag))
    if args.per_prompt is not None:
        cfg.filters.per_prompt = args.per_prompt
    if args.trust_remote_code:
        cfg.trust_remote_code = True
    if args.tasks:
        from ponder.evaluation.command import parse_options, parse_tasks

        cfg.tasks = [s for _, s in parse_tasks(args.tasks, split=args.split or "train", n=args.n, options=parse_options(args.option))]
    elif args.split or args.n is not None or args.option:
        for spec in cfg.tasks:
            spec.split = args.split or spec.split
            spec.n = args.n if args.n is not None else spec.n
            spec.options.update(_options(args.option))
    from ponder.tasks import tasks_named_by

    with tasks_named_by("flags" if args.tasks else "tasks"):  # a task's error names what this command line set
        check(cfg)
        sample(cfg, progress=not args.quiet, resume=args.resume)


def _options(items):
    from ponder.evaluation.command import parse_options

    return parse_options(items)


# ---------------------------------------------------------------------------------------------


def task_labels(specs: list[TaskSpec]) -> list[str]:
    names = [s.name for s in specs]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def sample(cfg: SampleConfig, progress: bool = True, model=None, tokenizer=None, resume: bool = False,
           examples: list[list[dict]] | None = None) -> dict:
    """Run rejection sampling; write the accepted rows, the summary and the unsolved ids. Returns the summary.

    Rows go to <out>.partial, and <out>.partial.json records after each chunk of prompts how far it got;
    with `resume`, an interrupted run with the same settings continues after its last finished chunk
    (chunks have their own seeds, so the result is the one an uninterrupted run writes), and a finished one
    is left as it is. Without `resume`, an existing output or interrupted run is an error, never overwritten;
    so is `resume` with settings other than the run's. `examples`: each task's examples, where the caller has loaded
    them already (ponder distill, to check them before the teacher loads)."""
    import torch

    from ponder import models, positions
    from ponder.rollout import SamplingParams, engine_keys, make_engine
    from ponder.runtime import pick_device, set_threads
    from ponder.tasks import check_prompts, load_examples
    from ponder.templates import encoded_prompt, with_chat_options

    check(cfg)
    out = Path(cfg.out)
    tmp, ledger = out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json")
    settings = _settings(cfg)
    earlier = _earlier_run(out, tmp, ledger, settings, resume)
    if out.exists():  # a finished run, to leave as it is (without `resume`, refused above)
        from ponder.console import make_console

        make_console().print(f"{out} is complete ({earlier['accepted']} answers); nothing to resume", soft_wrap=True)
        return earlier
    if cfg.threads:
        set_threads(cfg.threads, "threads")
    problems = []  # (label, prompt_id, example)
    if examples is None:
        examples = [load_examples(spec, cfg.seed) for spec in cfg.tasks]
    for label, spec, rows in zip(task_labels(cfg.tasks), cfg.tasks, examples, strict=True):
        for i, ex in enumerate(rows):
            # the label, not the name: two specs of one task (easy and hard arithmetic) number their problems apart
            problems.append((label, str(ex.get("id", f"{label}/{spec.split}/{i}")), ex))
    problems, repeats = first_of_each_prompt(problems)
    if repeats:
        print(f"ponder: sample: {repeats} problem(s) repeat an earlier one's prompt; each prompt is sampled once (its "
              f"first), so that the per-prompt cap and the duplicate filters hold per prompt", file=sys.stderr)
    problems_hash = task_hash(problems)
    if earlier and earlier.get("problems", problems_hash) != problems_hash:  # (ledgers of older versions do not say)
        raise UserError(f"--resume: the problems differ from those the interrupted run in {tmp} sampled (its task "
                        f"files or options changed since), so its rows and counts would not match them; restore them to "
                        f"continue it, or choose another --out, or delete {tmp} to sample afresh")
    if earlier and tmp.stat().st_size < earlier["bytes"]:
        raise UserError(f"--resume: {tmp} holds {tmp.stat().st_size} bytes where its ledger records {earlier['bytes']} (the "
                        f"machine stopped before the rows reached the disk); delete {tmp} and {ledger} to sample afresh")
    prompt_sets = [([ex for _, _, ex in problems], cfg.max_new_tokens, "max_new_tokens")]
    if model is None:
        # prompts under the template before the model loads (minutes for a large one); the tokenizer loads in a moment
        tokenizer = functools.cache(lambda: with_chat_options(models.load_tokenizer(cfg.model, cfg.trust_remote_code),
                                                              cfg.chat_template_kwargs))
        chat = tokenizer() if cfg.template == "chat" else None
        for notice in check_prompts(prompt_sets[0][0], cfg.template, chat):
            print(notice, file=sys.stderr)
        prompt_sets = positions.check_before_loading(prompt_sets, cfg.template, cfg.model, cfg.trust_remote_code, tokenizer)
        device = pick_device(cfg.device)
        loaded = tokenizer() if tokenizer.cache_info().currsize else None
        model, tokenizer = models.load(cfg.model, seed=cfg.seed, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                                       trust_remote_code=cfg.trust_remote_code, tokenizer=loaded)
        model.to(device)
    with_chat_options(tokenizer, cfg.chat_template_kwargs)
    positions.check_loaded(prompt_sets, cfg.template, model, tokenizer)
    engine = make_engine(cfg.engine, model, tokenizer, batch_size=cfg.batch_size)
    params = SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                            max_tokens=cfg.max_new_tokens, stop=tuple(cfg.stop))
    source = {"model": cfg.model, "template": cfg.template, "k": cfg.k, "temperature": cfg.temperature, "top_p": cfg.top_p,
              **{key: getattr(cfg, key) for key in ("top_k", "min_p") if getattr(cfg, key)},  # named where they cut
              "max_new_tokens": cfg.max_new_tokens, "stop": list(cfg.stop), "seed": cfg.seed}
    make_dir(out.parent, "--out")
    state = earlier or {"key": json.dumps(settings, sort_keys=True), "problems": problems_hash, "chunks": 0, "bytes": 0,
                        "unsolved": [], "counts": {
        label: {"prompts": 0, "samples": 0, "accepted": 0, "solved_prompts": 0, "rejected": dict.fromkeys(ORDER, 0)}
        for label in task_labels(cfg.tasks)}}
    counts, unsolved = state["counts"], state["unsolved"]
    per_chunk = max(1, cfg.batch_size // cfg.k)
    start = time.perf_counter()
    with _bar(progress, len(problems)) as (bar, task), tmp.open("a+" if state["chunks"] else "w", encoding="utf-8") as fh:
        fh.truncate(state["bytes"])  # rows written after the last recorded chunk are written again
        fh.seek(state["bytes"])
        if bar is not None:
            bar.advance(task, min(len(problems), state["chunks"] * per_chunk))
        for c, lo in enumerate(range(0, len(problems), per_chunk)):
            if c < state["chunks"]:
                continue
            chunk = problems[lo : lo + per_chunk]
            encoded = [encoded_prompt(cfg.template, ex["prompt"], tokenizer) for _, _, ex in chunk]
            ids = [e[0] for e in encoded]
            with torch.random.fork_rng(devices=[]):
                with engine_keys("max_new_tokens (--max-tokens)", "k, batch_size"):
                    outs = engine.generate(ids, replace(params, seed=(cfg.seed * 1_000_003 + c) % 2**31))
            for (label, pid, ex), row in zip(chunk, _judge(chunk, outs, tokenizer, cfg, [e[1] for e in encoded])):
                cands, kept = row
                n = counts[label]
                n["prompts"] += 1
                n["samples"] += len(cands)
                n["accepted"] += len(kept)
                n["solved_prompts"] += bool(kept)
                for cand in cands:
                    if cand.reason:
                        n["rejected"][cand.reason] = n["rejected"].get(cand.reason, 0) + 1  # (a ledger may predate a filter)
                if not kept:
                    unsolved.append(pid)
                for j, cand, rewards in kept:
                    fh.write(json.dumps(_row(ex, pid, j, cand, rewards, source), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # the rows on the disk before the ledger says so: a crash between would lose them
            now = time.perf_counter()
            state.update(chunks=c + 1, bytes=fh.tell(), seconds=state.get("seconds", 0.0) + now - start)
            start = now
            write_atomic(ledger, json.dumps(state))
            if bar is not None:
                bar.advance(task, len(chunk))
    for n in counts.values():
        n["acceptance_rate"] = n["accepted"] / max(n["samples"], 1)
        n["solved_rate"] = n["solved_prompts"] / max(n["prompts"], 1)
    summary = {"out": str(out), "source": source, "filters": to_dict(cfg.filters), "tasks": counts,
               "accepted": sum(n["accepted"] for n in counts.values()), "unsolved_prompts": len(unsolved),
               "repeated_prompts_skipped": repeats,
               "seconds": round(state.get("seconds", 0.0) + time.perf_counter() - start, 2), "settings": settings}
    # the summary and the unsolved ids before the rows take their name: an output without its summary would be a
    # finished run that --resume cannot tell from a stranger's file; killed before the rename, the run resumes
    write_atomic(out.with_name(out.stem + ".summary.json"), json.dumps(summary, indent=2) + "\n")
    write_atomic(out.with_name(out.stem + ".unsolved.txt"), "".join(p + "\n" for p in unsolved))
    os.replace(tmp, out)
    ledger.unlink(missing_ok=True)
    _print_summary(summary, out, progress)
    return summary


def first_of_each_prompt(problems: list[tuple]) -> tuple[list[tuple], int]:
    """The (label, id, example) problems with each prompt's first alone (merged datasets repeat questions: each
    repeat would get its own m answers and its own duplicates), and how many repeats were left out."""
    from ponder.tasks import prompt_key

    seen, kept = set(), []
    for problem in problems:
        key = prompt_key(problem[2])
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept, len(problems) - len(kept)


def _settings(cfg: SampleConfig) -> dict:
    """The settings that decide which rows a run writes (where it writes them and how fast do not)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in ("out", "threads", "device")}


def _earlier_run(out: Path, tmp: Path, ledger: Path, settings: dict, resume: bool) -> dict | None:
    """What `out` already holds: None (nothing), the summary of a finished run, or the ledger of an interrupted
    one to continue. Anything else is refused, before a model is loaded, so that nothing written is lost."""
    ways = "choose another --out, or delete it to sample afresh"
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path for the traces, e.g. {out / 'traces.jsonl'}")
    if (blocker := blocking_file(out.parent)) is not None:
        raise UserError(f"--out {out}: '{blocker}' is a file, not a directory; choose another --out")
    check_writable(out.parent, "--out")  # before the model loads
    if out.exists():
        if not resume:
            raise UserError(f"{out} already exists; pass --resume to continue its run, {ways}")
        summary = out.with_name(out.stem + ".summary.json")
        if not summary.is_file():
            raise UserError(f"--resume: {out} exists but {summary} does not, so no ponder sample run finished there; {ways}")
        done = json.loads(summary.read_text())
        if "settings" in done:  # summaries of older versions do not say
            _refuse_changes(done["settings"], settings, f"the finished run in {out}", f"leave them out to keep it, or {ways}")
        return done
    if not (tmp.is_file() and ledger.is_file()):
        return None  # a .partial without its ledger finished no chunk: nothing to keep
    state = json.loads(ledger.read_text())
    if not resume:
        prompts = sum(n["prompts"] for n in state["counts"].values())
        raise UserError(f"{tmp} holds an interrupted run of {out} ({prompts} prompts sampled); pass --resume to "
                        f"continue it, choose another --out, or delete it to sample afresh")
    _refuse_changes(json.loads(state["key"]), settings, f"the interrupted run in {tmp}",
                    f"leave them out to continue it, or choose another --out, or delete {tmp} to sample afresh")
    return state


def _refuse_changes(old: dict, new: dict, run: str, ways: str) -> None:
    """A run continues with its own settings or not at all: its rows and counts were made with them."""
    from ponder.config import build
    from ponder.resume import describe, diff

    try:  # keys added to ponder since that run take their defaults
        old = _settings(build(SampleConfig, old))
    except UserError:
        pass
    changed = diff(old, new, lists=True)
    if changed:
        raise UserError(f"--resume with settings that differ from {run}: {describe(changed)}; {ways}")


def _judge(chunk, outs, tokenizer, cfg: SampleConfig, opened: list[bool]):
    """For each prompt: (all candidates, [(sample index, kept candidate, rewards)]). `opened`: each prompt left a
    think block open (templates.opens_think)."""
    from ponder.filters import language_share
    from ponder.rewards import get_reward
    from ponder.rewards.language import example_language
    from ponder.rollout import completion_texts

    texts = completion_texts(tokenizer, outs)
    flat = [t for ts in texts for t in ts]
    exs = [ex for (_, _, ex), o in zip(chunk, outs) for _ in o]
    columns = {k: [ex.get(k) for ex in exs] for k in dict.fromkeys(k for ex in exs for k in ex if k != "prompt")}
    prompts = [ex["prompt"] for ex in exs]
    think = [o for o, out in zip(opened, outs) for _ in out]
    accuracy = get_reward("accuracy")(flat, prompts=prompts, extract=cfg.extract, think_opened=think, **columns)
    fmt = get_reward("format")(flat, prompts=prompts, think_opened=think)
    rep = get_reward("repetition")(flat, prompts=prompts)
    results, at = [], 0
    for (_, _, ex), ts, o, think in zip(chunk, texts, outs, opened):
        by_example = cfg.filters.language == "target"  # only then is `target` a language (elsewhere any column)
        target = example_language(ex.get("target")) if by_example else "en"
        want = target if by_example else cfg.filters.language or "en"
        cands, rewards = [], []
        for t, c in zip(ts, o):
            cands.append(Candidate(t, len(c.token_ids), c.finish_reason == "length", accuracy[at], target=target,
                                   think_opened=think, code_task="tests" in ex))
            rewards.append({"accuracy": accuracy[at], "format": fmt[at], "repetition": rep[at],
                            "language": language_share(t, want)})
            at += 1
        select(cands, cfg.filters)  # marks each candidate with its rejection reason, None when kept
        results.append((cands, [(j, c, rewards[j]) for j, c in enumerate(cands) if c.reason is None]))
    return results


def _row(ex: dict, pid: str, j: int, cand: Candidate, rewards: dict, source: dict) -> dict:
    meta = {k: v for k, v in ex.items() if k not in ("prompt", "answer", "task")}
    # a teacher whose prompt opened the think block (R1-Distill's chat template) answered from inside it: the trace is
    # written whole, so that a student whose template does not open it learns to (SFT drops the tag again where the
    # student's own prompt opens it); without it a student trained under r1_zero never wrote <think>
    text = cand.text
    if cand.think_opened and not text.lstrip().startswith("<think>"):
        text = "<think>\n" + text
    return {"prompt": ex["prompt"], "completion": text, "answer": ex.get("answer"), "task": ex.get("task"),
            "prompt_id": pid, "sample": j, "tokens": cand.tokens, "rewards": rewards, "source": source, "meta": meta}


class _bar:
    def __init__(self, show: bool, total: int):
        self.show, self.total, self.progress = show, total, None

    def __enter__(self):
        if not self.show:
            return None, None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]sample"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        self.progress.__enter__()
        return self.progress, self.progress.add_task("", total=self.total)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)


def _print_summary(summary: dict, out: Path, show: bool) -> None:
    from ponder.console import make_console

    console = make_console()
    src = summary["source"]
    console.print(f"rejection sampling from {src['model']} (k={src['k']}, temperature {src['temperature']}):")
    for label, n in summary["tasks"].items():
        top = ", ".join(f"{k} {v}" for v, k in sorted(((v, k) for k, v in n["rejected"].items() if v), reverse=True))
        console.print(f"  {label}: accepted {n['accepted']} of {n['samples']} answers ({n['acceptance_rate']:.1%}); "
                      f"{n['solved_prompts']} of {n['prompts']} prompts solved; rejected: {top or 'none'}", soft_wrap=True)
    console.print(f"wrote {summary['accepted']} answers to {out}", soft_wrap=True)
    if summary["unsolved_prompts"]:
        console.print(f"{summary['unsolved_prompts']} prompts have no accepted answer; their ids are in "
                      f"{out.with_name(out.stem + '.unsolved.txt')}", soft_wrap=True, style="yellow")
