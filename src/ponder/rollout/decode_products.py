"""Two matrix products of the decode step with the op after them done in their epilogue (Triton, CUDA).

At batch 256 a decode step's products are short, and the op that follows each one re-reads its whole
output in another kernel:
- the output head writes [B, vocab] logits (78 MB for Qwen2.5) that the sampler then reads back.
  `head_sample` draws the token inside the product instead: each tile of the vocabulary keeps only its
  best Gumbel-perturbed score and its share of the log-sum-exp, and one small kernel merges the tiles.
  Same noise bits as fast_kernels.gumbel_pick (hash of the row key and the token id).
- gate|up writes [B, 2 x intermediate] for SwiGLU to read. `gate_up_silu` computes a gate tile and the
  matching up tile side by side and writes silu(gate) * up only.
`products(device)` gives these where Triton runs and agrees with the torch math in a trial, else {}.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from ponder.rollout.fast_kernels import trial

if triton is not None:
    from ponder.rollout.fast_kernels import _hash32

    @triton.jit
    def _head_gumbel(h_ptr, w_ptr, keys_ptr, score_ptr, tok_ptr, pick_ptr, max_ptr, sum_ptr, rows, vocab, dim,
                     s_h, s_w, inv_t, TILES, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Tile (rows, vocabulary slice) of h @ w.T, rounded like the model's logits and scaled by inv_t;
        per row: the best Gumbel-perturbed score, its token and scaled logit, and (max, sum of exp)."""
        pid_m = tl.program_id(0)  # the row tiles of one vocabulary slice run side by side: w is read once
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok, n_ok = rm < rows, rn < vocab
        a_at = h_ptr + rm[:, None] * s_h + rk[None, :]
        b_at = w_ptr + rn[None, :].to(tl.int64) * s_w + rk[:, None]
        acc = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, dim, BK):
            k_ok = k0 + rk < dim
            a = tl.load(a_at, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_at, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            acc = tl.dot(a, b, acc)
            a_at += BK
            b_at += BK
        x = acc.to(h_ptr.dtype.element_ty).to(tl.float32) * inv_t
        x = tl.where(n_ok[None, :], x, float("-inf"))
        key = tl.load(keys_ptr + rm, mask=m_ok, other=0)
        bits = _hash32(_hash32(key[:, None] + rn[None, :]) ^ key[:, None])
        u = (((bits >> 8) & 0xFFFFFF).to(tl.float32) + 0.5) * (1.0 / 16777216)
        best, at = tl.max(x - tl.log(-tl.log(u)), 1, return_indices=True)
        picked = tl.sum(tl.where(tl.arange(0, BN)[None, :] == at[:, None], x, 0.0), 1)
        mx = tl.max(x, 1)
        total = tl.sum(tl.exp(x - mx[:, None]), 1)
        out = rm * TILES + pid_n
        tl.store(score_ptr + out, best, mask=m_ok)
        tl.store(tok_ptr + out, pid_n * BN + at, mask=m_ok)
        tl.store(pick_ptr + out, picked, mask=m_ok)
        tl.store(max_ptr + out, mx, mask=m_ok)
        tl.store(sum_ptr + out, total, mask=m_ok)

    @triton.jit
    def _head_merge(score_ptr, tok_ptr, pick_ptr, max_ptr, sum_ptr, out_tok_ptr, out_lp_ptr, TILES,
                    T_PAD: tl.constexpr):
        """Per row: the tile with the best score gives the token; the tiles' sums merge into the log-sum-exp."""
        row = tl.program_id(0)
        i = tl.arange(0, T_PAD)
        ok = i < TILES
        at = row * TILES + i
        score = tl.load(score_ptr + at, mask=ok, other=float("-inf"))
        _, best = tl.max(score, 0, return_indices=True)
        m = tl.load(max_ptr + at, mask=ok, other=float("-inf"))
        mx = tl.max(m, 0)
        total = tl.sum(tl.where(ok, tl.load(sum_ptr + at, mask=ok, other=0.0) * tl.exp(m - mx), 0.0), 0)
        tl.store(out_tok_ptr + row, tl.load(tok_ptr + row * TILES + best).to(tl.int64))
        tl.store(out_lp_ptr + row, tl.load(pick_ptr + row * TILES + best) - mx - tl.log(total))

    @triton.jit
    def _gate_up_silu(h_ptr, w_ptr, out_ptr, rows, inter, dim, s_h, s_w, s_o,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Tile of silu(h @ gate.T) * (h @ up.T), where w = [gate; up] ([2 x inter, dim])."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        m_ok, n_ok = rm < rows, rn < inter
        a_at = h_ptr + rm[:, None] * s_h + rk[None, :]
        g_at = w_ptr + rn[None, :].to(tl.int64) * s_w + rk[:, None]
        u_at = g_at + inter * s_w
        acc_g = tl.zeros((BM, BN), tl.float32)
        acc_u = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, dim, BK):
            k_ok = k0 + rk < dim
            a = tl.load(a_at, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b_ok = n_ok[None, :] & k_ok[:, None]
            acc_g = tl.dot(a, tl.load(g_at, mask=b_ok, other=0.0), acc_g)
            acc_u = tl.dot(a, tl.load(u_at, mask=b_ok, other=0.0), acc_u)
            a_at += BK
            g_at += BK
            u_at += BK
        # rounded as the separate products would write them, then SwiGLU in float32 as the compiled piece does
        g = acc_g.to(out_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(out_ptr.dtype.element_ty).to(tl.float32)
        y = g * tl.sigmoid(g) * u
        tl.store(out_ptr + rm[:, None] * s_o + rn[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


# (BM, BN, BK, warps, stages) by what was fastest on an H200 at batch 256 (bench/decode_products.py)
HEAD_CONFIG = (128, 128, 64, 8, 3)
GATE_UP_CONFIG = (64, 64, 64, 4, 4)


def _rows_tile(rows: int, bm: int) -> int:
    """A row tile no taller than the batch needs (at least 16, what tensor-core products take)."""
    return min(bm, max(16, triton.next_power_of_2(rows)))


def head_sample(h, weight, keys, inv_temperature: float, config=None):
    """Tokens [B] drawn from softmax(h @ weight.T * inv_temperature) and their log-probs [B] (float32),
    without the logits ever leaving the chip. h [B, dim] and weight [vocab, dim] share a 16-bit dtype."""
    bm, bn, bk, warps, stages = config or HEAD_CONFIG
    rows, dim = h.shape
    vocab = weight.shape[0]
    bm = _rows_tile(rows, bm)
    tiles = triton.cdiv(vocab, bn)
    f32 = dict(dtype=torch.float32, device=h.device)
    score, picked, mx, total = (torch.empty((rows, tiles), **f32) for _ in range(4))
    tok = torch.empty((rows, tiles), dtype=torch.int32, device=h.device)
    _head_gumbel[(triton.cdiv(rows, bm), tiles)](
        h, weight, keys, score, tok, picked, mx, total, rows, vocab, dim, h.stride(0), weight.stride(0),
        float(inv_temperature), tiles, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    tokens = torch.empty(rows, dtype=torch.long, device=h.device)
    lp = torch.empty(rows, **f32)
    _head_merge[(rows,)](score, tok, picked, mx, total, tokens, lp, tiles,
                         T_PAD=max(2, triton.next_power_of_2(tiles)), num_warps=4)
    return tokens, lp


def gate_up_silu(h, weight, config=None):
    """silu(h @ gate.T) * (h @ up.T) [B, inter] where weight = [gate; up] is [2 x inter, dim]."""
    bm, bn, bk, warps, stages = config or GATE_UP_CONFIG
    rows, dim = h.shape
    inter = weight.shape[0] // 2
    bm = _rows_tile(rows, bm)
    out = torch.empty((rows, inter), dtype=h.dtype, device=h.device)
    _gate_up_silu[(triton.cdiv(rows, bm), triton.cdiv(inter, bn))](
        h, weight, out, rows, inter, dim, h.stride(0), weight.stride(0), out.stride(0),
        BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
    return out


def usable(h, weight) -> bool:
    """Whether the kernels take these operands: 16-bit, same dtype, unit-stride rows, on CUDA."""
    return (h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and weight.dtype == h.dtype
            and h.stride(-1) == 1 and weight.stride(-1) == 1)


_chosen: dict = {}


def products(device: torch.device) -> dict:
    """{'head_sample': ..., 'gate_up_silu': ...}, each present if it runs here and passes its trial."""
    if device.type != "cuda" or triton is None:
        return {}
    if "done" not in _chosen:
        if trial(lambda: _head_trial(device), "the fused head + sampler failed its trial; the head and sampler run apart"):
            _chosen["head_sample"] = head_sample
        if trial(lambda: _gate_up_trial(device), "the fused gate|up + SwiGLU failed its trial; they run apart"):
            _chosen["gate_up_silu"] = gate_up_silu
        _chosen["done"] = True
    return {k: v for k, v in _chosen.items() if k != "done"}


def _head_trial(device) -> bool:
    """Small integers make every product exact in float32 and in bf16, so the draw must be gumbel_pick's own."""
    from ponder.rollout.fast_kernels import gumbel_pick, row_keys

    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randint(-2, 3, (40, 96), generator=g, device=device).to(torch.bfloat16)
    w = torch.randint(-2, 3, (3000, 96), generator=g, device=device).to(torch.bfloat16)
    keys = row_keys(torch.tensor(5, device=device), torch.tensor(1, device=device), torch.arange(40, device=device))
    tok, lp = head_sample(h, w, keys, 0.3)
    ref_tok, ref_lp = gumbel_pick(h @ w.T, keys, 0.3)
    return torch.equal(tok, ref_tok) and torch.allclose(lp, ref_lp, atol=1e-3, rtol=1e-3)


def _gate_up_trial(device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn((40, 96), generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn((2 * 200, 96), generator=g, device=device) * 0.1).to(torch.bfloat16)
    gate, up = (h @ w.T).chunk(2, -1)
    ref = (torch.nn.functional.silu(gate.float()) * up.float()).to(torch.bfloat16)
    return torch.allclose(gate_up_silu(h, w).float(), ref.float(), atol=2e-2, rtol=2e-2)
