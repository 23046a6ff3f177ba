"""The statistics papers report: unbiased pass@k, cons@k (majority vote), bootstrap intervals."""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

REFLECTION_WORDS = ("wait", "verify", "check", "mistake", "however", "recheck")


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


def equivalence() -> Callable[[str, str], bool]:
    """Mathematical equivalence of two answers: `rewards.match.equivalent` where it exists, else value/text match."""
    try:
        from ponder.rewards.match import equivalent

        return equivalent
    except ImportError:
        from ponder.rewards.match import answers_match

        return lambda a, b: answers_match(a, b) == 1.0


def vote_groups(answers: Sequence[str | None], same: Callable[[str, str], bool] | None = None) -> list[int | None]:
    """Group index of each answer; an answer joins the first earlier group whose first answer it equals.

    Groups are numbered in order of first occurrence. Missing or empty answers get None: they cast no vote.
    Comparing with each group's first answer (not every member) keeps grouping deterministic even where
    equivalence is not transitive.
    """
    same = same or equivalence()
    heads: list[str] = []
    out: list[int | None] = []
    for a in answers:
        a = a.strip() if a is not None else ""
        if not a:
            out.append(None)
            continue
        for g, head in enumerate(heads):
            if a == head or same(a, head):
                out.append(g)
                break
        else:
            heads.append(a)
            out.append(len(heads) - 1)
    return out


def majority(groups: Sequence[int | None]) -> int | None:
    """The group with the most votes; ties go to the group that appeared first (lowest index). None if no votes."""
    counts: dict[int, int] = {}
    for g in groups:
        if g is not None:
            counts[g] = counts.get(g, 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda g: (-counts[g], g))


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


def reflection_pattern(words: Sequence[str] = REFLECTION_WORDS) -> re.Pattern:
    """Matches any of `words` as a whole word, ignoring case."""
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
