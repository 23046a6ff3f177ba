"""The element-wise pieces of the packed training pass (norms, rotary, SwiGLU), each with its backward.

The decode step's pieces (ponder.kernels.decode_step) are forward-only; these must also be fast in
backward. On CUDA SwiGLU and rotary are hand-written Triton pairs where they pass their trials (faster
than compiled, see pieces), and the norms are compiled with their backward; elsewhere all run eagerly.
"""

from __future__ import annotations

import torch

from ponder.kernels.norm import add_rms, add_rms_train_cpu, rms, rms_train_cpu
from ponder.kernels.rope import rope_qk, rope_qk_fn, rope_qk_signed
from ponder.kernels.swiglu import swiglu, swiglu_fn
from ponder.kernels.trials import compile_each

EAGER = dict(rms=rms, add_rms=add_rms, rope_qk=rope_qk, swiglu=swiglu)
# CPU: the same values and gradients, bit for bit, in fewer eager operations each way
CPU = dict(EAGER, rms=rms_train_cpu, add_rms=add_rms_train_cpu, rope_qk=rope_qk_signed)
_chosen: dict = {}


def pieces(device: torch.device) -> dict:
    """EAGER compiled with their backward on CUDA (each after a forward + backward trial), eager elsewhere."""
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        return EAGER
    if "pieces" not in _chosen:
        with torch.enable_grad():  # the trials' backward needs a graph, even when the first call scores without one
            x = torch.randn(64, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
            w = torch.ones(256, device=device, dtype=torch.bfloat16, requires_grad=True)
            h = x.view(64, 4, 64)
        cs = torch.randn(64, 1, 64, device=device, dtype=torch.bfloat16)
        trial = dict(rms=(x, w, 1e-6), add_rms=(x, x, w, 1e-6), rope_qk=(h, h, cs, cs), swiglu=(x, x))
        # hand-written passes where they run (H200, per layer of a 45,000-token micro-batch): SwiGLU forward
        # 0.41 ms and backward 1.13 ms against 0.65 and 1.23 ms compiled; rotary, see ponder.kernels.rope
        hand = {"swiglu": swiglu_fn(device), "rope_qk": rope_qk_fn(device)}
        hand = {k: f for k, f in hand.items() if f is not None}
        _chosen["pieces"] = compile_each({k: f for k, f in EAGER.items() if k not in hand}, trial, "packed forward",
                                         backward=True) | hand
    return _chosen["pieces"]
