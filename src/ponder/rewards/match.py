"""Is an answer equivalent to the gold? Plain numbers in process, everything else by math-verify in workers.

The tiny world's tasks score thousands of integer answers per step, so plain numbers (integers,
decimals, `a/b`, `\\frac{a}{b}`, thousands separators, a trailing unit word), and sets, intervals and
tuples of them, are compared exactly here, without a process round trip; so are choice letters and
word answers (`Monday`, `yes`), and, against a plain-number gold, text in which math-verify would find
no expression at all (ponder.rewards.math.unparseable: random text, stray tags), which scores 0 there
too. The rest goes to ponder.rewards.math.compare in a worker under a hard time limit; a timeout scores 0.
Hack guards (ponder.rewards.math.hack_reason) run first.

Results are cached by (answer, gold): a GRPO group often repeats an answer many times.
"""

from __future__ import annotations

import logging
import re
import warnings
from fractions import Fraction

from ponder.rewards import verify_pool
from ponder.rewards.math import _TEXT_CMD, hack_reason, strip_wrappers, text_answer, unparseable, word_list

log = logging.getLogger("ponder.rewards")

_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d{1,2})?(/\d+)?$")  # small exponents only: 1e999999999 is a bomb
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_FRAC = re.compile(r"^([-+]?)\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}$")
_THIN_SPACE = re.compile(r"(?<=\d)\\[,;: ](?=\d{3}(?!\d))")
# `72 \text{ thousand}`: math-verify drops the word as a unit, so a scale word gives the number's value here
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "trillion": 10**12, "dozen": 12}
_UNIT_WORD = re.compile(r"^(\S+?)(?:\s*\\(?:text|mbox|mathrm)\{\s*([a-zA-Z]+)\s*\}|\s+([a-zA-Z]{2,}))$")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+)?answer(?:\s+is|\s*:)\s*", re.I)
_LE = r"\s*(<|\\le(?:q)?\b|<=|≤)\s*"
_CHAIN = re.compile(rf"([^<>=≤\\]+?){_LE}[a-zA-Z]{_LE}([^<>=≤\\]+)")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\s*=\s*(?=[-+\d.\\])")  # `x = 5` answers 5
# `12.5\%` against a gold of 12.5 (or 0.125): math-verify takes 25\% for 25 and for 0.25, yet 12.5\% for 0.125 only
_PERCENT = re.compile(r"^(.+?)\s*(?:\\?%|\\text\{\s*percent\s*\}|percent)$")
_PLAIN_GOLD = re.compile(r"^-?\d+(?:\.\d+)?$")  # math-verify parses it: only an answer that parses can match it
# Lower-case words without e or i (Euler's number, the imaginary unit): to math-verify products of symbols or units
# dropped, never a number (tests/test_rewards_junk.py checks it against math-verify). Random text answers so: `kx`, `r`.
_SYMBOL_WORDS = re.compile(r"[a-df-hj-z]+(?:\s+[a-df-hj-z]+)*")
# Words after a number that change its value: not units, so `5 hundred` is not 5, nor `3 tenths` 3 (math-verify
# scores each of these 0 against the bare number).
_MATH_WORDS = {"pi", "sqrt", "ln", "log", "sin", "cos", "tan", "exp", "inf", "infty", "infinity", "hundred", "thousand",
               "million", "billion", "trillion", "percent", "dozen", "squared", "cubed", "factorial", "halves", "thirds",
               "quarters", "times", "more", "less", "minus", "plus", "over", "per", "ish",
               "tens", "dozens", "hundreds", "thousands", "millions", "billions", "trillions", "percents",
               "half", "third", "quarter", "fourth", "fourths", "fifth", "fifths", "sixth", "sixths", "eighth", "eighths",
               "tenth", "tenths", "hundredth", "hundredths", "thousandth", "thousandths",
               "negative", "inverse", "reciprocal"}

_CACHE: dict[tuple[str, str], float | None] = {}
_CACHE_MAX = 200_000
_BAD_GOLDS: set[str] = set()
_COMPARE = "ponder.rewards.math:compare"


