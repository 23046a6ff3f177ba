"""`ponder train RECIPE`: the GRPO run loop around the trainer: progress, checkpoints, evaluation, report."""

from __future__ import annotations

import contextlib
import json

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ponder import distributed
from ponder.console import make_console
from ponder.config import RunConfig, load_config
from ponder.files import write_atomic
from ponder.resume import add_arguments as add_resume_arguments

console = make_console()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="run GRPO on a model over verifiable tasks",
        description="Run GRPO (R1-Zero style RL) from a YAML recipe. Every recipe key can be overridden "
        "with key.sub=value, e.g. `ponder train recipes/zero-tiny.yaml optim.lr=1e-4 rollout.group_size=16`. "
        "Writes runs/<name>/: config.yaml, metrics.jsonl, samples.jsonl, tensorboard/, checkpoints/step-N/.",
    )
    p.add_argument("recipe", help="YAML recipe (see recipes/; `ponder config train RECIPE` prints every setting with its default and what it does)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. optim.lr=1e-4 algorithm.loss_agg=dr_grpo")
    add_resume_arguments(p, "train")
    p.set_defaults(func=lambda args: train(load_config(args.recipe, args.overrides), resume=args.resume,
                                           allow_changes=args.allow_changes))


def train(cfg: RunConfig, resume: bool = False, stop_after: int | None = None, allow_changes: bool = False):
    """Run to cfg.train.steps (or `stop_after` more steps, for tests). Returns the trainer. On resume, settings
    that differ from the run's config.yaml are refused unless safe or allowed (ponder.resume)."""
    from ponder import resume as resuming
    from ponder.evaluation.runner import run_metrics
    from ponder.metrics import require_backends
    from ponder.rl.trainer import GRPOTrainer
    from ponder.rl.guardrails import example_rows

    require_backends(cfg.train.log_to)
    changes = resuming.check(cfg, "train", allow_changes) if resume else None
    trainer = GRPOTrainer(cfg, resume=resume, allow_changes=allow_changes)  # checks the template, the data and the rewards before the model loads
    main = trainer.rank == 0  # with torchrun, rank 0 prints and writes; every rank evaluates its share
    if changes is not None and main:
        resuming.record(trainer.run_dir, changes, trainer.step_no)
        if changes.changed:
            console.print(f"resuming from step {trainer.step_no} with changes (recorded in config.yaml): {changes.describe()}",
                          markup=False)
    evaluating = bool(cfg.eval.tasks)
    first = trainer.step_no
    before = _evaluate(trainer, "before") if evaluating and not resume else _load_eval(trainer, "before")
    t = cfg.train
    last = t.steps if stop_after is None else min(t.steps, trainer.step_no + stop_after)
    columns = [TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not main) as progress:
        task = progress.add_task("", total=t.steps, completed=trainer.step_no)
        while trainer.step_no < last:
            m = trainer.step()
            step = trainer.step_no
            trainer.metrics.log(step, m)
            # the step's samples, and the completions that made a guardrail fire
            trainer.metrics.samples(step, trainer.sample_rows(trainer.last_groups, t.log_samples) + example_rows(m))
            if evaluating and cfg.eval.every and step % cfg.eval.every == 0 and step < t.steps:
                trainer.metrics.log(step, run_metrics(_evaluate(trainer, f"step-{step}", quiet=True)))
            if trainer.guardrails.stop_reason:  # logged, and not saved: the checkpoint before it is the one to use
                _stop(trainer, main)
            # no checkpoint in a streak of skipped (non-finite) updates: the ones before it stay the last good ones
            if ((t.save_every and step % t.save_every == 0) or step == t.steps) and trainer.nan_streak == 0:
                trainer.save()
            desc = f"reward {m['reward']:.2f}"
            if "accuracy" in m:
                desc += f" acc {m['accuracy']:.2f}"
            desc += f" fmt {m['format_rate']:.2f} len {m['completion_len/mean']:.0f} {m['time/total']:.1f}s/step"
            progress.update(task, completed=step, description=desc)
            if main and not console.is_terminal and (step % 10 == 0 or step == last):
                console.print(f"step {step}/{t.steps} {desc}")
    ran = trainer.step_no > first
    if ran and trainer.step_no >= t.steps and trainer.nan_streak and main:
        from ponder.checkpoint import withheld

        console.print(withheld(trainer.ckpt_dir, trainer.step_no, trainer.nan_streak), soft_wrap=True, markup=False)
    if trainer.step_no >= t.steps:
        # a finished run resumed: its evaluation stands (run again, it was logged twice and its file rewritten)
        done = _load_eval(trainer, "after") if not ran else None
        after = done or (_evaluate(trainer, "after") if evaluating else None)
        if not ran and (done is not None or not evaluating) and main:  # (without eval tasks there is no file to find)
            console.print(f"{trainer.run_dir} is complete at step {trainer.step_no}; nothing to resume", soft_wrap=True)
        if after is not None and (done is None or not trainer.metrics.logged(trainer.step_no, "eval/")):
            trainer.metrics.log(trainer.step_no, run_metrics(after))
            if main:
                _print_before_after(before, after)
        if main:
            from ponder.report import write_report

            console.print(f"report: {write_report(trainer.run_dir)}", soft_wrap=True)
    trainer.metrics.close()
    return trainer


