"""Token sampling with counter-based noise: each draw depends on (seed, step, sequence) alone.

The noise is a 32-bit hash of a row key and the token id, so there is no RNG state to carry, a draw does
not depend on which batch slot or step a sequence runs in, and the sampler is safe inside a CUDA graph.
On the CPU tokens are drawn by Gumbel-max; on CUDA by inverting the CDF (two Triton kernels, after a
trial), with cdf_pick as their torch reference.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from ponder.kernels.trials import trial

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
    if seqs.device.type == "cpu":
        return torch.from_numpy(_row_keys_np(seed.numpy(), step.numpy(), seqs.numpy()).view(np.int32))
    k = hash32(to_i32(seed + step * 0x9E3779B9))
    return hash32(k ^ to_i32(seqs * 0x85EBCA6B))


# The CPU runs these hashes in numpy on uint32, where shifts are logical and products wrap as lowbias32 is
# written: the same bits in five array operations where torch's int32 needs eleven, and numpy's cost a few
# times less each on these small arrays (the sampler was a sixth of the CPU decode step of a small model).
def _hash32_np(x):
    with np.errstate(over="ignore"):  # wrapping is the point (numpy warns only for 0-d operands)
        x = x ^ (x >> 16)
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> 15)
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> 16)


def _row_keys_np(seed, step, seqs):
    low = lambda v: (np.asarray(v, dtype=np.int64) & M32).astype(np.uint32)  # noqa: E731  (int64 wraps as torch's)
    k = _hash32_np(low(seed + step * 0x9E3779B9))
    return _hash32_np(k ^ low(seqs * 0x85EBCA6B))


def _uniforms(keys, vocab: int, device):
    """[B, vocab] float32 uniforms in (0, 1) of 24 bits: a hash of each row's key and the token id."""
    if device.type == "cpu":
        k = keys.numpy().view(np.uint32)[:, None]
        bits = _hash32_np(_hash32_np(k + np.arange(vocab, dtype=np.uint32)[None, :]) ^ k)
        # scaled by 2**-24 in numpy (exact in float32, as torch's product was): one torch operation less a step
        return torch.from_numpy(((bits >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216))
    ids = torch.arange(vocab, device=device, dtype=torch.int32)
    k = keys[:, None]
    bits = hash32(hash32(k + ids[None, :]) ^ k)  # two rounds: neighbouring ids decorrelate fully
    return (shr(bits, 8).float() + 0.5) * (1.0 / 16777216)


def gumbel_pick(logits, keys, inv_temperature):
    """Sample from softmax(logits * inv_temperature) by the Gumbel-max trick, with counter-based noise
    (a hash of the row key and the token id: no RNG state, one pass over the logits, graph-safe).
    24-bit uniforms: tokens less likely than about e^-17 times the top one are never drawn.
    Returns the tokens, their log-probabilities and each row's entropy."""
    x_cpu = logits.device.type == "cpu"
    if x_cpu:  # no operation that changes nothing (a cast to float32, a product by 1)
        x = logits if logits.dtype == torch.float32 else logits.float()
        x = x if inv_temperature == 1.0 else x * inv_temperature
    else:
        x = logits.float() * inv_temperature
    u = _uniforms(keys, x.shape[-1], x.device)
    gumbel = u.log_().neg_().log_() if x_cpu else (-u.log()).log()  # -log(-log(u)), subtracted: u is our own
    tok = (x - gumbel).argmax(-1)
    lse = x.logsumexp(-1)
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - lse, entropy_of(x, lse)


def entropy_of(x, lse):
    """The entropy of softmax(x) per row, from float32 x [B, V] and its log-sum-exp [B]: lse - sum(p * x), a token of
    no mass (x = -inf: filtered out) adding nothing. The trainer's entropy metric takes it from the rollout."""
    return lse - (x - lse[:, None]).exp_().mul_(x).nan_to_num_(0.0).sum(-1)


def cdf_pick(logits, keys, inv_temperature):
    """Sample from softmax(logits * inv_temperature) by inverting its CDF at one uniform per row (a hash of
    the row key). One exp per logit, where Gumbel-max spends a hashed uniform and two logs: on CUDA that
    made the sampler bound by arithmetic. This is the reference of triton_cdf_pick, which sums in another
    order, so a draw within float rounding of the boundary between two tokens may fall on either.
    24-bit uniforms: a token less likely than 2**-24 may be skipped. Returns the tokens, their log-probs and each
    row's entropy."""
    x = logits.float() * inv_temperature
    m = x.max(-1, keepdim=True).values
    p = (x - m).exp()
    cum = p.cumsum(-1)
    z = cum[:, -1]
    u = (shr(hash32(keys), 8).float() + 0.5) * (1.0 / 16777216)
    ids = torch.arange(x.shape[-1], device=x.device)
    last = torch.where(p > 0, ids, 0).max(-1).values  # u * z rounded up to z must not pick a zero-mass tail
    tok = torch.minimum((cum <= (u * z)[:, None]).sum(-1), last)
    lse = m.squeeze(-1) + z.log()
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - lse, entropy_of(x, lse)


def greedy_pick(logits, keys, inv_temperature):
    x = logits.float()
    tok = x.argmax(-1)
    lse = x.logsumexp(-1)
    return tok, x.gather(-1, tok[:, None]).squeeze(-1) - lse, entropy_of(x, lse)


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
    def _lse_part(logits_ptr, max_ptr, sum_ptr, dot_ptr, vocab, stride, chunk, inv_t, SPLITS: tl.constexpr,
                  BLOCK: tl.constexpr):
        """One (row, vocabulary chunk): max m, sum of exp and sum of exp * x (for the entropy) of the scaled logits x,
        the sums relative to m."""
        row = tl.program_id(0)
        part = tl.program_id(1)
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        dot = tl.full((), 0.0, tl.float32)
        lo = part * chunk
        hi = tl.minimum(lo + chunk, vocab)
        offs = tl.arange(0, BLOCK)
        for start in range(lo, hi, BLOCK):
            tok = start + offs
            x = tl.load(logits_ptr + row.to(tl.int64) * stride + tok, mask=tok < hi, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(x, 0))
            scale = tl.exp(m - m_new)
            e = tl.exp(x - m_new)
            total = total * scale + tl.sum(e, 0)
            dot = dot * scale + tl.sum(tl.where(e > 0, e * x, 0.0), 0)
            m = m_new
        tl.store(max_ptr + row * SPLITS + part, m)
        tl.store(sum_ptr + row * SPLITS + part, total)
        tl.store(dot_ptr + row * SPLITS + part, dot)

    @triton.jit
    def _cdf_pick(logits_ptr, keys_ptr, max_ptr, sum_ptr, dot_ptr, out_tok_ptr, out_lp_ptr, out_ent_ptr, vocab, stride,
                  chunk, inv_t, SPLITS: tl.constexpr, S_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """Per row: the chunks' sums give the normaliser and the chunk where the CDF crosses u * z; a
        cumulative sum over that chunk alone finds the token."""
        row = tl.program_id(0)
        i = tl.arange(0, S_PAD)
        ok = i < SPLITS
        m = tl.load(max_ptr + row * SPLITS + i, mask=ok, other=float("-inf"))
        mx = tl.max(m, 0)
        w = tl.where(ok, tl.load(sum_ptr + row * SPLITS + i, mask=ok, other=0.0) * tl.exp(m - mx), 0.0)
        z = tl.sum(w, 0)
        dot = tl.sum(tl.where(ok, tl.load(dot_ptr + row * SPLITS + i, mask=ok, other=0.0) * tl.exp(m - mx), 0.0), 0)
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
        tl.store(out_ent_ptr + row, mx + tl.log(z) - dot / z)  # lse - sum(p * x)


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
    m, total, dot = (torch.empty((rows, splits), **f32) for _ in range(3))
    _lse_part[(rows, splits)](logits, m, total, dot, vocab, logits.stride(0), chunk, float(inv_temperature),
                              SPLITS=splits, BLOCK=block, num_warps=num_warps)
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    lp, ent = torch.empty(rows, **f32), torch.empty(rows, **f32)
    _cdf_pick[(rows,)](logits, keys, m, total, dot, tokens, lp, ent, vocab, logits.stride(0), chunk,
                       float(inv_temperature), SPLITS=splits, S_PAD=max(2, 1 << (splits - 1).bit_length()), BLOCK=block,
                       num_warps=num_warps)
    return tokens, lp, ent


def cdf_agrees(logits, keys, inv_temperature, tok, lp, ent=None, tol: float = 1e-5) -> bool:
    """Whether each token is where the CDF of softmax(logits * inv_temperature), in float64, crosses the
    row's uniform (within tol), has mass, and comes with its log-probability (and the row its entropy)."""
    x = logits.double() * inv_temperature
    p = x.softmax(-1)
    if ent is not None and not torch.allclose(ent.double(), -torch.special.xlogy(p, p).sum(-1), atol=1e-3, rtol=1e-3):
        return False
    hi = p.cumsum(-1).gather(-1, tok[:, None]).squeeze(-1)
    mass = p.gather(-1, tok[:, None]).squeeze(-1)
    u = (shr(hash32(keys), 8).double() + 0.5) / 16777216
    return bool(((hi - mass - tol <= u) & (u <= hi + tol) & (mass > 0)).all()) and torch.allclose(
        lp.double(), mass.log(), atol=1e-3, rtol=1e-3)


def cdf_trial(device) -> bool:
    """Whether the Triton sampler runs here and inverts the CDF where it should."""

    def check():
        g = torch.Generator(device=device).manual_seed(0)
        logits = torch.randn((8, 50000), generator=g, device=device, dtype=torch.bfloat16) * 4
        keys = row_keys(torch.tensor(5, device=device), torch.tensor(1, device=device), torch.arange(8, device=device))
        return cdf_agrees(logits, keys, 1.3, *triton_cdf_pick(logits, keys, 1.3))

    return trial(check, "the Triton sampler failed its trial; sampling runs compiled (Gumbel-max)")
