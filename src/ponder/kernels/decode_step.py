"""Small fused pieces of the decode step (norm, rotary, SwiGLU, sampling), compiled once on CUDA.

A decode step of a small model is bound by the number of kernels more than by their work: each of
these turns five to eight element-wise kernels into one. On CUDA with Triton, two hand-written kernels
replace compiled pieces once they pass a trial: the sampler (the CDF inverted at one hashed uniform a row,
the vocabulary split across programs) and rotary with the K/V cache write. On CPU, or if compilation
fails, the same functions run eagerly (same math), except that the CPU samples by Gumbel-max. The pieces
themselves live beside their torch twins in ponder.kernels.norm, rope, rope_store, swiglu and sampler.
"""

from __future__ import annotations

import torch

from ponder.kernels.norm import add_rms, add_rms_cpu, rms, rms_cpu
from ponder.kernels.rope import rope_kv, rope_signed
from ponder.kernels.rope_store import rope_store_trial, triton_rope_store
from ponder.kernels.sampler import cdf_trial, greedy_pick, gumbel_pick, row_keys, triton_cdf_pick
from ponder.kernels.swiglu import halves_trial, swiglu, swiglu_halves, triton_swiglu_halves
from ponder.kernels.trials import compile_each, trial as tried

EAGER = dict(rms=rms, add_rms=add_rms, rope_kv=rope_kv, swiglu=swiglu, swiglu_halves=swiglu_halves, pick=gumbel_pick,
             greedy_pick=greedy_pick)
_compiled: dict | None = None


def rope_kv_signed(q, k, v, cos, ssin):
    """rope_kv given the signed sine table (ponder.kernels.rope.signed_sin): the CPU's, in fewer operations."""
    return rope_signed(q, cos, ssin), torch.stack((rope_signed(k, cos, ssin), v), 1)


def swiglu_halves_cpu(x):
    """swiglu_halves, the product written over SiLU's output (no new tensor)."""
    g, u = x.chunk(2, -1)
    return torch.nn.functional.silu(g).mul_(u)


# CPU: EAGER's math, bit for bit, in fewer eager operations (norms without scalar casts; rotary against a signed
# sine table, which Forward keeps in place of the sine table where these run)
CPU = dict(EAGER, rms=rms_cpu, add_rms=add_rms_cpu, rope_kv=rope_kv_signed, swiglu_halves=swiglu_halves_cpu)


def kernels(device: torch.device) -> dict:
    """The pieces of EAGER, compiled when on CUDA and the compiler handles them here; eager otherwise.
    On CUDA also 'rope_store' (triton_rope_store, or None without a working Triton) and, when it passes its
    trial, triton_cdf_pick as 'pick' (on the CPU 'pick' stays the Gumbel-max draw, which the documented
    CPU runs were made with)."""
    global _compiled
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        return EAGER
    if _compiled is None:
        x = torch.randn(4, 4096, device=device, dtype=torch.bfloat16)
        w = torch.ones(4096, device=device, dtype=torch.bfloat16)
        keys = row_keys(torch.tensor(1, device=device), torch.tensor(2, device=device), torch.arange(4, device=device))
        h = x.view(4, 64, 64)
        trial = dict(rms=(x, w, 1e-6), add_rms=(x, x, w, 1e-6), rope_kv=(h, h, h, h[:, :1], h[:, :1]), swiglu=(x, x),
                     swiglu_halves=(x,), pick=(x, keys, 1.0), greedy_pick=(x, keys, 1.0))
        _compiled = compile_each(EAGER, trial, "fast engine")
        if cdf_trial(device):
            _compiled["pick"] = triton_cdf_pick
        _compiled["rope_store"] = triton_rope_store if rope_store_trial(device) else None
        if tried(lambda: halves_trial(device), "the Triton SwiGLU failed its trial; using the compiled one"):
            _compiled["swiglu_halves"] = triton_swiglu_halves
    return _compiled
