"""SwiGLU, silu(gate) * up: the torch math, and the training pass's as two Triton kernels: one pass over
the two inputs in forward, one in backward that gives both gradients. The MLP's activations are the largest
tensors of the packed pass ([tokens, intermediate] each), so these passes are bound by memory traffic alone.
`swiglu_fn(device)` gives this op where Triton runs and agrees with the torch math in a trial, else None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from ponder.kernels.trials import trial

BLOCK = 4096


def swiglu(g, u):
    return F.silu(g) * u


if triton is not None:

    @triton.jit
    def _forward_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _backward_kernel(dy_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        # d silu(g) / dg = s * (1 + g * (1 - s))
        tl.store(dg_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=m)
        tl.store(du_ptr + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=m)


    @triton.jit
    def _halves_kernel(x_ptr, out_ptr, inter, sx, so, BLOCK: tl.constexpr):
        """One row's block of silu(x[:, :inter]) * x[:, inter:], read straight from the joined gate|up product."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        g = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + row * sx + inter + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * so + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=m)


def _grid(n: int):
    return (triton.cdiv(n, BLOCK),)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        out = torch.empty_like(g)
        _forward_kernel[_grid(g.numel())](g, u, out, g.numel(), BLOCK=BLOCK, num_warps=8)
        ctx.save_for_backward(g, u)
        return out

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        _backward_kernel[_grid(g.numel())](dy.contiguous(), g, u, dg, du, g.numel(), BLOCK=BLOCK, num_warps=8)
        return dg, du


def triton_swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return _SwiGLU.apply(g, u)


def swiglu_halves(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU of a joined gate|up product [N, 2 * intermediate]: the torch math."""
    return swiglu(*x.chunk(2, -1))


HALVES_BLOCK = 1024


def triton_swiglu_halves(x: torch.Tensor) -> torch.Tensor:
    """swiglu_halves as one kernel over the rows of x (no gradient: the decode step's). The compiled twin,
    handed the two strided halves, moved 1.5 TB/s in the 7B decode step (9.6 us a layer at 128 rows)."""
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = x.new_empty(x.shape[:-1] + (inter,))
    _halves_kernel[(x2.shape[0], triton.cdiv(inter, HALVES_BLOCK))](x2, out, inter, x2.stride(0), inter,
                                                                    BLOCK=HALVES_BLOCK, num_warps=4)
    return out


def halves_trial(device) -> bool:
    """triton_swiglu_halves against the torch math, on a row width that is not a multiple of its block."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((5, 2 * 1500), generator=gen, device=device, dtype=torch.bfloat16).mul(3)
    return torch.allclose(triton_swiglu_halves(x).float(), swiglu_halves(x.float()), atol=2e-2, rtol=2e-2)


def _agrees(device) -> bool:
    """Values and both gradients against the torch math, on a size that is not a multiple of the block."""
    gen = torch.Generator(device=device).manual_seed(0)
    g, u = (torch.randn((37, 301), generator=gen, device=device, dtype=torch.bfloat16).mul(3).requires_grad_()
            for _ in range(2))
    dy = torch.randn((37, 301), generator=gen, device=device, dtype=torch.bfloat16)
    outs = []
    for fn in (triton_swiglu, lambda a, b: (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)):
        y = fn(g, u)
        outs.append((y, *torch.autograd.grad(y, (g, u), dy)))
    return all(torch.allclose(a.float(), b.float(), atol=2e-2, rtol=2e-2) for a, b in zip(*outs))


_chosen: dict = {}


def swiglu_fn(device: torch.device):
    """triton_swiglu where Triton runs on this device and passes the trial; None otherwise (one notice on CUDA)."""
    if device.type != "cuda" or triton is None:
        return None
    if "fn" not in _chosen:
        ok = trial(lambda: _agrees(device), "the Triton SwiGLU failed its trial; using the compiled one", "packed forward")
        _chosen["fn"] = triton_swiglu if ok else None
    return _chosen["fn"]
