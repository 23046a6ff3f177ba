"""Attention of one new token per row over a paged KV cache: a split-KV ("flash-decoding") Triton kernel.

The cache is a pool of blocks of `block` slots each ([blocks, kv heads, block, head dim] for K and for V);
row b's slot s lives in block table[b, s // block] at offset s % block, so rows hold memory only for the
tokens they have, and the G samples of one prompt can share the blocks of its prefix.
Decoding reads every live cache slot once per step, so its attention is bound by memory bandwidth.
This kernel reads only each row's live slots [0, pos[row]] (never the padding up to the length bucket),
reads each kv head once for all the query heads that share it (GQA), and splits a row's slots across
several programs so that small batches still fill the GPU; a second small kernel merges the splits.
The grid depends only on (batch, kv heads, length), and nothing is read on the host: CUDA-graph safe.

`decode_attention` uses the kernel on CUDA when Triton is there and the kernel passes a first trial
against `reference`; otherwise (and on CPU) it runs `reference`, the same math in plain torch. (The fast
engine's Forward, given attention='triton' on CUDA without a working kernel, uses cuDNN's SDPA instead.)
Measured on an H200, 0.5B shape (256 rows, 2 kv heads of 7 query heads, head dim 64, bf16), one layer:
16.5 us at slots 128..640 live per row against 46 us for SDPA over the 640-slot bucket; 2.5 to 3.7 TB/s
of live K/V read.
"""

from __future__ import annotations

import math
import sys

import torch

from ponder.kernels.trials import trial

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch reference does the work
    triton = None


