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
    r"|\$\$.*?\$\$|\$[^$]*\$|\\\[.*?\\\]|\\\(.*?\\\)"  # display and inline math
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


@register("language")
def language(completions, *, prompts, target: str = "en", lang: str | None = None, **_):
    """Rewards a chain of thought in one language: the share of its words in the target (DeepSeek-R1's language consistency reward).

    target: en (Latin-script words) or zh (Han characters, one word each). Math, code, LaTeX and
    single-letter variables are not words. A chain of thought without words scores 0. `lang` is
    the same option under a name no dataset column takes (Countdown examples have a `target`).
    """
    if lang is not None:
        target = lang
    elif not isinstance(target, str):  # a dataset column called `target` came in, not this option
        target = "en"
    if target not in TARGETS:
        raise UserError(f"reward 'language': target '{target}' is not supported; choose one of: {', '.join(TARGETS)}")
    key = "latin" if target == "en" else "han"
    out = []
    for text in completions:
        counts = word_counts(chain_of_thought(text))
        total = sum(counts.values())
        out.append(counts[key] / total if total else 0.0)
    return out
