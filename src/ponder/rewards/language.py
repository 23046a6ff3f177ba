"""Language consistency: the share of the chain of thought's words in the target language (DeepSeek-R1)."""

from __future__ import annotations

import re

from ponder.errors import UserError
from ponder.rewards import register

TARGETS = ("en", "zh")

# Math, code and markup carry no language: they are removed before counting.
_NO_LANGUAGE = re.compile(
    r"```.*?(?:```|$)"  # fenced code (an unclosed fence runs to the end)
    r"|`[^`\n]*`"  # inline code
    r"|\$\$.*?\$\$|\$(?!\d)[^$\n]*\$|\\\[.*?\\\]|\\\(.*?\\\)"  # display and inline math (not `$5 ... $3`)
    r"|\\begin\{(\w+\*?)\}.*?\\end\{\1\}"  # LaTeX environments
    r"|\\[a-zA-Z]+"  # LaTeX commands
    r"|https?://\S+"  # links
    r"|<[^>\s]{1,20}>",  # tags such as <think>
    re.DOTALL,
)
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(
    rf"(?P<han>[{_HAN}])"  # each Han character counts as one word
    r"|(?P<latin>[A-Za-z\u00c0-\u024f]{2,}(?:'[A-Za-z]+)?)"  # Latin words; single letters are variables
    r"|(?P<other>[^\W\d_A-Za-z\u00c0-\u024f" + _HAN + r"]{2,})"  # words of any other script
)
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


def chain_of_thought(completion: str) -> str:
    """The thinking: the think blocks (an open one runs to the end), else text before `</think>`, else all but the answer."""
    blocks = _THINK.findall(completion)
    if blocks:
        return "\n".join(blocks)
    if "</think>" in completion:
        return completion.split("</think>", 1)[0]
    return re.sub(r"<answer>.*?(?:</answer>|$)", " ", completion, flags=re.DOTALL)


def word_counts(text: str) -> dict[str, int]:
    """Words per script ('latin', 'han', 'other') outside math, code and markup."""
    counts = {"latin": 0, "han": 0, "other": 0}
    for m in _WORD.finditer(_NO_LANGUAGE.sub(" ", text)):
        counts[m.lastgroup] += 1
    return counts


def is_mixed(completion: str) -> bool:
    """True when the chain of thought has words of both languages (Latin-script words and Han characters)."""
    counts = word_counts(chain_of_thought(completion))
    return counts["latin"] > 0 and counts["han"] > 0


def mixing_rate(completions: list[str]) -> float:
    """Share of completions whose chain of thought mixes English and Chinese words (R1-Zero's language mixing)."""
    return sum(map(is_mixed, completions)) / len(completions) if completions else 0.0


_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")  # a language tag: zh, zh-CN, zh_Hans, en-US
_NAMES = {"english": "en", "chinese": "zh", "mandarin": "zh"}


def language_code(value) -> str | None:
    """en or zh for a tag or name of one (zh-CN, zh_Hans, EN-us, Chinese, Simplified Chinese), else None."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if _TAG.fullmatch(text):
        code = re.split(r"[-_]", text)[0]
        return code if code in TARGETS else None
    words = set(re.findall(r"[a-z]+", text))
    return next((code for name, code in _NAMES.items() if name in words), None)


def example_language(value, default: str = "en") -> str:
    """The target language an example's `target` column asks for: en or zh, by tag or name (a `zh-CN` column read
    as English trained a Chinese dataset toward English). A number or no value (Countdown's numeric target, a
    missing column) means `default`; any other text that names no language of TARGETS is an error."""
    code = language_code(value)
    if code:
        return code
    if isinstance(value, str) and re.search(r"[^\W\d_]", value):  # letters: meant as a language, not a number
        raise UserError(f"target language '{value}' is not supported; choose one of: {', '.join(TARGETS)}")
    return default


@register("language", columns=("target",))  # target: an option, or else each example's own
def language(completions, *, prompts, target="en", lang: str | None = None, **_):
    """Rewards a chain of thought in one language: the share of its words in the target (DeepSeek-R1's language consistency reward).

    target: en (Latin-script words) or zh (Han characters, one word each), or a tag or name of one (zh-CN,
    Chinese); as a recipe option, one
    language for every example; as a dataset column (bilingual_arithmetic's `target`), each example's
    own. Math, code, LaTeX and single-letter variables are not words. A chain of thought without words
    scores 0. `lang` is the option under a name no dataset column takes: it wins over a `target` column.
    """
    if lang is not None or isinstance(target, str):
        choice = lang if lang is not None else target
        if language_code(choice) is None:
            raise UserError(f"reward 'language': target '{choice}' is not supported; choose one of: {', '.join(TARGETS)}")
        targets = [language_code(choice)] * len(completions)
    elif isinstance(target, (list, tuple)):  # the examples' `target` column (Countdown's is a number: English)
        targets = [example_language(t) for t in target]
    else:
        targets = ["en"] * len(completions)
    out = []
    for text, want in zip(completions, targets):
        counts = word_counts(chain_of_thought(text))
        total = sum(counts.values())
        out.append(counts["latin" if want == "en" else "han"] / total if total else 0.0)
    return out
