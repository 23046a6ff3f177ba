"""Answer equivalence for plain answers: exact text, else numeric value. The math reward upgrades this."""

from __future__ import annotations

from fractions import Fraction
import re

_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?$")


def to_number(text: str) -> Fraction | None:
    t = text.strip().replace(",", "").replace(" ", "").rstrip(".")
    if not _NUM.match(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(answer: str | None, gold) -> float | None:
    """1.0 when the answer equals the gold by text or by value, 0.0 otherwise; None without a gold."""
    if gold is None:
        return None
    if answer is None:
        return 0.0
    a, g = answer.strip(), str(gold).strip()
    if not a:
        return 0.0
    if a == g:
        return 1.0
    na, ng = to_number(a), to_number(g)
    return float(na is not None and na == ng)
