"""Cold-start traces for the miniature world: a few readable think/answer solutions, written by rule.

R1's cold start is a few thousand curated long chains of thought in a readable format, supervised
before RL so that RL starts from an answer shape worth reinforcing. In the miniature world the
"curation" is done by construction: each trace works the problem step by step, restates the result,
and closes with the answer in tags. Problems come from the task's own split (train by default), as
RL prompts do; only correct traces are written.
"""

from __future__ import annotations

import random

from ponder.errors import UserError

ENDINGS = ["So the result is {a}.", "So the total is {a}.", "That gives {a}."]


def arithmetic_trace(rng: random.Random, ex: dict) -> str:
    from ponder.tasks.corpus import CorpusConfig, worked_steps

    steps = worked_steps(rng, CorpusConfig(), ex, correct_slip=False)
    return f"{steps} {rng.choice(ENDINGS).format(a=ex['answer'])}"


def countdown_trace(rng: random.Random, ex: dict) -> str:
    from ponder.tasks import countdown as cd

    tokens = ex["answer"].replace("(", " ").replace(")", " ").split()
    nums, ops = [int(t) for t in tokens[::2]], tokens[1::2]
    steps = ", ".join(f"{a} {op} {b} = {r}" for a, op, b, r in cd.chain_steps(nums, ops))
    return f"{steps}. check: {ex['target']} is the target. yes."


TRACES = {"arithmetic": arithmetic_trace, "countdown": countdown_trace}


def coldstart_rows(spec, seed: int = 0) -> list[dict]:
    """{prompt, completion, answer, task} rows for the problems of one TaskSpec."""
    from ponder.tasks import load_examples

    if spec.name not in TRACES:
        raise UserError(f"data.coldstart: no built-in traces for task '{spec.name}'; choose one of: {', '.join(TRACES)}")
    rng = random.Random(f"coldstart/{spec.name}/{seed}")
    rows = []
    for ex in load_examples(spec, seed):
        think = TRACES[spec.name](rng, ex)
        rows.append({"prompt": ex["prompt"], "completion": f" <think> {think} </think> <answer> {ex['answer']} </answer>",
                     "answer": ex["answer"], "task": ex["task"]})
    return rows
