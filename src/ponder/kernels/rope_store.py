"""The decode step's rotary and KV-cache write as one Triton kernel (CUDA, after a trial).

Per row: rotary on the query heads and key heads at the row's position, the rotated keys and the values
written straight into the row's slot of the paged cache. It replaces rope_kv and the cache's index_put
(three kernels a layer in a step bound by launches). The torch twin is ponder.kernels.rope.rope_kv.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from ponder.kernels.rope import rope_kv
from ponder.kernels.trials import trial

if triton is not None:

    @triton.jit
    def _rope_store(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, table_ptr, qo_ptr, c_ptr, s_ptr, peak_ptr,
                    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, st_l, st_b, sc_kv, sc_p, sc_h, sc_l,
                    HEADS: tl.constexpr, KV: tl.constexpr, H_PAD: tl.constexpr, KV_PAD: tl.constexpr,
                    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr, SCALED: tl.constexpr,
                    WATCH: tl.constexpr):
        """Row b: rotary on its query heads (written to qo, contiguous) and key heads; the rotated keys and
        the values written straight into row b's cache slot pos[b] (block table[b, pos // PAGE]). Head dims
        have unit stride. SCALED (an fp8 cache): keys and values divided by the layer's scales s[0], s[1] first;
        WATCH: the largest |value| so stored raised into peak[0] (NaN ignored)."""
        b = tl.program_id(0)
        p = tl.load(pos_ptr + b)
        page = tl.load(table_ptr + b * st_b + p // PAGE).to(tl.int64)
        d = tl.arange(0, HALF_PAD)
        dm = d < HALF
        cos1 = tl.load(cos_ptr + p * st_l + d, mask=dm, other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + p * st_l + HALF + d, mask=dm, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + p * st_l + d, mask=dm, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + p * st_l + HALF + d, mask=dm, other=0.0).to(tl.float32)
        h = tl.arange(0, H_PAD)
        m = (h[:, None] < HEADS) & dm[None, :]
        at = q_ptr + b * sq_b + h[:, None] * sq_h + d[None, :]
        x1 = tl.load(at, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=m, other=0.0).to(tl.float32)
        out = qo_ptr + (b * HEADS + h[:, None]) * (2 * HALF) + d[None, :]
        tl.store(out, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(qo_ptr.dtype.element_ty), mask=m)
        tl.store(out + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(qo_ptr.dtype.element_ty), mask=m)
        g = tl.arange(0, KV_PAD)
        m = (g[:, None] < KV) & dm[None, :]
        at = k_ptr + b * sk_b + g[:, None] * sk_h + d[None, :]
        x1 = tl.load(at, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=m, other=0.0).to(tl.float32)
        slot = c_ptr + page * sc_p + g[:, None] * sc_h + (p % PAGE) * sc_l + d[None, :]
        k1, k2 = x1 * cos1[None, :] - x2 * sin1[None, :], x2 * cos2[None, :] + x1 * sin2[None, :]
        at = v_ptr + b * sv_b + g[:, None] * sv_h + d[None, :]
        v1, v2 = tl.load(at, mask=m, other=0.0).to(tl.float32), tl.load(at + HALF, mask=m, other=0.0).to(tl.float32)
        if SCALED:
            k_scale, v_scale = tl.load(s_ptr), tl.load(s_ptr + 1)
            k1, k2, v1, v2 = k1 / k_scale, k2 / k_scale, v1 / v_scale, v2 / v_scale
        if WATCH:  # (masked lanes are 0; x == x drops NaN as the prefill's torch.fmax does)
            top = tl.maximum(tl.maximum(tl.abs(k1), tl.abs(k2)), tl.maximum(tl.abs(v1), tl.abs(v2)))
            top = tl.max(tl.max(tl.where(top == top, top, 0.0), axis=1), axis=0)
            tl.atomic_max(peak_ptr, top)
        tl.store(slot, k1.to(c_ptr.dtype.element_ty), mask=m)
        tl.store(slot + HALF, k2.to(c_ptr.dtype.element_ty), mask=m)
        tl.store(slot + sc_kv, v1.to(c_ptr.dtype.element_ty), mask=m)
        tl.store(slot + sc_kv + HALF, v2.to(c_ptr.dtype.element_ty), mask=m)


def triton_rope_store(q, k, v, cos, sin, pos, cache, table, scale=None, peak=None):
    """Rotary on q [B, heads, D] and k [B, kv heads, D] at positions pos [B] (tables cos/sin [L, D]); k and
    v written into the block pool cache [2, blocks, kv heads, block, D] at row b's slot pos[b], in block
    table[b, pos[b] // block]; `scale` (float32 [2], an fp8 cache's): k and v divided by it first; `peak` (float32
    [], of non-negative values): raised to the largest |value| stored, before rounding. Returns rotated q. One
    kernel for what rope_kv and the cache's index_put do in three."""
    batch, heads, dim = q.shape
    kv = k.shape[1]
    for t in (q, k, v, cos, sin, cache):
        assert t.stride(-1) == 1, "rope_store needs unit-stride head dims"
    out = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    half = dim // 2
    _rope_store[(batch,)](q, k, v, cos, sin, pos, table, out, cache, pos if scale is None else scale,
                          pos if peak is None else peak,
                          q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          v.stride(0), v.stride(1), cos.stride(0), table.stride(0), cache.stride(0), cache.stride(1),
                          cache.stride(2), cache.stride(3), HEADS=heads, KV=kv, H_PAD=max(2, 1 << (heads - 1).bit_length()),
                          KV_PAD=max(2, 1 << (kv - 1).bit_length()), HALF=half,
                          HALF_PAD=max(2, 1 << (half - 1).bit_length()), PAGE=cache.shape[3], SCALED=scale is not None,
                          WATCH=peak is not None, num_warps=1)
    return out


def rope_store_trial(device) -> bool:
    """Whether the Triton rotary + cache write runs here and matches rope_kv and index_put."""

    def check():
        g = torch.Generator(device=device).manual_seed(0)
        bf = dict(device=device, dtype=torch.bfloat16)
        q, k, v = (torch.randn((3, n, 64), generator=g, **bf) for n in (14, 2, 2))
        ang = torch.rand((40, 32), generator=g, device=device) * 6
        cos, sin = (torch.cat([f(ang)] * 2, -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
        pos = torch.tensor([0, 39, 17], device=device)
        table = torch.tensor([[1, 4, 2], [3, 5, 7], [6, 8, 9]], device=device)  # blocks of 16 slots
        mine, ref = torch.zeros((2, 2, 10, 2, 16, 64), **bf), torch.zeros((2, 2, 10, 2, 16, 64), **bf)
        qo = triton_rope_store(q, k, v, cos, sin, pos, mine[1], table)
        qr, kv = rope_kv(q, k, v, cos[pos][:, None], sin[pos][:, None])
        ref[1][:, table[torch.arange(3, device=device), pos // 16], :, pos % 16] = kv
        return (torch.allclose(qo.float(), qr.float(), atol=2e-2, rtol=2e-2)
                and torch.allclose(mine.float(), ref.float(), atol=2e-2, rtol=2e-2))

    return trial(check, "the Triton rotary + cache write failed its trial; using the compiled rotary")
