"""Penalty on repeated n-grams, which long chains of thought fall into (Yeo et al. 2025, arXiv 2502.03373)."""

from __future__ import annotations

from ponder.errors import UserError
from ponder.rewards import register


@register("repetition")
def repetition(completions, *, prompts, n: int = 3, max_penalty: float = -1.0, **_):
    """Penalizes repeated word n-grams: max_penalty * (1 - distinct/total n-grams) (Yeo et al. 2025; open-r1's form).

    0 for a completion without repeats (or shorter than n words); it nears max_penalty as one
    n-gram repeats over and over.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"reward 'repetition': n must be a positive integer, got {n!r}")
    if isinstance(max_penalty, bool) or not isinstance(max_penalty, (int, float)) or max_penalty > 0:
        raise UserError(f"reward 'repetition': max_penalty must be a number <= 0 (a penalty), got {max_penalty!r}")
    out = []
    for text in completions:
        words = text.lower().split()
        grams = list(zip(*(words[i:] for i in range(n))))
        out.append(0.0 if not grams else max_penalty * (1 - len(set(grams)) / len(grams)) + 0.0)
    return out
