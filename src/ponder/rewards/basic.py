"""The two rewards of R1-Zero: accuracy (rule-checked answer) and format (think then answer)."""

from __future__ import annotations

import re

from ponder.rewards import register
from ponder.rewards.extract import extract_answer

STRICT_FORMAT = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*<answer>(?:(?!<answer>|</answer>).)*</answer>\s*$", re.DOTALL)


@register("accuracy")
def accuracy(completions, *, prompts, answer=None, task=None, extract: str = "tags_or_boxed", **columns):
    """1 when the extracted answer passes the example's task verifier (ponder.tasks), else 0.

    Each task verifies in its own way (numeric value, any valid Countdown expression, ...); examples
    without a gold answer or a task get None.
    """
    from ponder.tasks import get_task

    n = len(completions)
    answers = answer if answer is not None else [None] * n
    tasks = task if task is not None else [None] * n
    out = []
    for i, text in enumerate(completions):
        if tasks[i] is None:
            out.append(None)
            continue
        example = {k: v[i] for k, v in columns.items()} | {"answer": answers[i], "task": tasks[i]}
        extracted = extract_answer(text, extract)
        out.append(0.0 if extracted is None else get_task(tasks[i]).verify(extracted, example))
    return out


@register("format")
def format_reward(completions, *, prompts, **_):
    """1 when the completion is exactly one <think> block then one <answer> block (R1-Zero's format)."""
    return [float(bool(STRICT_FORMAT.match(c))) for c in completions]
