"""The decode step's matrix products, y = x @ w.T + b, for a few rows (the decode batch) against a large weight.

At 128-256 rows cuBLAS ran the 0.5B decode step's products in 5-11 us where reading their weights takes 1-4 us
(bench/README.md, "the decode products by BLAS back end"): its kernels for these shapes cover the output with a
few dozen tiles, so most of the GPU idles while a tile walks a long inner dimension (the MLP's down product
most). Here the output is cut into BM x BN tiles and, where that leaves the GPU short of work, the inner
dimension into SPLIT parts. Each program stores its part in float32; the last of a tile's programs to finish
(a counter per tile, reset by that program) sums the parts in order, adds the bias and writes the tile. One
launch, and the same sums at every run.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from ponder.kernels.trials import trial

COUNTERS = 1 << 16  # tiles a split launch may have (each its own counter)
_counters: dict = {}  # device -> its counters
_chosen: dict = {}  # device -> skinny_linear or None (after the trial)


if triton is not None:

    @triton.jit
    def _finish(acc, acc_u, b_ptr, rn, N, dtype: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr):
        """A tile's float32 sums -> its output: + bias, or silu(gate) * up of the sums rounded to the output dtype
        first, as the separate product and SwiGLU kernel round them."""
        if SWIGLU:
            g = acc.to(dtype).to(tl.float32)
            out = g * tl.sigmoid(g) * acc_u.to(dtype).to(tl.float32)
        else:
            out = acc
            if HAS_BIAS:
                out += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        return out

    @triton.jit
    def _kernel(x_ptr, w_ptr, b_ptr, y_ptr, part_ptr, count_ptr, M, N, K, sxm, swn, sym,
                HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, SPLIT: tl.constexpr, SWIGLU: tl.constexpr):
        """SWIGLU: w is gate|up joined ([2N, K]) and the output silu(x @ gate.T) * (x @ up.T), [M, N]."""
        tile = tl.program_id(0)
        part = tl.program_id(1)
        tiles_n = tl.cdiv(N, BN)
        rm = (tile // tiles_n) * BM + tl.arange(0, BM)
        rn = (tile % tiles_n) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        per = tl.cdiv(tl.cdiv(K, BK), SPLIT) * BK  # each part's share of the inner dimension, whole blocks
        lo = part * per
        hi = tl.minimum(lo + per, K)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
        w_cols = w_ptr + rn[None, :].to(tl.int64) * swn
        m_ok, n_ok = rm[:, None] < M, rn[None, :] < N
        u_cols = w_cols + N * swn  # SWIGLU: the up rows, N after their gate rows
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(lo, hi, BK):
            kk = k + rk
            if EVEN_K:
                a_ok, w_ok = m_ok, n_ok
            else:
                a_ok, w_ok = m_ok & (kk[None, :] < K), n_ok & (kk[:, None] < K)
            a = tl.load(x_rows + kk[None, :], mask=a_ok, other=0.0)
            acc += tl.dot(a, tl.load(w_cols + kk[:, None], mask=w_ok, other=0.0))
            if SWIGLU:
                acc_u += tl.dot(a, tl.load(u_cols + kk[:, None], mask=w_ok, other=0.0))
        out = y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :]
        dtype = y_ptr.dtype.element_ty
        if SPLIT == 1:
            tl.store(out, _finish(acc, acc_u, b_ptr, rn, N, dtype, HAS_BIAS, SWIGLU).to(dtype), mask=m_ok & n_ok)
        else:
            at = rm[:, None].to(tl.int64) * N + rn[None, :]
            ways = 2 if SWIGLU else 1  # a part's sums: [ways, M, N] of the float32 buffer
            tl.store(part_ptr + part * ways * M * N + at, acc, mask=m_ok & n_ok)
            if SWIGLU:
                tl.store(part_ptr + (part * 2 + 1) * M * N + at, acc_u, mask=m_ok & n_ok)
            tl.debug_barrier()  # every thread's part stored before the counter says so
            if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:  # the tile's last part: sum them
                total = tl.zeros((BM, BN), dtype=tl.float32)
                total_u = tl.zeros((BM, BN), dtype=tl.float32)
                for p in range(SPLIT):  # in order: the same sum whichever part finished last
                    total += tl.load(part_ptr + p * ways * M * N + at, mask=m_ok & n_ok, other=0.0, cache_modifier=".cg")
                    if SWIGLU:
                        total_u += tl.load(part_ptr + (p * 2 + 1) * M * N + at, mask=m_ok & n_ok, other=0.0,
                                           cache_modifier=".cg")
                tl.store(out, _finish(total, total_u, b_ptr, rn, N, dtype, HAS_BIAS, SWIGLU).to(dtype), mask=m_ok & n_ok)
                tl.atomic_xchg(count_ptr + tile, 0)  # ready for the next launch


def config(m: int, n: int, k: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, SPLIT, warps) for an [m, k] x [k, n] product: tiles as tall as the rows need, then the inner
    dimension split until about two programs a multiprocessor have work."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn, bk = 64, 64
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    blocks = triton.cdiv(k, bk)
    split = max(1, min(2 * sms // tiles, blocks // 4, 16))
    return bm, bn, bk, split, 4


def skinny_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, cfg=None) -> torch.Tensor:
    """F.linear(x, w, b) for 2-D x (rows contiguous along k) and w [n, k] with unit stride along k."""
    return _launch(x, w, b, w.shape[0], False, cfg)


def skinny_swiglu(x: torch.Tensor, w: torch.Tensor, cfg=None) -> torch.Tensor:
    """silu(g) * u of the joined gate|up product x @ w.T (w [2 x intermediate, k]) in the product's own launch: no
    [rows, 2 x intermediate] output written and read again, and one kernel a layer less."""
    return _launch(x, w, None, w.shape[0] // 2, True, cfg)


def _launch(x, w, b, n: int, swiglu: bool, cfg):
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    bm, bn, bk, split, warps = cfg or config(m, n, k, _sms(x.device))
    y = x.new_empty((m, n))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if split > 1 and tiles > COUNTERS:
        split = 1
    part = x.new_empty((split, 2 if swiglu else 1, m, n), dtype=torch.float32) if split > 1 else y
    counts = _counter_buffer(x.device)
    _kernel[(tiles, split)](x, w, b if b is not None else w, y, part, counts, m, n, k, x.stride(0), w.stride(0),
                            y.stride(0), HAS_BIAS=b is not None, EVEN_K=k % bk == 0, BM=bm, BN=bn, BK=bk,
                            SPLIT=split, SWIGLU=swiglu, num_warps=warps)
    return y


def fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether skinny_linear takes this product: a decode batch of rows, 16-bit operands of one dtype, k-contiguous w."""
    return (x.dim() == 2 and x.shape[0] <= 512 and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16)
            and w.stride(-1) == 1)


