"""Countdown: reach a target with the given numbers and + - * /. Any valid expression is right.

The rules the verifier enforces: every number in the expression is one of the given numbers, used no
more often than it is given; only + - * / and parentheses; every intermediate result is an integer
(exact division only). The expression is parsed with `ast` and evaluated by walking the tree with
exact fractions; the text is never passed to `eval`.

Targets are the value of a random chain over all the numbers, so one solution always exists, but a
first guess rarely hits it (about 1 in 10 for three numbers): checking the result and trying another
expression pays, which is what this task is for.
"""

from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

from ponder.tasks import Task, difficulty_names, register
from ponder.tasks.partition import draw_unique, partition_of

# count: how many numbers; low/high: their range; ops: the operators the target's chain is built from.
LEVELS = {
    "easy": dict(count=3, low=1, high=15, ops="+-"),
    "medium": dict(count=3, low=1, high=12, ops="+-*"),
    "hard": dict(count=4, low=1, high=12, ops="+-*"),
    "expert": dict(count=5, low=1, high=20, ops="+-*/"),
}
MAX_TARGET = 200
MAX_EXPR_CHARS = 200

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_SYMBOLS = [("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"), ("÷", "/"), ("−", "-"),
            ("–", "-"), ("\\left", ""), ("\\right", ""), ("[", "("), ("]", ")"), ("{", "("), ("}", ")")]


def apply(op: str, a, b):
    """a op b, or None when the step is not allowed (division by zero or inexact division)."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0 or a % b:
        return None
    return a // b


def chain_value(nums: list[int], ops: list[str]) -> int | None:
    """Value of ((n0 op n1) op n2) ...; None when a step is not allowed or goes below zero."""
    total = nums[0]
    for op, x in zip(ops, nums[1:]):
        total = apply(op, total, x)
        if total is None or total < 0:
            return None
    return total


def chain_steps(nums: list[int], ops: list[str]) -> list[tuple[int, str, int, int]]:
    """(left, op, right, result) for each step of a valid chain."""
    steps, total = [], nums[0]
    for op, x in zip(ops, nums[1:]):
        new = apply(op, total, x)
        steps.append((total, op, x, new))
        total = new
    return steps


def chain_expression(nums: list[int], ops: list[str]) -> str:
    """The chain as an expression with the brackets it needs: (7 + 5) * 3, 7 * 3 + 5."""
    text, prec = str(nums[0]), 3
    for op, x in zip(ops, nums[1:]):
        p = 1 if op in "+-" else 2
        if prec < p:
            text = f"({text})"
        text, prec = f"{text} {op} {x}", p
    return text


def random_chain(rng: random.Random, nums: list[int], ops: str) -> tuple[list[int], list[str]]:
    order = rng.sample(nums, len(nums))
    return order, [rng.choice(ops) for _ in order[1:]]


def problem_key(numbers: list[int], target: int) -> str:
    return f"countdown:{','.join(map(str, sorted(numbers)))}->{target}"


def prompt_of(numbers: list[int], target: int) -> str:
    return f"Using the numbers {', '.join(map(str, numbers))}, make {target}. Use + - * / and each number at most once"


def sample_problem(rng: random.Random, params: dict) -> dict:
    while True:
        nums = [rng.randint(params["low"], params["high"]) for _ in range(params["count"])]
        order, ops = random_chain(rng, nums, params["ops"])
        target = chain_value(order, ops)
        if target is not None and 1 <= target <= MAX_TARGET and target not in nums:
            break
    return {
        "prompt": prompt_of(nums, target), "answer": chain_expression(order, ops), "task": "countdown",
        "numbers": nums, "target": target, "difficulty": params["level"],
    }


def level_params(difficulty) -> list[dict]:
    return [dict(LEVELS[name], level=name) for name in difficulty_names("countdown", difficulty, LEVELS)]


class InvalidExpression(ValueError):
    pass


def _sides(text: str) -> list[str]:
    """The parts of an answer between its `=` signs, with the symbols and the `x` of multiplication made Python's."""
    text = text.strip().strip("$").strip()
    for a, b in _SYMBOLS:
        text = text.replace(a, b)
    text = re.sub(r"(?<=[\d)])\s*[xX]\s*(?=[\d(])", "*", text)  # 7 x 3, (7 + 5) x 3
    return [s.strip().rstrip(".").strip() for s in text.split("=")]


def _normalise(text: str) -> str:
    sides = _sides(text)  # "7 * 3 + 5 = 26" or "26 = 7 * 3 + 5": the side that is not a bare number
    return next((s for s in sides if s and not s.isdigit()), sides[0])


def stated_values(text: str) -> list[int]:
    """The bare numbers an answer states beside its expression (`... = 26`, `26 = ...`): the verifier holds each to
    the target, or `7 * 3 + 5 = 1000` would score for 26."""
    sides = _sides(text)
    return [int(s) for s in sides if s.isdigit()] if len(sides) > 1 else []


def evaluate(text: str, numbers: list[int]) -> Fraction:
    """Exact value of an expression over `numbers`; raises InvalidExpression when it breaks a rule."""
    text = _normalise(text)
    if not text or len(text) > MAX_EXPR_CHARS:
        raise InvalidExpression("empty or too long")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise InvalidExpression("not an expression") from None
    used: Counter = Counter()

    def walk(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = walk(node.left), walk(node.right)
            op = _OPS[type(node.op)]
            if op == "/":
                if b == 0:
                    raise InvalidExpression("division by zero")
                value = a / b
            else:
                value = a + b if op == "+" else a - b if op == "-" else a * b
            if value.denominator != 1:
                raise InvalidExpression("non-integer intermediate result")
            return value
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used[node.value] += 1
            return Fraction(node.value)
        raise InvalidExpression(f"{type(node).__name__} is not allowed")

    try:
        value = walk(tree.body)
    except RecursionError:
        raise InvalidExpression("too deeply nested") from None
    given = Counter(numbers)
    for x, k in used.items():
        if k > given[x]:
            raise InvalidExpression(f"{x} used {k} times but given {given[x]} times")
    return value


@register
class Countdown(Task):
    """Reach `target` with `numbers`. Options: difficulty (easy|medium|hard|expert|mixed, or a list)."""

    name = "countdown"

    def load(self, split="train", n=None, seed=0, difficulty="medium", **_):
        levels = level_params(difficulty)
        default = 200 if split == "test" else 2000
        rng = random.Random(f"countdown/{split}/{difficulty}/{seed}")
        return draw_unique(
            lambda: sample_problem(rng, rng.choice(levels)), key=lambda ex: problem_key(ex["numbers"], ex["target"]),
            part=split_of, split=split, n=n, task=self.name, default=default,
        )

    def verify(self, answer, example):
        if answer is None:
            return 0.0
        if "numbers" not in example or "target" not in example:
            return None
        target = int(example["target"])
        if any(v != target for v in stated_values(answer)):
            return 0.0
        try:
            return float(evaluate(answer, list(example["numbers"])) == target)
        except InvalidExpression:
            return 0.0


def split_of(example: dict) -> str:
    return partition_of(problem_key(example["numbers"], example["target"]))
