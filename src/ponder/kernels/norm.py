"""RMSNorm as Hugging Face computes it, alone and after a residual add (compiled on CUDA: one kernel each)."""

from __future__ import annotations

import torch


def rms(x, w, eps: float):
    """HF's RMSNorm: normalise in float32, round to the input dtype, then scale."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms(x, r, w, eps: float):
    x = x + r
    return x, rms(x, w, eps)
