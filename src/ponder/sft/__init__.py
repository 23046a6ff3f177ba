"""`ponder sft RECIPE`: supervised fine-tuning on completions (cold start, distillation).

Data: JSONL of {prompt, completion} or {messages: [...]}; the prompt is rendered by the run's template
as GRPO renders it; the loss is on completion tokens (and EOS) only; examples are packed into rows
without attention across them. Writes runs/<name>/ like `ponder train`: config.yaml, metrics.jsonl,
samples.jsonl, tensorboard/, checkpoints/step-N/, and `final` (a link to the last checkpoint).
"""

from __future__ import annotations

import json

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ponder.console import make_console
from ponder.files import write_atomic
from ponder.resume import add_arguments as add_resume_arguments
from ponder.sft.config import SFTConfig, load_sft_config

console = make_console()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sft", help="supervised fine-tuning on prompt/completion or chat JSONL (cold start, distillation)",
        description="Fine-tune a model on completions from a YAML recipe: loss on completion tokens only, packed "
        "sequences, LoRA optional. Every recipe key can be overridden with key.sub=value, e.g. "
        "`ponder sft recipes/coldstart-tiny.yaml optim.lr=3e-4 data.files=[my.jsonl]`. "
        "Writes runs/<name>/: config.yaml, metrics.jsonl, samples.jsonl, checkpoints/step-N/, final.",
    )
    p.add_argument("recipe", help="YAML recipe (see recipes/coldstart-tiny.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.epochs=3 model.path=runs/x/final")
    add_resume_arguments(p, "sft")
    p.set_defaults(func=lambda args: sft(load_sft_config(args.recipe, args.overrides), resume=args.resume,
                                         allow_changes=args.allow_changes))


