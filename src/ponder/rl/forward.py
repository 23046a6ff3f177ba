"""Log-probabilities (and entropies) of completion tokens under a model, for the trainer's batches."""

from __future__ import annotations

import contextlib

import torch

from ponder.rl.batching import Tensors
from ponder.rl.logprobs import token_logprobs


def autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def completion_logprobs(model, t: Tensors, *, bf16: bool = False, with_entropy: bool = False, temperature: float = 1.0):
    """[B, T] log p(token) of each completion token, and its entropy (detached) when asked.

    `temperature` is the sampling temperature: the ratio must compare the distributions the tokens
    were actually drawn from.
    """
    with autocast(t.input_ids.device, bf16):
        return token_logprobs(model, t.input_ids, t.attention_mask, positions=t.target_pos + 1,
                              temperature=temperature, with_entropy=with_entropy)
