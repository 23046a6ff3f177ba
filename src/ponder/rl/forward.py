"""Log-probabilities (and entropies) of completion tokens under a model, for the trainer's batches."""

from __future__ import annotations

import contextlib

import torch

from ponder.rl.batching import Tensors
from ponder.rl.logprobs import shared_prefix_length, token_logprobs

MIN_SHARED_PREFIX = 32  # below this, one forward over whole rows is as cheap


def use_bf16(precision: str, device: torch.device) -> bool:
    """`train.precision`: bf16 always, or auto (bf16 autocast on CUDA, fp32 on CPU)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def completion_logprobs(model, t: Tensors, *, bf16: bool = False, with_entropy: bool = False, temperature: float = 1.0):
    """[B, T] log p(token) of each completion token, and its entropy (detached) when asked.

    `temperature` is the sampling temperature: the ratio must compare the distributions the tokens
    were actually drawn from.
    """
    positions = t.target_pos + 1
    scored = positions[t.mask.bool()]
    prefix = min(shared_prefix_length(t.input_ids, t.attention_mask), int(scored.min()) - 1 if scored.numel() else 0)
    with autocast(t.input_ids.device, bf16):
        return token_logprobs(model, t.input_ids, t.attention_mask, positions=positions, temperature=temperature,
                              with_entropy=with_entropy, shared_prefix=prefix if prefix >= MIN_SHARED_PREFIX else 0)
