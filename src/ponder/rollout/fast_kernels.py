"""Small fused pieces of the decode step (norm, rotary, SwiGLU, sampling), compiled once on CUDA.

A decode step of a small model is bound by the number of kernels more than by their work: each of
these turns five to eight element-wise kernels into one. On CPU, or if compilation fails, the same
functions run eagerly (same math).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def rms(x, w, eps: float):
    """HF's RMSNorm: normalise in float32, round to the input dtype, then scale."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def add_rms(x, r, w, eps: float):
    x = x + r
    return x, rms(x, w, eps)


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope2(q, k, cos, sin):
    return rope(q, cos, sin), rope(k, cos, sin)


def swiglu(g, u):
    return F.silu(g) * u


def gumbel_pick(logits, noise, inv_temperature: float):
    """Exponential race on logits / T: argmax(x - log E) with E ~ Exp(1); plus the token's log-prob."""
    x = logits.float() * inv_temperature
    tok = (x - noise.log()).argmax(-1)
    lp = x.gather(-1, tok[:, None]).squeeze(-1) - x.logsumexp(-1)
    return tok, lp


EAGER = dict(rms=rms, add_rms=add_rms, rope2=rope2, swiglu=swiglu, gumbel_pick=gumbel_pick)
_compiled: dict | None = None


def kernels(device: torch.device) -> dict:
    """The functions above, compiled when on CUDA and the compiler works here; eager otherwise."""
    global _compiled
    if device.type != "cuda":
        return EAGER
    if _compiled is None:
        try:
            fns = {k: torch.compile(f, dynamic=True, fullgraph=True) for k, f in EAGER.items()}
            x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
            w = torch.ones(64, device=device, dtype=torch.bfloat16)
            fns["rms"](x, w, 1e-6)
            fns["add_rms"](x, x, w, 1e-6)
            fns["rope2"](x.view(3, 2, 32), x.view(3, 2, 32), x[:, None, :32], x[:, None, :32])
            fns["swiglu"](x, x)
            fns["gumbel_pick"](x, torch.rand(3, 64, device=device) + 0.5, 1.0)
            _compiled = fns
        except Exception as e:  # noqa: BLE001  (any compiler failure: run eagerly, a little slower)
            print(f"ponder: fast engine: torch.compile unavailable ({type(e).__name__}); fused kernels off", file=sys.stderr)
            _compiled = EAGER
    return _compiled