def to_number(text: str) -> Fraction | None:
    """Exact value of a plain number (`42`, `-3.5`, `1,000`, `3/4`, `\\frac{3}{4}`, `$18`, `18 apples`)."""
    t = strip_wrappers(text).replace("\\$", "").replace("{,}", ",").replace("\\!", "").strip()
    t = _THIN_SPACE.sub("", t)  # 1\,000: a thousands separator (math-verify reads a product, 1*0)
    if t.startswith("$"):
        t = t[1:].strip()
    m = _UNIT_WORD.match(t)
    if m and (m.group(2) or m.group(3)).lower() not in _MATH_WORDS:
        t = m.group(1)
    if t.lower() in _NUMBER_WORDS:
        return Fraction(_NUMBER_WORDS[t.lower()])
    if _THOUSANDS.match(t):
        t = t.replace(",", "")
    m = _FRAC.match(t)
    if m:
        t = f"{m.group(1)}{m.group(2)}/{m.group(3)}".replace("--", "").replace("-+", "-").replace("+-", "-")
    t = re.sub(r"^([-+])\s+", r"\1", t)
    if not _NUM.match(t):
        return None
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _scaled(text: str) -> Fraction | None:
    """`72 thousand`, `72 \\text{ thousand}`, `12 \\text{ squared}`: the value the word gives the number."""
    m = _UNIT_WORD.match(text.strip())
    if not m:
        return None
    word, n = (m.group(2) or m.group(3)).lower(), to_number(m.group(1))
    if n is None:
        return None
    if word in _SCALES:
        return n * _SCALES[word]
    return {"squared": n**2, "cubed": n**3}.get(word)


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _numbers_differ(a: Fraction, g: Fraction, answer: str, gold: str) -> bool | None:
    """Whether two unequal plain numbers are different answers; None when math-verify's rounding decides.

    math-verify forgives a decimal rounded to 6 places against a non-terminating value (1/3 vs
    0.333333); with fewer decimal places, or when both values terminate, unequal is unequal.
    """
    for other, text in ((g, answer), (a, gold)):
        places = len(text.rsplit(".", 1)[1]) if "." in text else 0
        if places >= 6 and not _terminates(other):
            return None
    return True


def _parts(text: str):
    """(brackets, values) of `\\{1, 2\\}`, `1, 2`, `[0, 1)` or `(2, 3)` made of plain numbers, else None."""
    t = strip_wrappers(text)
    m = _CHAIN.fullmatch(t)
    if m:  # `a <= x < b` is the interval [a, b)
        low, high = to_number(m.group(1)), to_number(m.group(4))
        if low is None or high is None:
            return None
        return ("(" if m.group(2) == "<" else "[") + (")" if m.group(3) == "<" else "]"), [low, high]
    m = re.fullmatch(r"(\\\{|\\left\\\{|[\[(]?)(.*?)(\\\}|\\right\\\}|[\])]?)", t, re.DOTALL)
    if not m or ("," not in m.group(2) and "{" not in m.group(1)):
        return None
    values = [to_number(v) for v in m.group(2).split(",")]
    if any(v is None for v in values):
        return None
    opening, closing = m.group(1).replace("\\left", ""), m.group(3).replace("\\right", "")
    if bool(opening) != bool(closing):
        return None
    return opening + closing, values


def _choice(text: str) -> str | None:
    m = re.fullmatch(r"\(?([A-Ea-e])\)?", _TEXT_CMD.sub(r"\1", strip_wrappers(text)).strip())
    return m.group(1) if m else None


def _fast(answer: str, gold: str) -> float | None:
    """The verdict when it needs no math-verify, else None."""
    if hack_reason(answer, gold):
        return 0.0
    g = to_number(gold)
    if g is not None:
        value = _ASSIGNMENT.sub("", answer)
        pct = _PERCENT.match(strip_wrappers(value).strip())
        if pct is not None and (p := to_number(pct.group(1))) is not None:
            if g in (p, p / 100):
                return 1.0
            return 0.0 if _numbers_differ(p, g, answer, gold) and _numbers_differ(p / 100, g, answer, gold) else None
        a = to_number(value)
        if a is None:
            a = _scaled(strip_wrappers(value))
        if a is not None:
            if a == g:
                return 1.0
            return 0.0 if _numbers_differ(a, g, answer, gold) else None
        if _SYMBOL_WORDS.fullmatch(answer):
            return 0.0
        parts = _parts(answer)
        if parts is not None and parts[0] in ("", "\\{\\}") and len(set(parts[1])) > 1:
            return 0.0  # several values for a single-number gold
        if _PLAIN_GOLD.match(gold) and unparseable(answer):
            return 0.0  # text math-verify finds no expression in (random text, a stray tag): what a worker would say
        return None
    gt = text_answer(gold)
    if gt is not None:
        return float(text_answer(answer) == gt)
    gw = word_list(gold)
    if gw is not None:  # words compared case-folded part by part, in any order as number lists are (math-verify
        aw = word_list(answer)  # would read capitals as symbols: PARIS, FRANCE against Paris, France scored 0)
        return float(aw is not None and set(aw) == set(gw))
    gc = _choice(gold)
    if gc is not None and gc.isupper():  # a multiple-choice letter
        ac = _choice(answer)
        return None if ac is None else float(ac.upper() == gc)
    gp, ap = _parts(gold), _parts(answer)
    if gp is not None and ap is not None and all(_terminates(v) for v in gp[1] + ap[1]):
        if gp[0] in ("\\{\\}", "") and ap[0] in ("\\{\\}", ""):  # sets and solution lists: order and repeats do not matter
            return float(set(gp[1]) == set(ap[1]))
        if gp[0] == ap[0]:  # intervals and tuples of the same kind: element by element
            return float(gp[1] == ap[1])
        if len(gp[0]) == len(ap[0]) == 2 and "{" not in gp[0] + ap[0]:
            return 0.0  # intervals with different ends
    return None


