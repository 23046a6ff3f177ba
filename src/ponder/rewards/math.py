"""Mathematical answer comparison: cheap guards against reward hacks, and math-verify (run in workers).

`hack_reason`, `unparseable` and the normalisers run in the trainer's process (regexes only); `compare` runs inside a
verification worker (ponder.rewards.verify_pool) because sympy can take unbounded time on a hostile
answer. math-verify (huggingface/Math-Verify) does the equivalence: fractions vs decimals, `x=2` vs `2`,
sets, intervals, percentages, LaTeX.
"""

from __future__ import annotations

import functools
import re

MAX_ANSWER_CHARS = 500  # longer answers are wrong without parsing (a final answer is short)
MAX_NESTING = 30  # brace depth; real answers nest a few levels, LaTeX bombs thousands

_NEGATION = re.compile(r"\b(?:not|no|never|isn't|aren't|except|neither|nor|cannot|can't)\b|\\neq?\b|\\not\b|≠", re.I)
_HEDGE = re.compile(r"\b(?:or|and|either|maybe|perhaps|possibly|probably|might)\b|\\(?:lor|vee|pm|mp)\b|±|\bvs\.?", re.I)
_ELLIPSIS = re.compile(r"\.\.\.|…|\\[lc]?dots\b")
_MULTI = re.compile(r",|;|\\cup\b|\n|\bor\b|\band\b|\\\{|\\pm\b")  # marks a gold with several parts
_TOWER = re.compile(r"\^\s*\{[^{}]*?\^\s*\{[^{}]*?\^")  # a^{b^{c^...}}: no final answer is a power tower
_WRAPPERS = re.compile(r"^\$+|\$+$|^\\\(|\\\)$|^\\\[|\\\]$")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_WORDS = re.compile(r"^[^\W\d_]+(?: [^\W\d_]+)*$")  # letters of any script: café, Москва, 東京


def strip_wrappers(text: str) -> str:
    """Drop surrounding math delimiters and a whole-answer \\boxed{...}, which carry no meaning."""
    t = text.strip()
    for _ in range(3):
        t2 = _WRAPPERS.sub("", t).strip()
        m = re.fullmatch(r"\\(?:boxed|fbox)\s*\{(.*)\}", t2, re.DOTALL)
        if m and _balanced(m.group(1)):
            t2 = m.group(1).strip()
        if t2 == t:
            break
        t = t2
    return t.rstrip(".").strip()


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            return False
    return depth == 0


def nesting_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch in "{([":
            depth += 1
            best = max(best, depth)
        elif ch in "})]":
            depth = max(0, depth - 1)
    return best


def hack_reason(answer: str, gold: str) -> str | None:
    """Why `answer` must score 0 whatever it parses to (a reward hack or a bomb), or None.

    Checks that look at words only fire when the gold itself has no such word, so a gold like
    `no solution` or `{1, 2}` keeps its honest matches.
    """
    if len(answer) > max(MAX_ANSWER_CHARS, 4 * len(gold)):
        return "too long"
    if nesting_depth(answer) > max(MAX_NESTING, nesting_depth(gold)):
        return "nested too deep"
    if _TOWER.search(answer) and not _TOWER.search(gold):
        return "power tower"
    if _NEGATION.search(answer) and not _NEGATION.search(gold):
        return "negation"
    if _ELLIPSIS.search(answer) and not _ELLIPSIS.search(gold):
        return "list of candidates"
    if not _MULTI.search(gold) and _HEDGE.search(answer):  # a single value: hedging between several is not one
        return "hedge between answers"
    return None


_LATEX_MARKUP = re.compile(r"[\\${}\[\]]")
# Operator sequences latex2sympy's grammar rejects wherever they stand (`</` of a stray tag, `+*`, `..`, `=,`);
# `<=`, `>=`, `!=`, a unary sign after an operator (`*-`) are valid and not listed.
_BAD_SEQUENCE = re.compile(r"[-+*/=<>,]\s*[*/<>]|[-+*/=<>]\s*,|\.\s*\.")
_EQ_SPLIT = re.compile(r"(?<!\\|\<|\!|\>)=")  # math_verify.parser.equation_split_regex