def sft(cfg: SFTConfig, resume: bool = False, stop_after: int | None = None, quiet: bool = False,
        allow_changes: bool = False):
    """Train to the end (or `stop_after` more steps, for tests). Returns the trainer. On resume, settings that
    differ from the run's config.yaml are refused unless safe or allowed (ponder.resume)."""
    from ponder import resume as resuming
    from ponder.evaluation.runner import run_metrics
    from ponder.metrics import require_backends
    from ponder.sft.trainer import SFTTrainer
    from ponder.tasks import load_examples, tasks_named_by
    from ponder.templates import left_out_turns

    require_backends(cfg.train.log_to)
    changes = resuming.check(cfg, "sft", allow_changes) if resume else None
    with tasks_named_by("eval.tasks"):  # before the model loads (and the training, on a resume, evaluates only after)
        held_out = [load_examples(spec, cfg.seed) for spec in cfg.eval.tasks]
    trainer = SFTTrainer(cfg, resume=resume, allow_changes=allow_changes)
    if changes is not None:
        resuming.record(trainer.run_dir, changes, trainer.step_no)
        if changes.changed and not quiet:
            console.print(f"resuming from step {trainer.step_no} with changes (recorded in config.yaml): {changes.describe()}",
                          markup=False)
        if any(k == "train.epochs" for k, _, _ in changes.changed) and cfg.train.steps is not None and not quiet:
            console.print(f"warning: train.epochs changes nothing: train.steps={cfg.train.steps} sets the run's length; "
                          "change train.steps, or set it to null to run by epochs", style="yellow", markup=False)
    r = trainer.report
    note = r.warning()
    if note:
        console.print(f"warning: {note}", style="yellow")
    if cfg.train.batch_size > len(trainer.examples) and not quiet:
        console.print(f"warning: train.batch_size={cfg.train.batch_size:,} is more than the {len(trainer.examples):,} "
                      "training examples: each step takes all of them once", style="yellow", markup=False)
    prompts = [row["messages"][:-1] if "messages" in row else row["prompt"] for row in trainer.rows]
    left_out = left_out_turns(trainer.cfg.data.template, prompts)
    if left_out and not quiet:
        console.print(left_out, markup=False)
    write_atomic(trainer.run_dir / "data.json", json.dumps({"rows": len(trainer.examples), "truncated": r.truncated,
                                                            "dropped": r.dropped, "empty": r.empty, "max_len": r.max_len}, indent=2))
    t, total = cfg.train, trainer.total_steps
    if cfg.eval.tasks and not resume:
        _evaluate(trainer, held_out, "before", quiet)
    last = total if stop_after is None else min(total, trainer.step_no + stop_after)
    first = trainer.step_no
    columns = [TextColumn("[bold]SFT"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=quiet) as progress:
        bar = progress.add_task("", total=total, completed=trainer.step_no)
        while trainer.step_no < last:
            m = trainer.step()
            step = trainer.step_no
            if step == 1 and (r.truncated or r.dropped):
                m.update(truncated_examples=r.truncated, dropped_examples=r.dropped)
            trainer.metrics.log(step, m)
            if ((t.save_every and step % t.save_every == 0) or step == total) and trainer.nan_streak == 0:
                # samples first: a stop between the two resumes from the checkpoint, whose step's samples would be lost
                # (resuming cuts samples.jsonl back to the checkpoint's step, so a stop before the save loses nothing)
                trainer.metrics.samples(step, trainer.sample_rows(t.log_samples))
                trainer.save()
            desc = f"loss {m['loss']:.3f} epoch {m['epoch']:.2f} {m['tokens_per_s']:.0f} tok/s"
            progress.update(bar, completed=step, description=desc)
            if not console.is_terminal and not quiet and (step % 10 == 0 or step == last):
                console.print(f"step {step}/{total} {desc}")
    if trainer.step_no > first and trainer.step_no >= total and trainer.nan_streak and not quiet:
        from ponder.checkpoint import withheld

        console.print(withheld(trainer.ckpt_dir, trainer.step_no, trainer.nan_streak), soft_wrap=True, markup=False)
    finished = trainer.step_no == first and (trainer.run_dir / "eval_after.json").is_file()
    if finished and not quiet:  # a finished run resumed: its evaluation stands (run again, it was logged twice)
        console.print(f"{trainer.run_dir} is complete at step {trainer.step_no}; nothing to resume", soft_wrap=True)
    if trainer.step_no >= total and cfg.eval.tasks and not finished:
        after = _evaluate(trainer, held_out, "after", quiet)
        trainer.metrics.log(trainer.step_no, run_metrics(after))
    elif finished and not trainer.metrics.logged(trainer.step_no, "eval/"):  # stopped between the file and the log
        trainer.metrics.log(trainer.step_no, run_metrics(json.loads((trainer.run_dir / "eval_after.json").read_text())))
    trainer.metrics.close()
    if trainer.step_no >= total and trainer.metrics.enabled:
        from ponder.report import write_report

        path = write_report(trainer.run_dir)
        if not quiet:
            console.print(f"report: {path}", soft_wrap=True)
    return trainer


def _evaluate(trainer, held_out: list[list[dict]], tag: str, quiet: bool) -> dict:
    from ponder.evaluate import evaluate
    from ponder.rollout import engine_keys

    cfg, e = trainer.cfg, trainer.cfg.eval
    results = {}
    for spec, examples in zip(e.tasks, held_out):
        with engine_keys("eval.max_new_tokens", "eval.k"):
            res = evaluate(trainer.model, trainer.tokenizer, examples, template=cfg.data.template, k=e.k,
                           temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, min_p=e.min_p,
                           max_new_tokens=e.max_new_tokens or 256,
                           seed=cfg.seed, progress=not quiet)
        res.pop("samples")
        results[f"{spec.name}/{spec.split}"] = res
        if not quiet:
            m = res["metrics"]
            console.print(f"{spec.name}/{spec.split} ({tag}): pass@1 {m['pass@1']:.3f}  format {m['format_rate']:.3f}  "
                          f"length {m['mean_length']:.0f}", markup=False)
    write_atomic(trainer.run_dir / f"eval_{tag}.json", json.dumps(results, indent=2, default=str))
    return results