def linear_fn(device: torch.device):
    """skinny_linear where Triton runs on this CUDA device and agrees with F.linear in a trial; None otherwise."""
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _chosen:
        ok = trial(lambda: skinny_trial(device), "the Triton decode products failed their trial; using cuBLAS's")
        _chosen[key] = skinny_linear if ok else None
    return _chosen[key]


def skinny_trial(device) -> bool:
    """skinny_linear against F.linear in float32 on shapes that take one part and several, with and without a
    bias and with rows and columns that do not fill a tile; twice, so that the counters were left zeroed."""
    gen = torch.Generator(device=device).manual_seed(0)
    for m, n, k, bias in ((5, 200, 1000, True), (130, 96, 4160, False), (64, 1000, 256, True)):
        x = torch.randn((m, k), generator=gen, device=device).to(torch.bfloat16)
        w = torch.randn((n, k), generator=gen, device=device).to(torch.bfloat16)
        b = torch.randn(n, generator=gen, device=device).to(torch.bfloat16) if bias else None
        want = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
        for _ in range(2):
            if not torch.allclose(skinny_linear(x, w, b).float(), want, atol=0.1, rtol=1e-2):
                return False
    return True


def _sms(device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: the H200's count, so tests exercise the split path as a GPU would
    return torch.cuda.get_device_properties(device).multi_processor_count


def _counter_buffer(device) -> torch.Tensor:
    """One zeroed counter per tile, shared by every launch on the device (each launch leaves it zeroed)."""
    key = str(device)
    if key not in _counters:
        _counters[key] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[key]
