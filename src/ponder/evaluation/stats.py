"""The statistics papers report: unbiased pass@k, cons@k (majority vote), bootstrap intervals."""

from __future__ import annotations

import ast
import re
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. 2021 for n samples of which c are correct: 1 - C(n-c,k)/C(n,k).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_ks(k: int) -> list[int]:
    """The k' reported for k samples: powers of two up to k, and k itself."""
    out = [1 << i for i in range(k.bit_length()) if 1 << i <= k]
    return out if out[-1] == k else [*out, k]


MAX_TEXT_HEADS = 8  # distinct non-numeric answers to one problem beyond which math-verify is not asked
MAX_MATH_CHARS = 100  # longer answers (code, prose) vote by their exact text


def equivalence() -> Callable[[str, str], bool]:
    """Mathematical equivalence of two answers: `rewards.match.equivalent` where it exists, else value/text match."""
    try:
        from ponder.rewards.match import equivalent

        return equivalent
    except ImportError:
        from ponder.rewards.match import answers_match

        return lambda a, b: answers_match(a, b) == 1.0


_ARITH = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.USub, ast.UAdd, ast.Constant)


def _arithmetic(text: str) -> Fraction | None:
    """Exact value of +-*/ arithmetic on plain numbers (a Countdown answer), else None."""
    t = text.replace("\\times", "*").replace("\\cdot", "*").replace("\\div", "/").replace("×", "*").replace("÷", "/")
    if len(t) > 200 or not re.fullmatch(r"[\d\s.+\-*/()]+", t) or "**" in t or "//" in t:
        return None
    try:
        tree = ast.parse(t, mode="eval")
    except SyntaxError:
        return None
    if not all(isinstance(n, _ARITH) for n in ast.walk(tree)):
        return None

    def value(n):
        if isinstance(n, ast.Expression):
            return value(n.body)
        if isinstance(n, ast.Constant):
            return Fraction(str(n.value))
        if isinstance(n, ast.UnaryOp):
            return -value(n.operand) if isinstance(n.op, ast.USub) else value(n.operand)
        a, b = value(n.left), value(n.right)
        return a + b if isinstance(n.op, ast.Add) else a - b if isinstance(n.op, ast.Sub) else a * b if isinstance(n.op, ast.Mult) else a / b

    try:
        return value(tree)
    except (ZeroDivisionError, ValueError, TypeError):
        return None


def exact_key(answer: str | None) -> tuple | None:
    """A cheap exact identity: ("value", Fraction) for numbers and arithmetic on them, else the spacing-free
    text, as ("long", text) for answers that are no formula (several lines, or code-sized), else ("text", text)."""
    if answer is None or not answer.strip():
        return None
    from ponder.rewards.match import to_number

    text = "".join(answer.split()).strip("$")
    number = to_number(answer)
    if number is None:  # with its spaces: `1 2 3` is no number (without them it was 123, and voted with it)
        number = _arithmetic(answer.strip().strip("$").strip())
    if number is not None:
        return ("value", number)
    return ("long", text) if len(answer.strip()) > MAX_MATH_CHARS or "\n" in answer.strip() else ("text", text)


def vote_groups(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> list[int | None]:
    """Group index of each answer (numbered in order of first occurrence); missing or empty answers get None.

    First, answers with the same exact key (equal values, or equal text up to spacing) share a group, in
    process. Then each group joins the first earlier group whose first answer is `same` (math-verify
    equivalence by default), which keeps grouping deterministic even where equivalence is not transitive. Two exact values
    that differ are not compared again, nor are answers that are no formula (several lines or longer than
    MAX_MATH_CHARS: code, prose), and where a problem has more than MAX_TEXT_HEADS distinct
    non-numeric answers (an untrained model's noise) they stay apart: each comparison costs a math-verify
    call, and their number grows with the square of the distinct answers.
    """
    keys = [exact_key(a) for a in answers]
    first: dict[tuple, int] = {}  # exact key -> index of its first answer
    for i, key in enumerate(keys):
        if key is not None:
            first.setdefault(key, i)
    heads = list(first.values())
    merge = sum(keys[h][0] == "text" for h in heads) <= MAX_TEXT_HEADS

    def comparable(i, j):
        kinds = {keys[i][0], keys[j][0]}
        return merge and kinds != {"value"} and "long" not in kinds

    pairs = [(answers[j], answers[i]) for n, j in enumerate(heads) for i in heads[:n] if comparable(i, j)]
    if same is None:
        same = equivalence()
        _prefetch(pairs)
    group_of_head: dict[int, int] = {}
    leaders: list[int] = []  # the first answer of each final group
    for j in heads:
        g = next((g for g, i in enumerate(leaders) if comparable(i, j) and same(answers[j].strip(), answers[i].strip())), None)
        if g is None:
            leaders.append(j)
            g = len(leaders) - 1
        group_of_head[j] = g
    return [None if key is None else group_of_head[first[key]] for key in keys]


def _prefetch(pairs: list[tuple[str, str]]) -> None:
    """Let math-verify's workers compare the pairs in parallel; the votes then read its cache."""
    try:
        from ponder.rewards.match import prefetch
    except ImportError:
        return
    prefetch([(a.strip(), b.strip()) for a, b in pairs] + [(b.strip(), a.strip()) for a, b in pairs])


def majority(groups: Sequence[int | None]) -> int | None:
    """The group with the most votes; ties go to the group that appeared first (lowest index). None if no votes."""
    counts: dict[int, int] = {}
    for g in groups:
        if g is not None:
            counts[g] = counts.get(g, 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda g: (-counts[g], g))


def voted_answer(answers: Sequence[str | None], groups: Sequence[int | None], win: int) -> str:
    """The answer that speaks for group `win`: its most frequent text (up to spacing), ties to the first. Answers of one
    value can differ in what a task checks (Countdown: `2*8` and `(3+5)*2` are both 16, and only one uses the given
    numbers): the group's first answer decided cons@k, so the order of the samples did, not the majority."""
    members = [a for a, g in zip(answers, groups) if g == win]
    counts: dict[str, int] = {}
    for a in members:
        key = "".join(a.split())
        counts[key] = counts.get(key, 0) + 1
    return max(members, key=lambda a: counts["".join(a.split())])  # max keeps the first of equal counts


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of `values` (one value per problem), seeded."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))
