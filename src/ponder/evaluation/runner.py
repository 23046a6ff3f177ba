"""Sample k answers per problem, score them with the tasks' own verifiers, and compute the figures.

The figures and their definitions (docs/evaluation.md):
  pass@1       mean correctness over the k samples, averaged over problems (R1 paper), with a seeded
               percentile-bootstrap 95% interval over problems
  pass@k'      unbiased estimator of Chen et al. for k' in powers of two <= k, and k
  cons@k       the majority answer (grouped by mathematical equivalence) checked by the task's verifier
  greedy       accuracy of one greedy answer per problem (optional)
  rates        answer (an answer was extracted), format (R1-Zero format reward), truncation (hit the
               token budget), reflection (a reflection word appears), mixing (the chain of thought has
               English and Chinese words); mean length in tokens
A sample is correct when its verifier score is 1; partial scores show in mean_score.

What is sampled for a task depends only on that task's problems and the settings (seed, k, temperature,
top-p, budget, stop strings, template, engine and the generation batch, bounded by the engine's own
`batch_size`): each task is generated on its own, so `ponder eval --tasks a,b` gives task b the answers
that `--tasks b` gives it, and the trainer's evaluation (one task a call, with its own engine) the same
answers as `ponder eval` with the same settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from typing import Sequence

from ponder.errors import UserError
from ponder.evaluation.stats import bootstrap_ci, majority, pass_at_k, pass_ks, vote_groups, voted_answer
from ponder.metrics import DEFAULT_REFLECTION_WORDS, reflection_pattern
from ponder.runtime import rng_kept


def evaluate(
    model, tokenizer, examples: Sequence[dict], *, template: str = "r1_zero", k: int = 16, temperature: float = 0.6,
    top_p: float = 0.95, top_k: int = 0, min_p: float = 0.0, max_new_tokens: int = 1024, engine="fast",
    greedy: bool = False, seed: int = 0,
    stop: Sequence[str] = ("</answer>",), progress: bool = True, extract: str = "tags_or_boxed",
    reflection_words: Sequence[str] = DEFAULT_REFLECTION_WORDS, batch_size: int = 256, n_boot: int = 2000,
) -> dict:
    """Evaluate `model` on `examples` (each with a `task`; an `eval_group` reports examples apart).

    Returns {settings, task_hash, task_hashes: {task: hash of its problems}, tasks: {task: figures}, metrics:
    figures over all problems (the task's own when there is one), timing, samples: one row per answer}.

    `engine` is a rollout engine name (fast, the default, falls back to hf for architectures it does not
    support) or an engine already built on this model; a name builds the engine with `batch_size`. At most
    `batch_size` sequences (and at most the engine's own `batch_size`) are generated at once, each chunk
    with its own seed. The global torch RNG is left as it was, so evaluating inside a training run does
    not change the run's sampling.
    """
    from ponder.rollout import RolloutEngine, SamplingParams, make_engine
    from ponder.templates import encoded_prompt

    examples = list(examples)
    if k < 1:
        raise UserError(f"k must be at least 1 (samples per problem); got {k}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1 (sequences generated at once); got {batch_size}")
    if not examples:
        raise UserError("no examples to evaluate; check the task names, --split and --n")
    for i, ex in enumerate(examples):
        if "task" not in ex or "prompt" not in ex:
            missing = "task" if "task" not in ex else "prompt"
            raise UserError(f"example {i} has no '{missing}' field; evaluation needs each example's prompt and task name")
    eng = engine if isinstance(engine, RolloutEngine) else make_engine(engine, model, tokenizer, batch_size=batch_size)
    # an engine splits a bigger call into runs of its own batch_size, each seeded apart: chunk no bigger, so
    # the answers depend on one batch size, whoever built the engine
    batch_size = min(batch_size, getattr(eng, "batch_size", None) or batch_size)
    settings = dict(
        template=template, k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        engine=engine_name(eng), greedy=greedy, seed=seed, stop=list(stop), extract=extract,
        reflection_words=list(reflection_words), batch_size=batch_size, n_boot=n_boot,
    )
    settings |= {key: value for key, value in (("top_k", top_k), ("min_p", min_p)) if value}  # named where they cut
    if template == "chat" and getattr(tokenizer, "ponder_chat_kwargs", None):  # a thinking and a non-thinking Qwen3
        settings["chat_template_kwargs"] = dict(tokenizer.ponder_chat_kwargs)  # evaluation are not the same settings
    encoded = [encoded_prompt(template, ex["prompt"], tokenizer) for ex in examples]
    prompts, opened = [ids for ids, _ in encoded], [o for _, o in encoded]
    sample_params = SamplingParams(n=k, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                                   max_tokens=max_new_tokens, stop=tuple(stop))
    greedy_params = SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens, stop=tuple(stop))

    start = time.perf_counter()
    with rng_kept(model), _progress_bar(progress) as bar:
        groups = _by_label(examples)
        sampled = _generate(eng, prompts, groups, sample_params, batch_size, seed, bar, f"sampling k={k}")
        greedily = _generate(eng, prompts, groups, greedy_params, batch_size, seed, bar, "greedy") if greedy else None
    generation_s = time.perf_counter() - start

    problems, samples = _score(examples, sampled, greedily, tokenizer, extract, reflection_words, opened)
    tasks = {
        name: figures([p for p in problems if p["task"] == name], k, seed=seed, n_boot=n_boot)
        for name in dict.fromkeys(map(label, examples))
    }
    overall = next(iter(tasks.values())) if len(tasks) == 1 else figures(problems, k, seed=seed, n_boot=n_boot)
    tokens = sum(s["length"] for s in samples)
    timing = {
        "generation_s": round(generation_s, 3), "scoring_s": round(time.perf_counter() - start - generation_s, 3),
        "generated_tokens": tokens, "tokens_per_s": round(tokens / max(generation_s, 1e-9), 1),
    }
    # per task too: --compare tells whether one task saw the same problems in results of different task mixes
    hashes = {name: task_hash([examples[i] for i in group]) for name, group in zip(tasks, groups)}
    return {
        "settings": settings, "task_hash": task_hash(examples), "task_hashes": hashes, "tasks": tasks, "metrics": overall,
        "timing": timing, "samples": samples,
    }


def engine_name(engine) -> str:
    """The registered name of an engine (what `make_engine` takes), or its class name."""
    from ponder.rollout import ENGINES

    return next((name for name, cls in ENGINES.items() if type(engine) is cls), type(engine).__name__)


def label(example: dict) -> str:
    """The name an example's figures are reported under: its `eval_group` if it has one, else its task."""
    return example.get("eval_group") or example["task"]


def task_hash(examples: Sequence[dict]) -> str:
    """sha256 of the examples' canonical JSON: two results with the same hash saw the same problems."""
    blob = json.dumps(list(examples), sort_keys=True, ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()


def figures(problems: list[dict], k: int, *, seed: int = 0, n_boot: int = 2000) -> dict:
    """Per-task figures from scored problems. Problems the verifier could not score are left out of accuracy."""
    scored = [p for p in problems if any(s is not None for s in p["scores"])]
    every = [s for p in problems for s in p["samples"]]
    p1 = [_mean(p["correct"]) for p in scored]
    out: dict = {"problems": len(problems), "scored_problems": len(scored), "k": k}
    out["pass@1"] = _mean(p1)
    out["pass@1_ci"] = list(bootstrap_ci(p1, n_boot=n_boot, seed=seed)) if p1 else None
    out[f"cons@{k}"] = _mean([p["cons"] for p in scored])
    for kk in pass_ks(k)[1:]:
        out[f"pass@{kk}"] = _mean([pass_at_k(k, sum(p["correct"]), kk) for p in scored])
    if scored and scored[0]["greedy"] is not None:
        out["greedy"] = _mean([p["greedy"] for p in scored])
    out["mean_score"] = _mean([s or 0.0 for p in scored for s in p["scores"]])
    out["answer_rate"] = _mean([bool(s["answer"]) for s in every])
    out["format_rate"] = _mean([s["format"] for s in every if s["format"] is not None])
    out["mean_length"] = _mean([s["length"] for s in every])
    out["truncation_rate"] = _mean([s["finish_reason"] == "length" for s in every])
    out["reflection_rate"] = _mean([s["reflection"] for s in every])
    out["mixing_rate"] = _mean([s["mixed"] for s in every])
    return out


def scorable(task, example: dict, verdicts: list) -> bool:
    """Whether the verifier scores this problem at all (a gold that parses): a property of the problem, so that two
    models are scored over the same problems. Read from its verdicts on the non-empty answers given (an empty one
    scores 0 without the gold being read); where there are none, the verifier is asked once with the answer "0"
    (not the gold's own text: a text equal to the gold matches without the gold being parsed)."""
    if verdicts:
        return any(v is not None for v in verdicts)
    return task.verify("0", example) is not None


def run_metrics(results: dict) -> dict[str, float]:
    """A run's evaluations (eval_<tag>.json: `task/split` -> result) as `eval/<task>/<split>/<figure>`, the pass@1
    interval as `pass@1_lo` and `_hi`: one scheme for ponder train and ponder sft, as eval_before.json is keyed (the
    report draws a task's before and after points in one panel)."""
    return flat_metrics({"tasks": {name: r["metrics"] for name, r in results.items()}})


def flat_metrics(result: dict, prefix: str = "eval") -> dict[str, float]:
    """Scalar figures as `{prefix}/{task}/{figure}`, for metrics.jsonl and TensorBoard."""
    out = {}
    for task, figs in result["tasks"].items():
        for name, value in figs.items():
            if name == "pass@1_ci" and value:
                out[f"{prefix}/{task}/pass@1_lo"], out[f"{prefix}/{task}/pass@1_hi"] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}/{task}/{name}"] = float(value)
    return out


def _score(examples, sampled, greedily, tokenizer, extract, reflection_words, opened):
    from ponder.rewards import get_reward
    from ponder.rewards.extract import extract_answer
    from ponder.rewards.language import is_mixed
    from ponder.rollout import completion_texts, decode_text
    from ponder.tasks import get_task

    fmt = get_reward("format")
    reflective = reflection_pattern(reflection_words)
    texts = completion_texts(tokenizer, sampled)
    answers = [[extract_answer(t, extract, opened[i]) for t in ts] for i, ts in enumerate(texts)]
    _prefetch_verdicts(examples, answers)
    problems, samples = [], []
    for i, (ex, outs) in enumerate(zip(examples, sampled)):
        task = get_task(ex["task"])

        def check(answer):  # no answer scores 0, as in the accuracy reward
            return 0.0 if answer is None else task.verify(answer, ex)

        scores = [check(a) for a in answers[i]]
        if not scorable(task, ex, [s for s, a in zip(scores, answers[i]) if a]):
            scores = [None] * len(scores)
        correct = [s is not None and s >= 1.0 for s in scores]
        groups = vote_groups(answers[i])
        win = majority(groups)
        cons = check(voted_answer(answers[i], groups, win)) if win is not None else 0.0
        formats = fmt(texts[i], prompts=[ex["prompt"]] * len(outs), **_columns(ex, outs, opened[i]))
        rows = []
        for j, (c, text) in enumerate(zip(outs, texts[i])):
            rows.append(dict(
                task=label(ex), problem=i, sample=j, greedy=False, prompt=ex["prompt"], gold=ex.get("answer"),
                completion=text, answer=answers[i][j], score=scores[j], correct=correct[j], format=formats[j],
                length=len(c.token_ids), finish_reason=c.finish_reason, reflection=bool(reflective.search(text)),
                mixed=is_mixed(text), group=groups[j], voted=win is not None and groups[j] == win,
            ))
        samples += rows
        greedy_ok = None
        if greedily is not None:
            g = greedily[i][0]
            text = decode_text(tokenizer, g.token_ids)
            answer = extract_answer(text, extract, opened[i])
            score = check(answer)
            greedy_ok = score is not None and score >= 1.0
            samples.append(dict(
                task=label(ex), problem=i, sample=0, greedy=True, prompt=ex["prompt"], gold=ex.get("answer"),
                completion=text, answer=answer, score=score, correct=greedy_ok,
                format=fmt([text], prompts=[ex["prompt"]], **_columns(ex, [g], opened[i]))[0], length=len(g.token_ids),
                finish_reason=g.finish_reason, reflection=bool(reflective.search(text)), mixed=is_mixed(text),
                group=None, voted=False,
            ))
        problems.append(dict(
            task=label(ex), scores=scores, correct=correct, cons=float(cons is not None and cons >= 1.0),
            greedy=greedy_ok, samples=rows,
        ))
    return problems, samples


def _prefetch_verdicts(examples, answers) -> None:
    """One parallel pass of math verification for tasks that verify by answer equivalence (as the accuracy reward does)."""
    from ponder.tasks import Task, get_task

    try:
        from ponder.rewards.match import prefetch
    except ImportError:
        return
    by_match = {t for t in {ex["task"] for ex in examples}
                if type(get_task(t)).verify is Task.verify or getattr(get_task(t), "matches_answers", False)}
    prefetch([(a, ex.get("answer")) for ex, ans in zip(examples, answers) if ex["task"] in by_match for a in ans if a is not None])


def _columns(ex: dict, outs, think_opened: bool) -> dict:
    """Reward-contract columns for one problem's completions."""
    n = len(outs)
    cols = {key: [value] * n for key, value in ex.items() if key != "prompt"}
    cols.update(completion_length=[len(c.token_ids) for c in outs], truncated=[c.finish_reason == "length" for c in outs],
                think_opened=[think_opened] * n)
    return cols


def _by_label(examples) -> list[list[int]]:
    """Indices of the examples of each label (task or eval_group), in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(label(ex), []).append(i)
    return list(groups.values())


def _generate(engine, prompt_ids, groups, params, batch_size, seed, bar, label):
    """Generate each group of prompts on its own, in chunks of about `batch_size` sequences so the bar moves;
    each chunk has its own seed, counted from 0 in every group. Returns the completions in prompt order.
    Under torchrun the chunks are dealt out to the ranks in turn and every rank gets all completions: the same
    answers as one process (each chunk's seed is its own), in 1/N of the time, and no rank waits idle."""
    from dataclasses import replace

    from ponder import distributed

    rank, world = distributed.rank(), distributed.world()
    per_chunk = max(1, batch_size // params.n)
    task = bar.add_task(label, total=len(prompt_ids)) if bar is not None else None
    out: list = [None] * len(prompt_ids)
    dealt = 0  # chunks so far, over all groups: the next one is rank dealt % world's
    for group in groups:
        for c, lo in enumerate(range(0, len(group), per_chunk)):
            chunk = group[lo:lo + per_chunk]
            mine, dealt = dealt % world == rank, dealt + 1
            if mine:
                for i, outs in zip(chunk, engine.generate([prompt_ids[i] for i in chunk], replace(params, seed=seed * 1_000_003 + c))):
                    out[i] = outs
            if bar is not None:
                bar.advance(task, len(chunk))
    if world > 1:
        for part in distributed.gather_all({i: o for i, o in enumerate(out) if o is not None}):
            for i, o in part.items():
                out[i] = o
    return out


def _progress_bar(show: bool):
    if not show:
        return contextlib.nullcontext()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("problems"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
    )


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else None
