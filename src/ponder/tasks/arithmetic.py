"""Multi-step integer arithmetic: chains such as `23 + 45 - 17 + 8`, evaluated left to right.

The direct answer to a long chain is hard for a tiny model; writing the running total step by step
makes each step a two-number sum it can do. Running totals never go below zero, so every step is an
operation on non-negative integers.

Which split a problem belongs to is decided by a hash of the problem itself (`ponder.tasks.partition`),
so a test problem can never be drawn for training or for the pretraining corpus, whatever the seed.
The hash is of the chain's first three numbers and two operators: all chains that begin alike share a
partition, so no corpus chain is a prefix or an extension of a test or training chain. Chains have at
least three numbers; two-number sums are the steps of every worked solution, not problems.
"""

from __future__ import annotations

import random

from ponder.errors import UserError
from ponder.rewards.match import to_number
from ponder.tasks import Task, difficulty_names, register, whole_number
from ponder.tasks.partition import draw_unique, partition_of

# operands: inclusive range of the chain's length; low/high: range of each number.
LEVELS = {
    "easy": dict(operands=(3, 3), low=1, high=20),
    "medium": dict(operands=(3, 4), low=1, high=50),
    "hard": dict(operands=(3, 5), low=10, high=99),
    "expert": dict(operands=(6, 8), low=10, high=99),
}


def make_chain(rng: random.Random, operands: int, low: int, high: int) -> tuple[list[int], list[str]]:
    """Numbers and operators of one chain; a subtraction that would go below zero becomes an addition."""
    nums = [rng.randint(low, high) for _ in range(operands)]
    ops, total = [], nums[0]
    for x in nums[1:]:
        op = rng.choice("+-")
        if op == "-" and x > total:
            op = "+"
        total = total + x if op == "+" else total - x
        ops.append(op)
    return nums, ops


def expression(nums: list[int], ops: list[str]) -> str:
    return " ".join([str(nums[0])] + [f"{op} {x}" for op, x in zip(ops, nums[1:])])


def running_totals(nums: list[int], ops: list[str]) -> list[int]:
    """The value after each step: totals[i] is the result of the first i + 2 numbers."""
    totals, total = [], nums[0]
    for op, x in zip(ops, nums[1:]):
        total = total + x if op == "+" else total - x
        totals.append(total)
    return totals


def problem_key(expr: str) -> str:
    """The hashed key: the first three numbers and their two operators."""
    return "arithmetic:" + " ".join(expr.split()[:5])


def prompt_of(expr: str) -> str:
    return f"Compute {expr}"


def level_params(difficulty, operands=None, low=None, high=None) -> list[dict]:
    """The level settings to draw from: one level, several (drawn uniformly), or explicit ranges."""
    out = []
    for name in difficulty_names("arithmetic", difficulty, LEVELS):
        p = dict(LEVELS[name], level=name)
        if operands is not None:
            lo_hi = operands if isinstance(operands, (list, tuple)) else (operands, operands)
            lo_hi = [whole_number("arithmetic", "operands", v) for v in lo_hi]
            if len(lo_hi) != 2 or not 3 <= lo_hi[0] <= lo_hi[1]:
                raise UserError("task 'arithmetic': operands must be a number >= 3 or a range [min, max] with min >= 3")
            p["operands"] = tuple(lo_hi)
        p["low"] = p["low"] if low is None else whole_number("arithmetic", "low", low)
        p["high"] = p["high"] if high is None else whole_number("arithmetic", "high", high)
        if not 0 <= p["low"] <= p["high"]:
            raise UserError("task 'arithmetic': need 0 <= low <= high")
        out.append(p)
    return out


def sample_problem(rng: random.Random, params: dict) -> dict:
    nums, ops = make_chain(rng, rng.randint(*params["operands"]), params["low"], params["high"])
    expr = expression(nums, ops)
    return {
        "prompt": prompt_of(expr), "answer": str(running_totals(nums, ops)[-1]), "task": "arithmetic",
        "difficulty": params["level"], "operands": len(nums), "expression": expr,
    }


@register
class Arithmetic(Task):
    """Left-to-right chains of + and -. Options: difficulty (easy|medium|hard|expert|mixed, or a list),
    operands (n or [min, max]), low and high (range of each number)."""

    name = "arithmetic"

    def load(self, split="train", n=None, seed=0, difficulty="hard", operands=None, low=None, high=None, **_):
        levels = level_params(difficulty, operands, low, high)
        default = 200 if split == "test" else 2000
        rng = random.Random(f"arithmetic/{split}/{difficulty}/{operands}/{low}/{high}/{seed}")
        return draw_unique(
            lambda: sample_problem(rng, rng.choice(levels)), key=lambda ex: ex["expression"],
            part=lambda ex: split_of(ex["expression"]), split=split, n=n, task=self.name, default=default,
        )

    def verify(self, answer, example):
        """1 when the answer is the number itself ("85", "85.", "= 85"); an expression such as
        "86 - 66 + 65" is not an answer, or echoing the question would score."""
        gold = example.get("answer")
        if gold is None:
            return None
        if answer is None:
            return 0.0
        if "=" in answer:  # "23 + 45 = 68" or "x = 68" commit to what follows the last "="
            answer = answer.rsplit("=", 1)[1]
        value = to_number(answer.strip().rstrip("."))
        return float(value is not None and value == int(gold))


def split_of(expr: str) -> str:
    return partition_of(problem_key(expr))
