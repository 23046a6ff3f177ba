"""A trivially verifiable task for smoke tests: answer with a number whose first digit is given."""

from __future__ import annotations

import random

from ponder.errors import UserError
from ponder.tasks import Task, register


@register
class FirstDigit(Task):
    """Prompts ask for a number; the answer is right when it starts with `digit` (default 7).

    A random model starts near 1/vocab; GRPO must find and keep the rewarded first token.
    """

    name = "first_digit"

    def load(self, split="train", n=None, seed=0, digit: int = 7, **_):
        if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9:  # (null, [1]: every answer wrong)
            raise UserError(f"task 'first_digit': option digit must be one of 0-9; got {digit!r}")
        if split not in ("train", "test"):  # (any name gave the same kind of prompts, unsaid)
            raise UserError(f"task 'first_digit': unknown split '{split}'; choose train or test")
        rng = random.Random(f"first_digit/{split}/{seed}")
        n = n or 256
        words = ["a number", "some digits", "a value", "a count", "an amount", "a code"]
        return [
            {"prompt": f"Write {rng.choice(words)} #{rng.randrange(10**6)}:", "answer": str(digit), "digit": digit}
            for _ in range(n)
        ]

    def verify(self, answer, example):
        return float(answer.strip().startswith(str(example["digit"])))
