"""Length shaping: DAPO's soft overlong punishment and the cosine length-scaled reward."""

from __future__ import annotations

from math import cos, pi

from ponder.errors import UserError
from ponder.rewards import register


def _lengths(name: str, completion_length, n: int) -> list[int]:
    if completion_length is None or len(completion_length) != n:
        raise UserError(f"reward '{name}' needs the completion_length column (tokens per completion); call it through the trainer or pass completion_length=[...]")
    return [int(x) for x in completion_length]


def _positive(name: str, option: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserError(f"reward '{name}': {option} must be a positive number of tokens, got {value!r}")


@register("overlong", columns=("completion_length",))
def overlong(completions, *, prompts, completion_length=None, max_len=None, buffer=None, **_):
    """Penalizes length near the limit: 0 up to max_len - buffer, then linearly down to -1 at max_len (DAPO's soft overlong punishment, arXiv 2503.14476).

    max_len is the generation limit in tokens; buffer (DAPO's L_cache) defaults to a fifth of it.
    """
    if max_len is None:
        raise UserError("reward 'overlong' needs max_len, the generation limit in tokens: rewards: {overlong: {weight: 1, max_len: 512, buffer: 64}}")
    _positive("overlong", "max_len", max_len)
    buffer = max_len / 5 if buffer is None else buffer
    _positive("overlong", "buffer", buffer)
    if buffer > max_len:
        raise UserError(f"reward 'overlong': buffer ({buffer}) must not exceed max_len ({max_len})")
    start = max_len - buffer
    out = []
    for length in _lengths("overlong", completion_length, len(completions)):
        if length <= start:
            out.append(0.0)
        elif length <= max_len:
            out.append((start - length) / buffer)
        else:
            out.append(-1.0)
    return out


@register("cosine_length", columns=("completion_length", "truncated"))  # and accuracy's, through **columns
def cosine_length(completions, *, prompts, completion_length=None, truncated=None, max_len=None,
                  r0_correct: float = 2.0, rL_correct: float = 1.0, r0_wrong: float = -10.0, rL_wrong: float = 0.0,
                  exceed: float = -10.0, extract: str = "tags_or_boxed", **columns):
    """Rewards short right answers and long wrong ones along a cosine of the length (Yeo et al. 2025, arXiv 2502.03373).

    r(L) = rL + (r0 - rL) * (1 + cos(pi * L / max_len)) / 2, with (r0, rL) = (r0_correct, rL_correct)
    when the answer is right and (r0_wrong, rL_wrong) when not; `exceed` when the completion hit
    max_len or was truncated. Defaults are the paper's (+2/+1, -10/0, -10). None without a gold.
    """
    from ponder.rewards.basic import accuracy

    if max_len is None:
        raise UserError("reward 'cosine_length' needs max_len, the generation limit in tokens: rewards: {cosine_length: {weight: 1, max_len: 512}}")
    _positive("cosine_length", "max_len", max_len)
    n = len(completions)
    lengths = _lengths("cosine_length", completion_length, n)
    cut = truncated if truncated is not None else [False] * n
    right = accuracy(completions, prompts=prompts, extract=extract, **columns)
    out = []
    for length, was_cut, acc in zip(lengths, cut, right):
        if acc is None:
            out.append(None)
        elif was_cut or length >= max_len:
            out.append(float(exceed))
        else:
            r0, rL = (r0_correct, rL_correct) if acc >= 1.0 else (r0_wrong, rL_wrong)
            out.append(rL + (r0 - rL) * (1 + cos(pi * length / max_len)) / 2)
    return out
