"""RMSNorm as Hugging Face computes it, alone and after a residual add (compiled on CUDA: one kernel each)."""

from __future__ import annotations

import torch


def rms(x, w, eps: float, dtype: torch.dtype | None = None):
    """HF's RMSNorm: normalise in float32, round to the input dtype, then scale. `dtype`: the result rounded
    to it in the same kernel, as autocast would round it at the next product (the fast engine's bf16 products
    over a float32 residual stream), which then casts nothing."""
    xf = x.float()
    out = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if dtype is None else out.to(dtype)


def add_rms(x, r, w, eps: float, dtype: torch.dtype | None = None):
    x = x + r
    return x, rms(x, w, eps, dtype)
