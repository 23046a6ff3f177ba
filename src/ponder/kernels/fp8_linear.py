"""Products from e4m3 matrices for the rollout (rollout.engine_options.weight_dtype: fp8).

Each matrix is stored in e4m3 with a scale per output row (its largest |value| at 448); each input row is cast
with a scale of its own the same way, at every product; one torch._scaled_mm with both sets of scales (FP8 tensor
cores on Ada and Hopper) gives the product in the compute dtype. Half the bytes of a bf16 matrix: the decode step
of a 7B model is mostly the reading of its matrices. The rows' cast is one Triton kernel on CUDA (a row a program,
two passes over it); its torch twin runs elsewhere and is the reference.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from ponder.kernels.trials import trial

E4M3 = torch.float8_e4m3fn
TOP = 448.0  # e4m3's largest finite value
TINY = 1e-12  # a row or matrix row of zeros: any scale will do, not 0 (0 / 0)


@torch.no_grad()
def fp8_matrix(w: torch.Tensor, out=None, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] as e4m3 with a float32 scale per output row: (w8 [out, in], scales [1, out]), w ~ w8 * scales.T;
    written into `out` (such a pair) if given. Made `chunk` rows at a time: a float32 copy of a 7B model's gate|up
    matrix at once would be 0.5 GiB, three times over."""
    w8, scales = out if out is not None else (torch.empty(w.shape, dtype=E4M3, device=w.device),
                                              torch.empty((1, w.shape[0]), dtype=torch.float32, device=w.device))
    for i in range(0, w.shape[0], chunk):  # a matrix's output rows are scaled as a product's input rows are
        q, s = rows_fp8(w[i : i + chunk])
        w8[i : i + chunk] = q
        scales[0, i : i + chunk] = s[:, 0]
    return w8, scales


def rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, K] as e4m3 rows, each scaled so that its largest |value| lands at 448: (q [N, K], scales [N, 1])."""
    x = x.float()
    s = x.abs().amax(1, keepdim=True).clamp(min=TINY) / TOP
    return (x / s).to(E4M3), s


def fits(w: torch.Tensor) -> bool:
    """Whether torch._scaled_mm takes this matrix: both its dimensions multiples of 16."""
    return w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0


def fp8_linear(x, w8, w_scale, bias=None, rows=rows_fp8, out_dtype=None):
    """F.linear(x, w, bias) from w's e4m3 form (fp8_matrix) and x's rows cast by `rows`; in out_dtype (x's)."""
    lead, k = x.shape[:-1], x.shape[-1]
    q, s = rows(x.reshape(-1, k))
    out = torch._scaled_mm(q, w8.t(), scale_a=s, scale_b=w_scale, out_dtype=out_dtype or x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*lead, w8.shape[0])


if triton is not None:

    @triton.jit
    def _rows_fp8(x_ptr, q_ptr, s_ptr, K, sx, sq, TOP: tl.constexpr, TINY: tl.constexpr, BLOCK: tl.constexpr):
        """Row r: its largest |value| (first pass), then the row divided by that / TOP, stored as e4m3."""
        r = tl.program_id(0).to(tl.int64)
        top = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, K, BLOCK):
            c = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + r * sx + c, mask=c < K, other=0.0).to(tl.float32)
            top = tl.maximum(top, tl.abs(x))
        scale = tl.maximum(tl.max(top, axis=0), TINY) / TOP
        for start in range(0, K, BLOCK):
            c = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + r * sx + c, mask=c < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + r * sq + c, (x / scale).to(q_ptr.dtype.element_ty), mask=c < K)
        tl.store(s_ptr + r, scale)


@functools.cache
def rows_cast(device: torch.device):
    """The rows' cast to use on this device: the Triton kernel on CUDA once it passed its trial, else torch's."""
    return triton_rows_fp8 if device.type == "cuda" and triton is not None and rows_fp8_trial(device) else rows_fp8


def triton_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rows_fp8 as one Triton kernel."""
    x = x if x.stride(1) == 1 else x.contiguous()
    n, k = x.shape
    q = torch.empty((n, k), dtype=E4M3, device=x.device)
    s = torch.empty((n, 1), dtype=torch.float32, device=x.device)
    _rows_fp8[(n,)](x, q, s, k, x.stride(0), q.stride(0), TOP=TOP, TINY=TINY, BLOCK=1024, num_warps=4)
    return q, s


def rows_fp8_trial(device) -> bool:
    """Whether the Triton cast runs here and gives rows_fp8's bytes and scales."""

    def check():
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn((5, 3000), generator=g, device=device, dtype=torch.bfloat16) * 7
        x[3] = 0
        q, s = triton_rows_fp8(x)
        q_ref, s_ref = rows_fp8(x)
        same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
        return torch.allclose(s, s_ref) and same > 0.999

    return trial(check, "the Triton fp8 cast of a product's rows failed its trial; using torch's")
