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
    2,000 always failed). Either way a level is drawn dry after a run of misses (`dry`); an `n` past what it holds is
    then one line, where 200 * n draws were allowed (n=100,000 of countdown's easy level: minutes of drawing)."""
    if split not in PARTS:
        raise UserError(f"task '{task}': unknown split '{split}'; choose train, test or corpus")
    want = n or default
    seen: set[str] = set()
    out: list[dict] = []
    tries = misses = 0
    while len(out) < want:
        if dry(misses, tries - misses):
            if n is None:
                break
            raise UserError(
                f"task '{task}': only {len(out)} distinct '{split}' problems found at this difficulty; "
                f"ask for fewer (n) or a harder level"
            )
        tries += 1
        ex = draw()
        k = key(ex)
        if k in seen or part(ex) != split:
            misses += 1
            continue
        misses = 0
        seen.add(k)
        out.append(ex)
    return out


def dry(misses: int, before: int) -> bool:
    """Whether a run of `misses` draws that found nothing new, after `before` draws, means the level holds no more.
    The last problems of a level are its rarest, and their waits grow with the draws already made: 50,000 misses in a
    row (the rule without n) cut short a draw of all of countdown's hard test problems (6,692; the rarest comes once
    in 311,109 draws) every time, and of arithmetic's easy train problems (8,166) one time in four. Three times the
    draws before the run, and at least 100,000, cut short none of 20,000 simulated draws of all the problems of each
    split of arithmetic's easy level and countdown's easy, medium and hard ones (exact draw probabilities); the other
    levels hold over a million problems."""
    return misses > max(100_000, 3 * before)