def _normalize(answer: str | None, gold) -> tuple[str | None, str]:
    """Answer without "The answer is", with ASCII minus signs and LaTeX degrees (math-verify reads no `°`); gold
    without wrappers."""
    if answer is not None:
        answer = _ANSWER_PREFIX.sub("", answer.strip().replace("\u2212", "-").replace("°", "^\\circ"))
    return answer, strip_wrappers(str(gold).replace("\u2212", "-").replace("°", "^\\circ"))


def _report_bad_gold(gold: str) -> None:
    if gold not in _BAD_GOLDS:
        _BAD_GOLDS.add(gold)
        warnings.warn(f"gold answer {gold[:200]!r} cannot be parsed as math; its examples are skipped (reward None). Fix the data's answer field.", stacklevel=3)


def _from_worker(result, answer: str, gold: str) -> float | None:
    if result is verify_pool.TIMEOUT:
        log.debug("verification of %r against %r ran past the time limit; scored 0", answer[:80], gold[:80])
        return 0.0
    if isinstance(result, Exception):
        log.debug("verification of %r against %r failed (%s); scored 0", answer[:80], gold[:80], result)
        return 0.0
    return result


def _store(key, value) -> None:
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = value


def prefetch(pairs: list[tuple[str | None, object]]) -> None:
    """Verify many (answer, gold) pairs at once, spread over the workers; later calls hit the cache."""
    todo: dict[tuple[str, str], None] = {}
    for answer, gold in pairs:
        if gold is None or answer is None:
            continue
        a, g = _normalize(answer, gold)
        key = (a, g)
        if not a or not g or key in _CACHE or g in _BAD_GOLDS:
            continue
        fast = _fast(a, g)
        if fast is not None:
            _store(key, fast)
        else:
            todo[key] = None
    keys = list(todo)
    if not keys:  # every pair decided here: the pool is not even looked up
        return
    for key, result in zip(keys, verify_pool.pool().map(_COMPARE, keys)):
        _store(key, _from_worker(result, *key))


def _match(answer: str | None, gold, report: bool) -> float | None:
    if gold is None:
        return None
    a, g = _normalize(answer, gold)
    if not g or g in _BAD_GOLDS:
        if report:
            _report_bad_gold(g)
        return None
    if not a:
        return 0.0
    key = (a, g)
    if key not in _CACHE:
        fast = _fast(a, g)
        if fast is None:
            (result,) = verify_pool.pool().map(_COMPARE, [key])
            fast = _from_worker(result, a, g)
        _store(key, fast)
    value = _CACHE[key]
    if value is None and report:
        _report_bad_gold(g)
    return value


def answers_match(answer: str | None, gold) -> float | None:
    """1.0 when the answer is mathematically equivalent to the gold, else 0.0.

    None when there is no gold, or when the gold cannot be parsed (reported once by a warning).
    """
    return _match(answer, gold, report=True)


def equivalent(a: str, b: str) -> bool:
    """Whether two answers are the same (`1/2`, `0.5`, `\\frac{1}{2}`); for majority voting."""
    if a is None or b is None:
        return False
    if strip_wrappers(a) == strip_wrappers(b):
        return True
    return _match(a, b, report=False) == 1.0 or _match(b, a, report=False) == 1.0
