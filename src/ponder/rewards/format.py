"""Format rewards: is the completion shaped as think-then-answer (DeepSeek-R1's format reward)."""

from __future__ import annotations

import re

from ponder.rewards import register

STRICT_FORMAT = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*<answer>(?:(?!<answer>|</answer>).)*</answer>\s*$", re.DOTALL)
_THEN_ANSWER = re.compile(r"\s*<answer>")
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def strict_format(completion: str, think_opened: bool = False) -> bool:
    """Exactly one <think> block then one <answer> block, nothing outside; where the prompt opened the think block
    (think_opened: R1-Distill's chat template), the answer's text continues it."""
    return bool(STRICT_FORMAT.match("<think>" + completion if think_opened else completion))


@register("format", columns=("think_opened",))
def format_reward(completions, *, prompts, think_opened=None, **_):
    """Rewards the strict R1-Zero format: exactly one <think> block then one <answer> block, nothing outside (DeepSeek-R1)."""
    return [float(strict_format(c, bool(o))) for c, o in zip(completions, think_opened or [False] * len(completions))]


@register("format_soft")
def format_soft(completions, *, prompts, **_):
    """Rewards a <think> block followed by an <answer> block anywhere in the text (after open-r1's soft format reward)."""
    return [float(soft_format(c)) for c in completions]


def soft_format(c: str) -> bool:
    """A <think> block, then (after white space) an <answer> block, anywhere: what the regex
    `<think>.*?</think>\\s*<answer>.*?</answer>` finds, without its square-of-the-length search through repeated tags.
    The first <think> leaves the most room; the first of its closes that an <answer> follows, the most after it."""
    a = c.find("<think>")
    if a < 0:
        return False
    b = c.find("</think>", a + len("<think>"))
    while b >= 0:
        m = _THEN_ANSWER.match(c, b + len("</think>"))
        if m:
            return c.find("</answer>", m.end()) >= 0
        b = c.find("</think>", b + 1)
    return False


@register("tag_count")
def tag_count(completions, *, prompts, **_):
    """Partial credit, 0.25 for each of the four tags used exactly once (after open-r1's tag_count_reward)."""
    return [sum(0.25 for t in TAGS if c.count(t) == 1) for c in completions]
