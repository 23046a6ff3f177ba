"""Hash partition of procedural problems into test, train and corpus.

A problem's partition is a function of the problem alone (its canonical key), never of a seed or of
the order problems were drawn in. So the test items, the RL prompts and the pretraining corpus are
disjoint by construction, for every seed and every size asked for.
"""

from __future__ import annotations

import hashlib
from typing import Callable

from ponder.errors import UserError

# Buckets out of 100: 10% test, 40% train, 50% corpus.
PARTS = {"test": range(0, 10), "train": range(10, 50), "corpus": range(50, 100)}


def partition_of(key: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100
    return next(name for name, buckets in PARTS.items() if bucket in buckets)


def draw_unique(draw: Callable[[], dict], key: Callable[[dict], str], part: Callable[[dict], str], split: str,
                n: int | None, task: str, default: int = 2000) -> list[dict]:
    """`n` distinct problems (by `key`) from `draw()` whose partition (`part`) is `split`. Without `n`, up to `default`
    of them: all a level holds where it holds fewer (countdown's easy level has 813 train problems; its default of
    2,000 always failed), told apart from a level drawn dry by 50,000 draws in a row that find nothing new."""
    if split not in PARTS:
        raise UserError(f"task '{task}': unknown split '{split}'; choose train, test or corpus")
    want = n or default
    seen: set[str] = set()
    out: list[dict] = []
    tries = misses = 0
    while len(out) < want:
        tries += 1
        if tries > 200 * want + 10_000 or (n is None and misses > 50_000):
            if n is None:
                break
            raise UserError(
                f"task '{task}': only {len(out)} distinct '{split}' problems found at this difficulty; "
                f"ask for fewer (n) or a harder level"
            )
        ex = draw()
        k = key(ex)
        if k in seen or part(ex) != split:
            misses += 1
            continue
        misses = 0
        seen.add(k)
        out.append(ex)
    return out
