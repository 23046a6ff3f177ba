"""out += a @ b with one rounding: a float32 sum of bf16 products, added by the product itself where it can.

Gradient accumulation over micro-batches (the update's linear layers, the output head's chunks) adds bf16 products
into float32 buffers. The plain way writes each bf16 product, then reads it back to add it: a pass over the whole
[out, in] matrix a product, and the product rounded to bf16 before the sum. On CUDA, cuBLAS takes bf16 inputs and a
float32 output with beta = 1 (torch.addmm's `out_dtype`): the gradient accumulation fusion of large-model trainers.
"""

from __future__ import annotations

import torch

_fused: dict = {}  # device type -> whether torch.addmm takes out_dtype (bf16 inputs, float32 output) there


def fused_float32(device: torch.device) -> bool:
    """Whether torch.addmm adds a bf16 product into a float32 tensor in one call on this device type."""
    if device.type not in _fused:
        try:
            a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
            c = torch.zeros((2, 2), dtype=torch.float32, device=device)
            torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
            _fused[device.type] = bool((c == 2).all())
        except (RuntimeError, TypeError, NotImplementedError):
            _fused[device.type] = False
    return _fused[device.type]


@torch.no_grad()
def add_product_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b, in out's dtype: in the product where the dtypes agree or the fused float32 output runs, else
    the product cast and added (CPU)."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b)
    if out.dtype == torch.float32 and fused_float32(a.device):
        return torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    return out.add_(torch.mm(a, b).to(out.dtype))
