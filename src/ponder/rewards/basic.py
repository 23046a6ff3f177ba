"""Accuracy, R1-Zero's rule-checked reward: the extracted answer passes the example's task verifier."""

from __future__ import annotations

from ponder.rewards import register
from ponder.rewards import match
from ponder.rewards.extract import extract_answer


def _uses_answers_match(task) -> bool:
    from ponder.tasks import Task

    return type(task).verify is Task.verify or getattr(task, "matches_answers", False)


@register("accuracy", columns=("answer", "task", "think_opened"))
def accuracy(completions, *, prompts, answer=None, task=None, extract: str = "tags_or_boxed", think_opened=None, **columns):
    """Rewards a right final answer: 1 when the extracted answer passes the task's verifier (DeepSeek-R1).

    Each task verifies in its own way (mathematical equivalence by default, any valid Countdown
    expression, a reasoning-gym scorer, ...). Examples without a task get None; a completion that
    commits to no answer gets 0.
    """
    from ponder.tasks import get_task

    n = len(completions)
    answers = answer if answer is not None else [None] * n
    tasks = task if task is not None else [None] * n
    opened = think_opened if think_opened is not None else [False] * n
    extracted = [extract_answer(text, extract, bool(o)) for text, o in zip(completions, opened)]
    # One batched pass over the verification workers instead of one round trip per completion.
    match.prefetch([(extracted[i], answers[i]) for i in range(n)
                    if tasks[i] is not None and extracted[i] is not None and _uses_answers_match(get_task(tasks[i]))])
    out = []
    for i in range(n):
        if tasks[i] is None or (answers[i] is None and _uses_answers_match(get_task(tasks[i]))):
            out.append(None)  # nothing to score against (an open task's row): None whatever was answered, not 0
        elif extracted[i] is None:
            out.append(0.0)
        else:
            example = {k: v[i] for k, v in columns.items()} | {"answer": answers[i], "task": tasks[i]}
            out.append(get_task(tasks[i]).verify(extracted[i], example))
    return out