def _stop(trainer, main: bool):
    """End the run for a guardrail: the report (with the event marked) written, then the one-line reason."""
    from ponder.errors import TrainingError
    from ponder.report import write_report

    trainer.metrics.close()
    if main:
        write_report(trainer.run_dir)
    distributed.barrier()  # the other ranks wait: one that exits first has torchrun end rank 0 mid-report
    raise TrainingError(trainer.guardrails.stop_reason)


def _evaluate(trainer, tag: str, quiet: bool = False):
    """Held-out figures with the trainer's own engine, template and verifiers. Writes eval_<tag>.json
    (figures and settings) and eval_<tag>_samples.jsonl (every answer with its score)."""
    from ponder.evaluate import evaluate
    from ponder.rollout import engine_keys

    cfg, e = trainer.cfg, trainer.cfg.eval
    acc = cfg.rewards.get("accuracy")
    extract = acc.get("extract", "tags_or_boxed") if isinstance(acc, dict) else "tags_or_boxed"
    results = {}
    main = trainer.rank == 0  # under torchrun every rank samples its share; rank 0 writes and prints
    quiet = quiet or not main
    with open(trainer.run_dir / f"eval_{tag}_samples.jsonl", "w", encoding="utf-8") if main else contextlib.nullcontext() as out:
        for spec, examples in zip(e.tasks, trainer.eval_examples):  # loaded once, as the trainer checked them
            if not quiet:
                console.print(f"evaluating {spec.name}/{spec.split} ({len(examples)} problems, k={e.k}) [{tag}]")
            unset = "" if e.max_new_tokens else " (unset, it takes rollout.max_new_tokens)"
            with engine_keys(f"eval.max_new_tokens{unset}", "eval.k"):
                r = evaluate(
                    trainer.model, trainer.tokenizer, examples, template=cfg.data.template, k=e.k,
                    temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, min_p=e.min_p,
                    max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
                    engine=trainer.engine, seed=cfg.seed, stop=tuple(cfg.rollout.stop), progress=not quiet,
                    extract=extract, reflection_words=tuple(cfg.train.reflection_words),
                )
            for row in r.pop("samples"):
                if main:
                    out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            results[f"{spec.name}/{spec.split}"] = r
    if main:
        write_atomic(trainer.run_dir / f"eval_{tag}.json", json.dumps(results, indent=2, default=str))  # read by --resume
    return results


def _load_eval(trainer, tag: str):
    path = trainer.run_dir / f"eval_{tag}.json"
    return json.loads(path.read_text()) if path.is_file() else None


ROWS = [("pass@1", "pass@1"), ("format rate", "format_rate"), ("mean length", "mean_length"),
        ("reflection rate", "reflection_rate")]


def _print_before_after(before, after) -> None:
    for task, a in after.items():
        b = (before or {}).get(task, {})
        title = f"held-out {task}: before / after training"
        table = Table(title=title, min_width=len(title))  # a title wider than its table would wrap
        table.add_column("figure")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for label, key in ROWS:
            fb, fa = _fig(b, key), _fig(a, key)
            table.add_row(label, fb, fa)
        console.print(table)
        if b.get("task_hash") not in (None, a.get("task_hash")):  # a resume with another seed or other eval tasks
            console.print(f"held-out {task}: the 'after' evaluation saw other problems than the 'before' one (the seed or "
                          "the eval task changed on --resume); the two columns are not one held-out set", markup=False)


def _fig(result: dict, key: str) -> str:
    m = result.get("metrics", result) if isinstance(result, dict) else {}
    v = m.get(key)
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