@functools.lru_cache(maxsize=1)
def _normalizer():
    """math-verify's own LaTeX normaliser (latex2sympy2_extended.math_normalization: regexes only), loaded from its
    file so that the trainer's process does not import sympy with the package; None where it is not installed."""
    import importlib.util
    import os
    import sys

    name = "latex2sympy2_extended.math_normalization"
    module = sys.modules.get(name)
    if module is None:
        try:
            spec = importlib.util.find_spec("latex2sympy2_extended")  # finds the package without running it
            path = os.path.join(list(spec.submodule_search_locations)[0], "math_normalization.py")
            file_spec = importlib.util.spec_from_file_location("_ponder_math_normalization", path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[file_spec.name] = module  # dataclasses look their module up while the file runs
            file_spec.loader.exec_module(module)
        except Exception:  # not installed, or laid out otherwise: every such answer goes to a worker, as before
            return None
    # the settings math_verify.parser.extract_latex uses for a \boxed{...} match: LatexExtractionConfig's defaults
    config = module.NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="last",
                                        equations=False)
    return lambda text: module.normalize_latex(text, config)


def _rejected(text: str) -> bool:
    """Whether latex2sympy's grammar certainly rejects `text` (plain ASCII, no LaTeX markup): empty, parentheses
    unbalanced or closed before opened, a binary operator at an end, or an operator sequence no expression has."""
    t = text.strip()
    if not t:
        return True
    if not t.isascii() or _LATEX_MARKUP.search(t):
        return False
    depth = 0
    for ch in t:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return True
    return depth != 0 or t[-1] in "+-*/=<>," or t[0] in "*/=<>," or bool(_BAD_SEQUENCE.search(t))


def unparseable(answer: str) -> bool:
    """True when `compare` would certainly find no expression in `answer` (so that against a gold that parses,
    the only comparison left is the strings, which differ: the gold's parses, this one does not), decided with
    regexes, without sympy or a worker. Random text usually is: `k(n.d/226<answer>r`, `5</answer>`, `7 +`.

    The reasoning follows math_verify.parse on "\\boxed{answer}" as `_parse` calls it: with no LaTeX markup
    (backslash, $, braces, brackets) in the answer, the only pattern that matches is the whole box, whose content
    is normalised (math-verify's normaliser, run here: it drops trailing units, so `5 a )` is `5`) and parsed,
    then, if that fails and it has two or more `=`, the part after the last one; no other pattern matches. Each
    string that would be parsed must be one the grammar rejects (`_rejected`). tests/test_rewards_junk.py checks
    this against math-verify itself.
    """
    normalize = _normalizer()
    if normalize is None or _LATEX_MARKUP.search(answer):
        return False
    try:
        text = normalize("\\boxed{" + answer + "}")
    except Exception:  # another math-verify than the one this was written against: leave it to a worker
        return False
    if not _rejected(text):
        return False
    if "," not in text and ";" not in text:  # math_verify.parser.get_last_eq: the last equation is tried next
        parts = _EQ_SPLIT.split(text)
        if len(parts) > 2 and not _rejected(parts[-1]):
            return False
    return True


def text_answer(text: str) -> str | None:
    """Case-folded words for answers that are words (`Monday`, `\\text{yes}`, `東京`), else None."""
    t = _TEXT_CMD.sub(r"\1", strip_wrappers(text))
    t = re.sub(r"[\s.!。]+", " ", t).strip().casefold()
    if len(t.replace(" ", "")) < 2 or not _WORDS.match(t):
        return None
    return t


def word_list(text: str) -> list[str] | None:
    """Case-folded parts of a comma-separated list of words (`Paris, France`: a list gold joined), else None."""
    parts = [text_answer(p) for p in strip_wrappers(text).split(",")]
    return parts if len(parts) > 1 and all(p is not None for p in parts) else None


# ---------------------------------------------------------------- inside a verification worker

_PARSE_TIMEOUT = 3  # math-verify's own alarm (works here: a worker's main thread); the pool's limit is the hard one


@functools.lru_cache(maxsize=20_000)
def _parse(text: str) -> tuple:
    from math_verify import LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0)]
    return tuple(parse("\\boxed{" + text + "}", extraction_config=config, parsing_timeout=_PARSE_TIMEOUT))


def warm() -> None:
    """Import sympy and math-verify and parse once, so a fresh worker answers its first item quickly."""
    compare("1", "1")


def compare(answer: str, gold: str) -> float | None:
    """1.0 or 0.0 by math-verify; None when the gold itself does not parse. Runs in a worker."""
    import logging

    from sympy import Basic, MatrixBase

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import verify

    gold_parsed = _parse(gold)
    if not any(isinstance(g, (Basic, MatrixBase)) for g in gold_parsed):
        return None
    answer_parsed = _parse(answer)
    if not answer_parsed:
        return 0.0
    # allow_set_relation_comp: `x <= 3` answers `(-\infty, 3]`, as a grader would accept.
    return float(verify(list(gold_parsed), list(answer_parsed), allow_set_relation_comp=True, timeout_seconds=_PARSE_TIMEOUT))
