"""Small fused pieces of the decode step (norm, rotary, SwiGLU, sampling), compiled once on CUDA.

A decode step of a small model is bound by the number of kernels more than by their work: each of
these turns five to eight element-wise kernels into one. On CUDA with Triton, two hand-written kernels
replace compiled pieces once they pass a trial: the sampler (the CDF inverted at one hashed uniform a row,
the vocabulary split across programs) and rotary with the K/V cache write. On CPU, or if compilation
fails, the same functions run eagerly (same math), except that the CPU samples by Gumbel-max.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


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


def cdf_pick(logits, keys, inv_temperature):
    """Sample from softmax(logits * inv_temperature) by inverting its CDF at one uniform per row (a hash of
    the row key). One exp per logit, where Gumbel-max spends a hashed uniform and two logs: on CUDA that
    made the sampler bound by arithmetic. This is the reference of triton_cdf_pick, which sums in another
    order, so a draw within float rounding of the boundary between two tokens may fall on either.
    24-bit uniforms: a token less likely than 2**-24 may be skipped. Returns the tokens and their log-probs."""
    x = logits.float() * inv_temperature
    m = x.max(-1, keepdim=True).values
    p = (x - m).exp()
    cum = p.cumsum(-1)
    z = cum[:, -1]
    u = (shr(hash32(keys), 8).float() + 0.5) * (1.0 / 16777216)
    ids = torch.arange(x.shape[-1], device=x.device)
    last = torch.where(p > 0, ids, 0).max(-1).values  # u * z rounded up to z must not pick a zero-mass tail
    tok = torch.minimum((cum <= (u * z)[:, None]).sum(-1), last)
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - m.squeeze(-1) - z.log()


def greedy_pick(logits, keys, inv_temperature):
    x = logits.float()
    tok = x.argmax(-1)
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - x.logsumexp(-1)


if triton is not None:

    @triton.jit
    def _hash32(x):
        """hash32 above, on int32 (products wrap; masks make the shifts logical)."""
        x = x ^ ((x >> 16) & 0xFFFF)
        x = x * 2146121005  # 0x7FEB352D
        x = x ^ ((x >> 15) & 0x1FFFF)
        x = x * -2073254261  # 0x846CA68B as int32
        return x ^ ((x >> 16) & 0xFFFF)

    @triton.jit
    def _lse_part(logits_ptr, max_ptr, sum_ptr, vocab, stride, chunk, inv_t, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        """One (row, vocabulary chunk): (max, sum of exp) of the scaled logits."""
        row = tl.program_id(0)
        part = tl.program_id(1)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        lo = part * chunk
        hi = tl.minimum(lo + chunk, vocab)
        offs = tl.arange(0, BLOCK)
        for start in range(lo, hi, BLOCK):
            tok = start + offs
            x = tl.load(logits_ptr + row.to(tl.int64) * stride + tok, mask=tok < hi, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(x, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        tl.store(max_ptr + row * SPLITS + part, m)
        tl.store(sum_ptr + row * SPLITS + part, total)

    @triton.jit
    def _cdf_pick(logits_ptr, keys_ptr, max_ptr, sum_ptr, out_tok_ptr, out_lp_ptr, vocab, stride, chunk, inv_t,
                  SPLITS: tl.constexpr, S_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """Per row: the chunks' sums give the normaliser and the chunk where the CDF crosses u * z; a
        cumulative sum over that chunk alone finds the token."""
        row = tl.program_id(0)
        i = tl.arange(0, S_PAD)
        ok = i < SPLITS
        m = tl.load(max_ptr + row * SPLITS + i, mask=ok, other=float("-inf"))
        mx = tl.max(m, 0)
        w = tl.where(ok, tl.load(sum_ptr + row * SPLITS + i, mask=ok, other=0.0) * tl.exp(m - mx), 0.0)
        z = tl.sum(w, 0)
        bits = _hash32(tl.load(keys_ptr + row))
        target = (((bits >> 8) & 0xFFFFFF).to(tl.float32) + 0.5) * (1.0 / 16777216) * z
        cum = tl.cumsum(w, 0)
        last_part = tl.max(tl.where(w > 0, i, 0), 0)  # a target rounded up to z stays in a chunk with mass
        part = tl.minimum(tl.sum(((cum <= target) & ok).to(tl.int32), 0), last_part)
        rest = target - tl.sum(tl.where(i < part, w, 0.0), 0)
        lo = part * chunk
        hi = tl.minimum(lo + chunk, vocab)
        offs = tl.arange(0, BLOCK)
        found = tl.full((), -1, tl.int32)
        last = lo
        acc = tl.full((), 0.0, tl.float32)
        for start in range(lo, hi, BLOCK):
            tok = start + offs
            inside = tok < hi
            x = tl.load(logits_ptr + row.to(tl.int64) * stride + tok, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
            p = tl.exp(x - mx)
            c = tl.cumsum(p, 0) + acc
            below = tl.sum(((c <= rest) & inside).to(tl.int32), 0)  # c rises: those below form a prefix
            found = tl.where((found < 0) & (below < tl.sum(inside.to(tl.int32), 0)), start + below, found)
            last = tl.maximum(last, tl.max(tl.where(p > 0, tok, -1), 0))
            acc += tl.sum(p, 0)
        pick = tl.where(found < 0, last, found)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride + pick).to(tl.float32) * inv_t
        tl.store(out_tok_ptr + row, pick.to(tl.int64))
        tl.store(out_lp_ptr + row, x - mx - tl.log(z))

    @triton.jit
    def _rope_store(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, table_ptr, qo_ptr, c_ptr,
                    sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, st_l, st_b, sc_kv, sc_p, sc_h, sc_l,
                    HEADS: tl.constexpr, KV: tl.constexpr, H_PAD: tl.constexpr, KV_PAD: tl.constexpr,
                    HALF: tl.constexpr, HALF_PAD: tl.constexpr, PAGE: tl.constexpr):
        """Row b: rotary on its query heads (written to qo, contiguous) and key heads; the rotated keys and
        the values written straight into row b's cache slot pos[b] (block table[b, pos // PAGE]). Head dims
        have unit stride."""
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
        tl.store(slot, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(c_ptr.dtype.element_ty), mask=m)
        tl.store(slot + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(c_ptr.dtype.element_ty), mask=m)
        at = v_ptr + b * sv_b + g[:, None] * sv_h + d[None, :]
        tl.store(slot + sc_kv, tl.load(at, mask=m, other=0.0).to(c_ptr.dtype.element_ty), mask=m)
        tl.store(slot + sc_kv + HALF, tl.load(at + HALF, mask=m, other=0.0).to(c_ptr.dtype.element_ty), mask=m)


def triton_rope_store(q, k, v, cos, sin, pos, cache, table):
    """Rotary on q [B, heads, D] and k [B, kv heads, D] at positions pos [B] (tables cos/sin [L, D]); k and
    v written into the block pool cache [2, blocks, kv heads, block, D] at row b's slot pos[b], in block
    table[b, pos[b] // block]. Returns rotated q. One kernel for what rope_kv and the cache's index_put do in three."""
    batch, heads, dim = q.shape
    kv = k.shape[1]
    for t in (q, k, v, cos, sin, cache):
        assert t.stride(-1) == 1, "rope_store needs unit-stride head dims"
    out = torch.empty((batch, heads, dim), dtype=q.dtype, device=q.device)
    half = dim // 2
    _rope_store[(batch,)](q, k, v, cos, sin, pos, table, out, cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                          v.stride(0), v.stride(1), cos.stride(0), table.stride(0), cache.stride(0), cache.stride(1),
                          cache.stride(2), cache.stride(3), HEADS=heads, KV=kv, H_PAD=max(2, 1 << (heads - 1).bit_length()),
                          KV_PAD=max(2, 1 << (kv - 1).bit_length()), HALF=half,
                          HALF_PAD=max(2, 1 << (half - 1).bit_length()), PAGE=cache.shape[3], num_warps=1)
    return out


def triton_cdf_pick(logits, keys, inv_temperature, splits: int = 32, block: int = 2048, num_warps: int = 4):
    """cdf_pick in two small kernels: (max, sum of exp) for chunks of the vocabulary per row in parallel (a
    row alone is too little work for the GPU), then one program per row that inverts the CDF. H200, 256 x
    151,936 bf16 logits: see bench/README.md (the Gumbel-max sampler it replaced took 0.144 ms)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    chunk = -(-(-(-vocab // splits)) // block) * block
    splits = -(-vocab // chunk)
    f32 = dict(dtype=torch.float32, device=logits.device)
    m, total = (torch.empty((rows, splits), **f32) for _ in range(2))
    _lse_part[(rows, splits)](logits, m, total, vocab, logits.stride(0), chunk, float(inv_temperature),
                              SPLITS=splits, BLOCK=block, num_warps=num_warps)
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    lp = torch.empty(rows, **f32)
    _cdf_pick[(rows,)](logits, keys, m, total, tokens, lp, vocab, logits.stride(0), chunk, float(inv_temperature),
                       SPLITS=splits, S_PAD=max(2, 1 << (splits - 1).bit_length()), BLOCK=block, num_warps=num_warps)
    return tokens, lp


EAGER = dict(rms=rms, add_rms=add_rms, rope_kv=rope_kv, swiglu=swiglu, pick=gumbel_pick, greedy_pick=greedy_pick)
_compiled: dict | None = None


def kernels(device: torch.device) -> dict:
    """The functions above, compiled when on CUDA and the compiler handles them here; eager otherwise.
    On CUDA also 'rope_store' (triton_rope_store, or None without a working Triton) and, when it passes its
    trial, triton_cdf_pick as 'pick' (on the CPU 'pick' stays the Gumbel-max draw, which the documented
    CPU runs were made with)."""
    global _compiled
    if device.type != "cuda":
        return EAGER
    if _compiled is None:
        x = torch.randn(4, 4096, device=device, dtype=torch.bfloat16)
        w = torch.ones(4096, device=device, dtype=torch.bfloat16)
        keys = row_keys(torch.tensor(1, device=device), torch.tensor(2, device=device), torch.arange(4, device=device))
        h = x.view(4, 64, 64)
        trial = dict(rms=(x, w, 1e-6), add_rms=(x, x, w, 1e-6), rope_kv=(h, h, h, h[:, :1], h[:, :1]), swiglu=(x, x),
                     pick=(x, keys, 1.0), greedy_pick=(x, keys, 1.0))
        _compiled = compile_each(EAGER, trial, "fast engine")
        if _cdf_trial(device):
            _compiled["pick"] = triton_cdf_pick
        _compiled["rope_store"] = triton_rope_store if _rope_store_trial(device) else None
    return _compiled


def compile_each(funcs: dict, trials: dict, who: str, backward: bool = False) -> dict:
    """Each function compiled (dynamic shapes, one graph) when a call on its trial arguments runs, and with
    `backward` its backward too; the eager function otherwise, with one notice naming those."""
    out, failed = {}, []
    for name, f in funcs.items():
        try:
            fn = torch.compile(f, dynamic=True, fullgraph=True)
            res = fn(*trials[name])
            if backward:
                sum(r.float().sum() for r in (res if isinstance(res, tuple) else (res,))).backward()
            out[name] = fn
        except Exception:  # noqa: BLE001  (any compiler failure: that piece runs eagerly)
            out[name], failed = f, failed + [name]
    if failed:
        print(f"ponder: {who}: torch.compile failed for {', '.join(failed)}; those run unfused", file=sys.stderr)
    return out


def trial(check, notice: str, who: str = "fast engine") -> bool:
    """Whether `check()` (a Triton piece run beside its torch twin) runs and agrees; one notice if not."""
    if triton is None:
        return False
    try:
        if check():
            return True
    except Exception:  # noqa: BLE001  (any compiler or launch failure: the torch piece stays)
        pass
    print(f"ponder: {who}: {notice}", file=sys.stderr)
    return False


def _rope_store_trial(device) -> bool:
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


def cdf_agrees(logits, keys, inv_temperature, tok, lp, tol: float = 1e-5) -> bool:
    """Whether each token is where the CDF of softmax(logits * inv_temperature), in float64, crosses the
    row's uniform (within tol), has mass, and comes with its log-probability."""
    x = logits.double() * inv_temperature
    p = x.softmax(-1)
    hi = p.cumsum(-1).gather(-1, tok[:, None]).squeeze(-1)
    mass = p.gather(-1, tok[:, None]).squeeze(-1)
    u = (shr(hash32(keys), 8).double() + 0.5) / 16777216
    return bool(((hi - mass - tol <= u) & (u <= hi + tol) & (mass > 0)).all()) and torch.allclose(
        lp.double(), mass.log(), atol=1e-3, rtol=1e-3)


def _cdf_trial(device) -> bool:
    """Whether the Triton sampler runs here and inverts the CDF where it should."""

    def check():
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn((8, 50000), generator=g, device=device, dtype=torch.bfloat16) * 4
        keys = row_keys(torch.tensor(5, device=device), torch.tensor(1, device=device), torch.arange(8, device=device))
        tok, lp = triton_cdf_pick(logits, keys, 1.3)
        return cdf_agrees(logits, keys, 1.3, tok, lp)

    return trial(check, "the Triton sampler failed its trial; sampling runs compiled (Gumbel-max)")
