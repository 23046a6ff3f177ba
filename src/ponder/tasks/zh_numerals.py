"""Chinese numerals for 0-9999, written and read in their one standard form (the bilingual world's numbers).

Standard form: 十二 (not 一十二) for 10-19; 一百一十 for 110 (a ten after a higher unit keeps its 一);
one 零 for each run of zeros between non-zero digits (一千零五 = 1005, 一千零一十 = 1010); no
trailing 零; 二 (not the colloquial 两) before every unit. Reading accepts this form only: 一百五
(colloquial 150, or 105 misread) and 两百 are refused, so a verifier built on it is exact.
"""

from __future__ import annotations

DIGITS = "零一二三四五六七八九"
UNITS = {"千": 1000, "百": 100, "十": 10}
LIMIT = 10_000  # 万 and beyond are not part of the miniature world


def to_zh(n: int) -> str:
    """The standard Chinese numeral of a whole number 0 <= n < 10000."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n < LIMIT:
        raise ValueError(f"to_zh: {n!r} is not a whole number in 0..{LIMIT - 1}")
    if n == 0:
        return DIGITS[0]
    parts, gap, started = [], False, False
    for unit, place in [("千", 1000), ("百", 100), ("十", 10), ("", 1)]:
        d = n // place % 10
        if d == 0:
            gap = gap or started  # zeros count only once something has been written
            continue
        if gap:
            parts.append(DIGITS[0])
            gap = False
        parts.append(DIGITS[d] + unit)
        started = True
    text = "".join(parts)
    return text[1:] if 10 <= n < 20 else text  # 十二, not 一十二


def from_zh(text: str) -> int | None:
    """The value of a standard Chinese numeral; None for anything else (other characters, a colloquial
    or malformed numeral). Exact by construction: a reading is accepted only if writing it back gives
    the same text."""
    if not text or len(text) > 12:
        return None
    total, digit = 0, None
    for ch in text:
        if ch == DIGITS[0]:
            continue  # position is checked by the round trip below
        if ch in DIGITS:
            if digit is not None:  # two digits in a row: 二二
                return None
            digit = DIGITS.index(ch)
        elif ch in UNITS:
            total += (1 if digit is None else digit) * UNITS[ch]
            digit = None
        else:
            return None
    total += digit or 0
    return total if total < LIMIT and to_zh(total) == text else None
