"""Find the final answer in a completion: the answer tags, else the last \\boxed{}."""

from __future__ import annotations

import re

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(completion: str, mode: str = "tags_or_boxed") -> str | None:
    """The answer a completion commits to, or None when it commits to none.

    mode: tags (only <answer>...</answer>), boxed (only the last \\boxed{}), tags_or_boxed, or
    none (the whole completion, for plain templates). Several answer blocks that disagree count as
    no answer: a policy must not hedge by answering twice.
    """
    if mode == "none":
        return completion.strip()
    if mode in ("tags", "tags_or_boxed"):
        blocks = [b.strip() for b in ANSWER_RE.findall(completion)]
        if blocks:
            if len(set(blocks)) > 1:
                return None
            inner = last_boxed(blocks[-1])
            return inner.strip() if inner is not None else blocks[-1]
        if mode == "tags":
            return None
    # boxed: only outside the think block, so an answer merely considered while thinking does not count
    after_think = completion.rsplit("</think>", 1)[-1] if "</think>" in completion else completion
    if "<think>" in after_think and "</think>" not in after_think:
        return None
    boxed = last_boxed(after_think)
    return boxed.strip() if boxed is not None else None
