"""Find the final answer in a completion: the answer tags, else the \\boxed{} after the thinking.

Only text outside the think blocks counts, so an answer merely considered while thinking earns
nothing. A completion that commits to several different answers (two answer blocks, several
boxes) or spams boxes commits to none.
"""

from __future__ import annotations

import re

from ponder.errors import UserError

MODES = ("tags", "boxed", "tags_or_boxed", "none")
MAX_BOXES = 3  # more boxes than this in the final answer is spam, even when they agree

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")


def tag_spans(text: str, open_tag: str, close_tag: str) -> list[tuple[int, int]]:
    """(start, end) of each `open_tag ... close_tag` block, the content between text[start:end], as a lazy regex's
    findall finds them, in one pass: such a regex tried again from every unclosed tag, and a policy looping on
    `<answer>` (90k characters) took 4 s of the trainer's own process, growing with the square of the length."""
    spans, i = [], 0
    while (a := text.find(open_tag, i)) >= 0:
        b = text.find(close_tag, a + len(open_tag))
        if b < 0:  # no close after this tag, so none after any later one
            break
        spans.append((a + len(open_tag), b))
        i = b + len(close_tag)
    return spans


def answer_blocks(text: str) -> list[str]:
    """The contents of the text's <answer> blocks, stripped."""
    return [text[s:e].strip() for s, e in tag_spans(text, "<answer>", "</answer>")]


def _braced(text: str, i: int) -> str | None:
    """Content of the balanced {...} opening at text[i], or None when it never closes."""
    depth = 0
    for m in re.finditer(r"[{}]", text[i:]):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
            return text[i + 1 : i + m.start()]
    return None


def boxes(text: str) -> list[str]:
    """Contents of every \\boxed{...} (or `\\boxed 5`) in order; unclosed ones are left out."""
    out = []
    for m in _BOX_RE.finditer(text):
        j = m.end()
        if j < len(text) and text[j] == "{":
            inner = _braced(text, j)
        else:
            inner = re.match(r"[^\s$]*", text[j:]).group() or None
        if inner is not None:
            out.append(inner.strip())
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} or \\fbox{...} (balanced braces), or None (MATH's grader takes \\fbox too)."""
    at = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    found = boxes(text[at:]) if at >= 0 else []
    return found[-1] if found else None


def outside_think(completion: str, think_opened: bool = False) -> str | None:
    """The completion without its thinking; None while a think block is still open (truncated). `think_opened`:
    the prompt opened the block (R1-Distill's chat template), so an answer that never closes it is all thinking,
    and a box in it a guess, not an answer."""
    if think_opened and "</think>" not in completion:
        return None
    text = completion
    head, sep, tail = text.partition("</think>")
    if sep and "<think>" not in head:  # the prompt opened the think block
        text = tail
    spans = tag_spans(text, "<think>", "</think>")
    if spans:  # each block, tags and all, becomes one space
        cut = [(s - len("<think>"), e + len("</think>")) for s, e in spans]
        text = " ".join(text[a:b] for a, b in zip([0] + [e for _, e in cut], [s for s, _ in cut] + [len(text)]))
    if "<think>" in text:
        return None
    return text.replace("</think>", " ")


def _one_box(text: str) -> str | None:
    if text.count("\\boxed") + text.count("\\fbox") > MAX_BOXES:
        return None
    found = boxes(text)
    if not found:
        return None
    if len(set(found)) > 1:  # several values is no answer; one value written two ways (R1's summary box, then
        from ponder.rewards.match import equivalent  # **Final Answer** with \dfrac or without the unit) is one

        if not all(equivalent(b, found[-1]) for b in set(found)):
            return None
    return found[-1]


def extract_answer(completion: str, mode: str = "tags_or_boxed", think_opened: bool = False) -> str | None:
    """The answer a completion commits to, or None when it commits to none.

    mode: tags (only <answer>...</answer>), boxed (only \\boxed{}), tags_or_boxed, or none (the
    whole completion, for plain templates). A box inside the answer block is unwrapped.
    """
    if mode not in MODES:
        raise UserError(f"unknown answer extraction mode '{mode}'; choose one of: {', '.join(MODES)}")
    if mode == "none":
        return completion.strip()
    final = outside_think(completion, think_opened)
    if final is None:
        return None
    if mode in ("tags", "tags_or_boxed"):
        blocks = answer_blocks(final)
        if blocks:
            if len(set(blocks)) > 1:
                return None
            if "\\boxed" in blocks[0] or "\\fbox" in blocks[0]:
                return _one_box(blocks[0])
            return blocks[0]
        if mode == "tags":
            return None
    return _one_box(final)