def gather(pool, table, length: int) -> torch.Tensor:
    """Rows' slots [0, length) out of a block pool [blocks, kv heads, block, D] as one tensor [B, kv heads, length, D]."""
    block = pool.shape[2]
    rows = pool[table[:, : -(-length // block)]]  # [B, blocks of the row, kv heads, block, D]
    return rows.transpose(1, 2).flatten(2, 3)[:, :, :length]


def reference(q, k_cache, v_cache, pos, scale: float) -> torch.Tensor:
    """q [B, kv heads, group, D]; caches [B, kv heads, L, D] (gathered); pos [B]: row b attends slots [0, pos[b]]."""
    length = k_cache.shape[2]
    slots = torch.arange(length, device=q.device)
    hidden = slots[None, :] > pos[:, None]  # [B, L]
    s = torch.matmul(q, k_cache.transpose(-1, -2)).float() * scale
    s = s.masked_fill(hidden[:, None, None, :], float("-inf"))
    return torch.matmul(s.softmax(-1).to(v_cache.dtype), v_cache).to(q.dtype)


if triton is not None:

    @triton.jit
    def _partial(
        q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, out_ptr, s_ptr,
        sq_b, sq_h, sq_g, sq_d, sk_p, sk_h, sk_l, sk_d, sv_p, sv_h, sv_l, sv_d, st_b, so_b, so_h, so_g, so_d,
        n_kv, length, chunk, qk_scale,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, FP8: tl.constexpr,
    ):
        """One (row, kv head, split): online softmax over the split's live slots, all GROUP query heads at once.
        With one split it writes the normalised output; otherwise the unnormalised sum and its (max, total).
        FP8 (an e4m3 cache, stored as K / s[0] and V / s[1]): the products in float16, which e4m3 widens to in
        one instruction (bf16 takes several, and the kernel then ran at half the bytes per second: H100, 7B, 58.5
        against 62.6 us for twice the bytes); float16 holds every e4m3 value exactly, and the scaled queries and
        the weights p (at most 1) closer than bf16 does. The scales multiply the float32 scores and output."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // n_kv
        h = bh % n_kv
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        gd_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :] * sq_d, mask=gd_mask, other=0.0)
        # base-2 exponentials: fold log2(e) into the scale once
        if FP8:
            q = (q.to(tl.float32) * qk_scale).to(tl.float16)
            k_scale, v_scale = tl.load(s_ptr), tl.load(s_ptr + 1)
        else:
            q = (q.to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)
        live = tl.minimum(tl.load(pos_ptr + b).to(tl.int32) + 1, length)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, live)
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        n = tl.arange(0, BLOCK_N)
        # every tile starts at a live slot, so each row of `s` has a finite maximum (no inf - inf)
        for start in range(lo, hi, BLOCK_N):
            slot = start + n
            page = tl.load(table_ptr + b * st_b + slot // PAGE, mask=slot < hi, other=0).to(tl.int64)
            off = slot % PAGE
            nd_mask = (slot[:, None] < hi) & (d[None, :] < HEAD_DIM)
            k = tl.load(k_ptr + (page * sk_p + h * sk_h + off * sk_l)[:, None] + d[None, :] * sk_d, mask=nd_mask, other=0.0)
            v = tl.load(v_ptr + (page * sv_p + h * sv_h + off * sv_l)[:, None] + d[None, :] * sv_d, mask=nd_mask, other=0.0)
            if FP8:
                k, v = k.to(tl.float16), v.to(tl.float16)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            if FP8:
                s = s * k_scale
            s = tl.where(slot[None, :] < hi, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            total = total * alpha + tl.sum(p, 1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if FP8:
            acc = acc * v_scale
        if SPLITS == 1:
            o = acc / total[:, None]
            tl.store(out_ptr + b * so_b + h * so_h + g[:, None] * so_g + d[None, :] * so_d,
                     o.to(out_ptr.dtype.element_ty), mask=gd_mask)
        else:
            row = bh * SPLITS + split  # partials are contiguous [B * n_kv, SPLITS, G_PAD, (D_PAD)]
            tl.store(m_ptr + row * G_PAD + g, m)
            tl.store(l_ptr + row * G_PAD + g, total)
            tl.store(o_ptr + (row * G_PAD + g[:, None]) * D_PAD + d[None, :], acc)

    @triton.jit
    def _merge(
        o_ptr, m_ptr, l_ptr, out_ptr, so_b, so_h, so_g, so_d, n_kv,
        GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS: tl.constexpr,
    ):
        """Combine the splits of one (row, kv head); split 0 always holds slot 0, so the running max is finite
        from the first split on, and empty splits (max -inf, total 0) weigh nothing."""
        bh = tl.program_id(0)
        b = bh // n_kv
        h = bh % n_kv
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        m = tl.full((G_PAD,), float("-inf"), tl.float32)
        total = tl.zeros((G_PAD,), tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), tl.float32)
        for split in range(SPLITS):
            row = bh * SPLITS + split
            m_s = tl.load(m_ptr + row * G_PAD + g)
            m_new = tl.maximum(m, m_s)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(m_s - m_new)
            total = total * alpha + tl.load(l_ptr + row * G_PAD + g) * w
            acc = acc * alpha[:, None] + tl.load(o_ptr + (row * G_PAD + g[:, None]) * D_PAD + d[None, :]) * w[:, None]
            m = m_new
        o = acc / total[:, None]
        mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
        tl.store(out_ptr + b * so_b + h * so_h + g[:, None] * so_g + d[None, :] * so_d,
                 o.to(out_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << (n - 1).bit_length())


_sm_count: dict = {}
TILE = 128  # slots per tile (H200: 128 beat 32 and 64 at every batch tried)
# slots one program reads at most. H200, bench/decode_attention.py (2026-12-04): 512 rows of long-tailed lengths
# up to 8,256 slots took 280 us a layer unsplit and 242 at 8,192; 128 rows of 4,200 slots ran at 5.4 TB/s
# unsplit and slower at every cap below 8,192 (158 us at 2,048 against 103)
MAX_CHUNK = 8192


def plan(batch: int, n_kv: int, length: int, device: torch.device, block_n: int = TILE,
         max_chunk: int | None = None) -> tuple[int, int]:
    """(splits, slots per split). Measured on an H200: while the (row, kv head) programs alone fill the
    multiprocessors, splitting only adds partial writes and a merge (256 rows, 640 slots: 1 split is best);
    below that, split until there are about two programs per multiprocessor, down to one tile a split. And
    however many rows there are, no program reads more than max_chunk slots: the longest rows of a
    long-tailed batch would otherwise run on alone after the others finished."""
    if device.type == "cuda":
        if device not in _sm_count:
            _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
        sms = _sm_count[device]
    else:
        sms = 4
    tiles = -(-length // block_n)
    programs = batch * n_kv
    splits = 1 if programs >= sms else min(tiles, -(-2 * sms // programs))
    splits = max(splits, -(-length // (max_chunk or MAX_CHUNK)))
    chunk = -(-tiles // splits) * block_n
    return -(-length // chunk), chunk


def triton_attention(q, k_pool, v_pool, table, pos, scale: float, length: int, splits: int | None = None,
                     block_n: int = TILE, num_warps: int = 4, num_stages: int = 2, kv_scale=None):
    """The kernel itself (no fallback). q [B, kv heads, group, D]; pools [blocks, kv heads, block, D], any
    strides; table [B, blocks a row]; rows attend slots [0, min(pos, length - 1)]. An fp8 pool holds K and V
    divided by kv_scale (float32 [2]; ones if not given)."""
    fp8 = k_pool.element_size() == 1
    if fp8 and kv_scale is None:
        kv_scale = torch.ones(2, device=q.device)
    batch, n_kv, group, dim = q.shape
    if splits is None:
        splits, chunk = plan(batch, n_kv, length, q.device, block_n)
    else:
        chunk = -(-(-(-length // splits)) // block_n) * block_n
        splits = -(-length // chunk)
    g_pad, d_pad = _pow2(group, 16), _pow2(dim, 16)
    out = torch.empty_like(q)
    if splits > 1:
        part = torch.empty((batch * n_kv, splits, g_pad, d_pad), dtype=torch.float32, device=q.device)
        m = torch.empty((batch * n_kv, splits, g_pad), dtype=torch.float32, device=q.device)
        total = torch.empty_like(m)
    else:
        part = m = total = out  # unused by the one-split kernel
    consts = dict(GROUP=group, G_PAD=g_pad, HEAD_DIM=dim, D_PAD=d_pad)
    _partial[(batch * n_kv, splits)](
        q, k_pool, v_pool, table, pos, part, m, total, out, kv_scale if fp8 else pos, *q.stride(), *k_pool.stride(), *v_pool.stride(),
        table.stride(0), *out.stride(), n_kv, length, chunk, scale * math.log2(math.e),
        BLOCK_N=block_n, PAGE=k_pool.shape[2], SPLITS=splits, IEEE=q.dtype == torch.float32 and k_pool.element_size() > 1,
        FP8=fp8, num_warps=num_warps, num_stages=num_stages, **consts,
    )
    if splits > 1:
        _merge[(batch * n_kv,)](part, m, total, out, *out.stride(), n_kv, SPLITS=splits, num_warps=4, **consts)
    return out


_usable: dict = {}  # device -> whether the kernel passed its trial there


def _trial(device: torch.device) -> bool:
    """Run the kernel once on a small mixed-length GQA problem and compare it with the reference."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn((5, 2, 7, 64), generator=g, device=device, dtype=torch.bfloat16)
    k = torch.randn((48, 2, 32, 64), generator=g, device=device, dtype=torch.bfloat16)  # blocks of 32 slots
    v = torch.randn((48, 2, 32, 64), generator=g, device=device, dtype=torch.bfloat16)
    table = torch.randperm(48, generator=g, device=device)[:40].view(5, 8)  # 256 slots a row, scattered
    pos = torch.tensor([0, 255, 17, 128, 200], device=device)
    ref = reference(q.float(), gather(k, table, 256).float(), gather(v, table, 256).float(), pos, 0.125)
    return all(
        torch.allclose(triton_attention(q, k, v, table, pos, 0.125, 256, splits=s).float(), ref, atol=2e-2, rtol=2e-2)
        for s in (1, 3)
    )


def available(device) -> bool:
    """Whether the Triton kernel runs on `device` (tried once per device, outside any graph capture;
    a failure prints one notice)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _usable:
        if triton is None:
            print("ponder: fast engine: decode attention: Triton is not installed; using the torch reference", file=sys.stderr)
            _usable[device] = False
        else:
            _usable[device] = trial(lambda: _trial(device), "decode attention: the Triton kernel failed its trial; "
                                    "using the torch reference")
    return _usable[device]


def decode_attention(q, k_pool, v_pool, table, pos, scale: float, length: int, dtype: torch.dtype | None = None,
                     kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per row: q [B, kv heads, group, D] (the query heads sharing a kv head
    grouped) or [B, heads, D]; pools [blocks, kv heads, block, D]; table [B, blocks a row]; row b attends
    slots [0, pos[b]] (pos < length). `dtype`: the products' (default the cache's; an fp8 cache is read in
    it, times `kv_scale`, float32 [2] for K and V). Returns the shape of q."""
    shape = q.shape
    if q.dim() == 3:
        q = q.view(shape[0], k_pool.shape[1], shape[1] // k_pool.shape[1], shape[2])
    # q in the products' dtype, rounded as autocast rounds SDPA's inputs: Qwen3's q_norm over a float32 master's
    # norm weights gives float32 queries beside a bf16 cache, and the kernel's products take one dtype
    q = q.to(dtype or k_pool.dtype)
    if available(q.device):
        out = triton_attention(q, k_pool, v_pool, table, pos, scale, length, kv_scale=kv_scale)
    else:
        k, v = (gather(p, table, length).to(q.dtype) for p in (k_pool, v_pool))
        if kv_scale is not None:
            k, v = k * kv_scale[0], v * kv_scale[1]
        out = reference(q, k, v, pos, scale)
    return out.view(shape)
