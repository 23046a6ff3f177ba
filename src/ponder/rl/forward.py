"""Log-probabilities (and entropies) of completion tokens under a model."""

from __future__ import annotations

import contextlib

import torch

from ponder.rl.batching import Tensors


def autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def completion_logprobs(model, t: Tensors, *, bf16: bool = False, with_entropy: bool = False):
    """[B, T] log p(token) for each completion token, and its entropy (detached) when asked."""
    with autocast(t.input_ids.device, bf16):
        logits = model(input_ids=t.input_ids, attention_mask=t.attention_mask, use_cache=False).logits
    # only the positions that predict completion tokens; the rest of the vocabulary-sized tensor is dropped
    idx = t.target_pos[:, :, None].expand(-1, -1, logits.shape[-1])
    logits = logits.gather(1, idx).float()
    logprobs = logits.log_softmax(-1)
    token_logp = logprobs.gather(-1, t.targets[:, :, None]).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logprobs.exp() * logprobs).sum(-1)
    return token_logp, entropy
