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


def rope_kv(q, k, v, cos, sin):
    """Rotary on q and k, and k and v stacked [B, 2, kv heads, D] for one write into the cache."""
    return rope(q, cos, sin), torch.stack((rope(k, cos, sin), v), 1)


def swiglu(g, u):
    return F.silu(g) * u


M32 = 0xFFFFFFFF


def i32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits."""
    return c - (1 << 32) if c >= 1 << 31 else c


def to_i32(x):
    """The low 32 bits of an int64 tensor, as int32 with the same bits (exact: no out-of-range cast)."""
    x = x & M32
    return (x - ((x >> 31) << 32)).to(torch.int32)


def shr(x, n: int):
    """Logical right shift of int32 bits (torch's >> is arithmetic: clear the copied sign bits)."""
    return (x >> n) & ((1 << (32 - n)) - 1)


def hash32(x):
    """A 32-bit integer mixer (Wellons' lowbias32) on int32 tensors; products wrap mod 2**32, so it gives the
    same bits as the textbook uint32 version at half the memory traffic of int64."""
    x = x ^ shr(x, 16)
    x = x * i32(0x7FEB352D)
    x = x ^ shr(x, 15)
    x = x * i32(0x846CA68B)
    return x ^ shr(x, 16)


def row_keys(seed, step, seqs):
    """One 32-bit key (int32) per sequence and step: the noise of a sample depends on (seed, step, sequence) only."""
    k = hash32(to_i32(seed + step * 0x9E3779B9))
    return hash32(k ^ to_i32(seqs * 0x85EBCA6B))


def gumbel_pick(logits, keys, inv_temperature):
    """Sample from softmax(logits * inv_temperature) by the Gumbel-max trick, with counter-based noise
    (a hash of the row key and the token id: no RNG state, one pass over the logits, graph-safe).
    24-bit uniforms: tokens less likely than about e^-17 times the top one are never drawn.
    Returns the tokens and their log-probabilities."""
    x = logits.float() * inv_temperature
    vocab = torch.arange(x.shape[-1], device=x.device, dtype=torch.int32)
    k = keys[:, None]
    bits = hash32(hash32(k + vocab[None, :]) ^ k)  # two rounds: neighbouring ids decorrelate fully
    u = (shr(bits, 8).float() + 0.5) * (1.0 / 16777216)
    tok = (x - (-u.log()).log()).argmax(-1)
    lp = x.gather(-1, tok[:, None]).squeeze(-1) - x.logsumexp(-1)
    return tok, lp


def greedy_pick(logits, keys, inv_temperature):
    x = logits.float()
    tok = x.argmax(-1)
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - x.logsumexp(-1)


EAGER = dict(rms=rms, add_rms=add_rms, rope_kv=rope_kv, swiglu=swiglu, gumbel_pick=gumbel_pick, greedy_pick=greedy_pick)
_compiled: dict | None = None


def kernels(device: torch.device) -> dict:
    """The functions above, compiled when on CUDA and the compiler handles them here; eager otherwise."""
    global _compiled
    if device.type != "cuda":
        return EAGER
    if _compiled is None:
        x = torch.randn(4, 4096, device=device, dtype=torch.bfloat16)
        w = torch.ones(4096, device=device, dtype=torch.bfloat16)
        keys = row_keys(torch.tensor(1, device=device), torch.tensor(2, device=device), torch.arange(4, device=device))
        h = x.view(4, 64, 64)
        trial = dict(rms=(x, w, 1e-6), add_rms=(x, x, w, 1e-6), rope_kv=(h, h, h, h[:, :1], h[:, :1]), swiglu=(x, x),
                     gumbel_pick=(x, keys, 1.0), greedy_pick=(x, keys, 1.0))
        _compiled, failed = {}, []
        for name, f in EAGER.items():
            try:
                fn = torch.compile(f, dynamic=True, fullgraph=True)
                fn(*trial[name])
                _compiled[name] = fn
            except Exception:  # noqa: BLE001  (any compiler failure: that piece runs eagerly)
                _compiled[name], failed = f, failed + [name]
        if failed:
            print(f"ponder: fast engine: torch.compile failed for {', '.join(failed)}; those run unfused", file=sys.stderr)
    return _compiled
