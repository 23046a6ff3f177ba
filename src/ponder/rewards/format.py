"""Format rewards: is the completion shaped as think-then-answer (DeepSeek-R1's format reward)."""

from __future__ import annotations

import re

from ponder.rewards import register

STRICT_FORMAT = re.compile(r"^\s*<think>(?:(?!<think>|</think>).)*</think>\s*<answer>(?:(?!<answer>|</answer>).)*</answer>\s*$", re.DOTALL)
SOFT_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
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
    return [float(bool(SOFT_FORMAT.search(c))) for c in completions]


@register("tag_count")
def tag_count(completions, *, prompts, **_):
    """Partial credit, 0.25 for each of the four tags used exactly once (after open-r1's tag_count_reward)."""
    return [sum(0.25 for t in TAGS if c.count(t) == 1) for c in completions]
