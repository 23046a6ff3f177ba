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


# CPU, eager: the same arithmetic in fewer operations. A Python float in a binary op costs the CPU an extra copy
# (the scalar cast to the tensor's dtype) at each call, and mean() is sum() and a division by such a scalar: the
# constants are 0-dim tensors of the input's dtype here, and intermediates are updated in place. Bit for bit the
# values of rms and add_rms (the decode step of a small model is bound by its ~350 small ops, not their work).
_consts: dict = {}


def const(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor holding `value` in `dtype` (made once)."""
    key = (value, dtype)
    t = _consts.get(key)
    if t is None:
        t = _consts[key] = torch.tensor(value, dtype=dtype)
    return t


def _inv_rms(xf, eps: float):
    """1 / sqrt(mean(xf^2) + eps) over the last dimension of float32 xf, as rms computes it (mean: the sum divided)."""
    f32 = torch.float32
    return xf.pow(2).sum(-1, keepdim=True).div_(const(float(xf.shape[-1]), f32)).add_(const(eps, f32)).rsqrt_()


def rms_cpu(x, w, eps: float, dtype: torch.dtype | None = None):
    """rms, bit for bit, on CPU tensors."""
    f32 = torch.float32
    xf = x if x.dtype == f32 else x.float()
    y = xf * _inv_rms(xf, eps)
    if x.dtype != f32:
        y = y.to(x.dtype)
    out = y.mul_(w) if w.dtype == y.dtype else w * y  # w * y, the same product
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def add_rms_cpu(x, r, w, eps: float, dtype: torch.dtype | None = None):
    x = x + r
    return x, rms_cpu(x, w, eps, dtype)


def rms_train_cpu(x, w, eps: float, dtype: torch.dtype | None = None):
    """rms for CPU training: the same values and gradients, bit for bit. mean() is sum() then a division, and its
    backward divides the expanded [N, d] gradient; here the division is of the [N, 1] sums, so backward divides
    those before expanding (the same quotients, one [N, d] pass less a norm)."""
    f32 = torch.float32
    xf = x if x.dtype == f32 else x.float()
    y = xf * _inv_rms(xf, eps)
    out = w * (y if x.dtype == f32 else y.to(x.dtype))
    return out if dtype is None or out.dtype == dtype else out.to(dtype)


def add_rms_train_cpu(x, r, w, eps: float, dtype: torch.dtype | None = None):
    x = x + r
    return x, rms_train_cpu(x, w, eps, dtype)
