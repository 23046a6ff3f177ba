"""Log-probabilities through the output head without float32 logits: the head and log-softmax as one op.

The plain way turns each chunk's [rows, vocab] logits to float32 and makes five or six passes over them
(log-sum-exp, gather, softmax and a product for the entropy; softmax again and a cast in backward). Here
the logits stay in the compute dtype and each chunk is read once in forward and once in backward:
- forward: logits = h @ W^T, then one pass gives the log-sum-exp, the target's logit and the entropy
  (an online softmax that also carries sum(p * x));
- backward: one pass turns each chunk's logits in place into the gradient
  g * (onehot(target) - softmax) / temperature (and, where the loss holds the entropy H, that term's
  -g_H * p * (log p + H) / temperature), which two matrix products carry to h and W. The logits
  are kept from forward when they take at most a quarter of the free GPU memory, else recomputed.
On CUDA the passes are Triton kernels; elsewhere (or without Triton) the same math in float32 torch.
"""

from __future__ import annotations

import torch

from ponder.kernels.accumulate import add_product_
from ponder.kernels.trials import trial

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

CHUNK_ROWS = 4096  # a chunk of [4096, 151,936] bf16 logits: 1.2 GiB (the only one alive unless they are kept)


def head_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                  with_entropy: bool = True, chunk_rows: int = CHUNK_ROWS, keep: bool | None = None,
                  scratch: torch.Tensor | None = None, weight_copy: torch.Tensor | None = None,
                  entropy_grad: bool = False):
    """Rows h [M, d], output head weight [V, d], targets [M] -> float32 log-probs [M] (with gradients to h
    and weight) and entropies [M] (None unless asked; detached unless entropy_grad). Kept logits go first into `scratch` (flat
    bytes that are free until backward is done: the rollout engine's idle cache), as many rows as fit.
    `weight_copy`: the weight already in h's dtype (the rollout copy's head), used for the products in place of
    a cast of `weight` each way; the gradient still goes to `weight`."""
    use_triton = h.is_cuda and triton_runs(h.device)
    if keep is None:  # keeping the logits saves backward a matrix product; only where they fit with room to spare
        size = h.shape[0] * weight.shape[0] * h.element_size()
        keep = h.is_cuda and torch.is_grad_enabled() and 4 * size < torch.cuda.mem_get_info(h.device)[0]
    if weight_copy is not None and weight_copy.dtype != h.dtype:
        weight_copy = None
    lp, ent = _HeadLogprobs.apply(h, weight, targets, 1.0 / temperature, chunk_rows, use_triton, with_entropy, keep,
                                  scratch if keep else None, weight_copy, with_entropy and entropy_grad)
    return lp, (ent if with_entropy else None)


def chunks(m: int, vocab: int, itemsize: int, chunk_rows: int, scratch_bytes: int) -> list[tuple[int, int, bool]]:
    """(start, end, in scratch) of the row chunks: the first fills the scratch when there is one."""
    first = min(m, scratch_bytes // (vocab * itemsize))
    out = [(0, first, True)] if first else []
    out += [(i, min(i + chunk_rows, m), False) for i in range(first, m, chunk_rows)]
    return out


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, inv_t, chunk_rows, use_triton, with_entropy, keep=False, scratch=None,
                weight_copy=None, entropy_grad=False):
        w = weight.to(h.dtype) if weight_copy is None else weight_copy
        m, vocab = h.shape[0], w.shape[0]
        lse = torch.empty(m, dtype=torch.float32, device=h.device)
        lp = torch.empty_like(lse)
        ent = torch.empty_like(lse)
        ctx.parts = chunks(m, vocab, h.element_size(), chunk_rows, scratch.numel() if scratch is not None else 0)
        ctx.kept = []
        for a, b, lent in ctx.parts:
            if lent:
                out = scratch[: (b - a) * vocab * h.element_size()].view(h.dtype).view(b - a, vocab)
                logits = torch.matmul(h[a:b], w.T, out=out)
            else:
                logits = h[a:b] @ w.T
            if keep:
                ctx.kept.append(logits)
            stats = _triton_stats if use_triton else _torch_stats
            lse[a:b], lp[a:b], ent[a:b] = stats(logits, targets[a:b], inv_t, with_entropy)
        ctx.save_for_backward(h, weight, targets, lse, ent)
        ctx.inv_t, ctx.use_triton, ctx.weight_copy = inv_t, use_triton, weight_copy
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None, not a tensor of zeros
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        h, weight, targets, lse, ent = ctx.saved_tensors
        w = weight.to(h.dtype) if ctx.weight_copy is None else ctx.weight_copy
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # summed over chunks in the weight's dtype by the matrix product itself (float32 inside, one rounding a
        # chunk, as micro-batches accumulate); float32 master weights get a float32 sum (ponder.kernels.accumulate)
        grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=h.device) if ctx.needs_input_grad[1] else None
        grad_lp = torch.zeros_like(lse) if grad_lp is None else grad_lp.float().contiguous()
        if grad_ent is not None:
            grad_ent = grad_ent.float().contiguous()
        for n, (a, b, _) in enumerate(ctx.parts):
            hc = h[a:b]
            logits = ctx.kept[n] if ctx.kept else hc @ w.T
            to_grad = _triton_grad if ctx.use_triton else _torch_grad
            g = to_grad(logits, targets[a:b], lse[a:b], grad_lp[a:b], ctx.inv_t,
                        *((ent[a:b], grad_ent[a:b]) if grad_ent is not None else ()))
            if grad_h is not None:
                grad_h[a:b] = g @ w
            if grad_w is not None:
                add_product_(grad_w, g.T, hc)
            if ctx.kept:
                ctx.kept[n] = None  # free each chunk once used
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------- torch math
def softmax_entropy(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last dimension, from float32 logits and their logsumexp, p taken as exp(x - lse): with
    torch.softmax's p, lse - sum p x was 1e-3 off at a 152k vocabulary in float32 on the CPU; this is 1e-5 or less."""
    log_p = x - lse[..., None]
    return -(log_p.exp() * log_p).sum(-1)


def _torch_stats(logits, targets, inv_t, with_entropy):
    x = logits.float() * inv_t
    lse = x.logsumexp(-1)
    lp = x.gather(-1, targets[:, None]).squeeze(-1) - lse
    ent = softmax_entropy(x, lse) if with_entropy else torch.zeros_like(lse)
    return lse, lp, ent


def _torch_grad(logits, targets, lse, grad_lp, inv_t, ent=None, grad_ent=None):
    """d lp / d logits = (onehot - p) / T, times the incoming gradient; with the entropy's incoming gradient g_H,
    plus d H / d logits = -p * (log p + H) / T times g_H. In the logits' dtype."""
    g = logits.float() * inv_t - lse[:, None]  # log p, then in place the gradient: one float32 [rows, V] buffer
    if grad_ent is None:
        g = g.exp_().neg_().scatter_add_(-1, targets[:, None], torch.ones_like(lse)[:, None])
        return g.mul_((grad_lp * inv_t)[:, None]).to(logits.dtype)
    p = g.exp()  # with the entropy's term, -p * (g_lp + g_H * (log p + H)) + g_lp at the target: a second buffer
    g.add_(ent[:, None]).mul_(grad_ent[:, None]).add_(grad_lp[:, None]).mul_(p).neg_()
    g.scatter_add_(-1, targets[:, None], grad_lp[:, None])
    return g.mul_(inv_t).to(logits.dtype)


# ---------------------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _stats_kernel(x_ptr, t_ptr, lse_ptr, lp_ptr, ent_ptr, vocab, stride, inv_t, BLOCK: tl.constexpr):
        """Row r: online softmax over the vocabulary carrying max m, sum s = sum e^(x-m) and u = sum e^(x-m) x,
        so that lse = m + log s and entropy = lse - u / s."""
        r = tl.program_id(0)
        base = x_ptr + r.to(tl.int64) * stride
        target = tl.load(t_ptr + r)
        offs = tl.arange(0, BLOCK)
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.full((), 0.0, tl.float32)
        u = tl.full((), 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            ok = start + offs < vocab
            x = tl.load(base + start + offs, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(x, 0))
            scale = tl.exp(m - m_new)
            e = tl.where(ok, tl.exp(x - m_new), 0.0)
            s = s * scale + tl.sum(e, 0)
            u = u * scale + tl.sum(e * tl.where(ok, x, 0.0), 0)
            m = m_new
        lse = m + tl.log(s)
        xt = tl.load(base + target).to(tl.float32) * inv_t
        tl.store(lse_ptr + r, lse)
        tl.store(lp_ptr + r, xt - lse)
        tl.store(ent_ptr + r, lse - u / s)

    @triton.jit
    def _grad_kernel(x_ptr, t_ptr, lse_ptr, g_ptr, ent_ptr, ge_ptr, vocab, stride, inv_t, BLOCK: tl.constexpr,
                     ENTROPY: tl.constexpr):
        """In place: x <- (g * (onehot(target) - p) - g_H * p * (log p + H)) / T, p = exp(x / T - lse); the g_H
        term only where the entropy has a gradient (ENTROPY)."""
        r = tl.program_id(0)
        base = x_ptr + r.to(tl.int64) * stride
        target = tl.load(t_ptr + r)
        lse = tl.load(lse_ptr + r)
        g = tl.load(g_ptr + r)
        if ENTROPY:
            ent = tl.load(ent_ptr + r)
            ge = tl.load(ge_ptr + r)
        offs = tl.arange(0, BLOCK)
        for start in range(0, vocab, BLOCK):
            idx = start + offs
            ok = idx < vocab
            log_p = tl.load(base + idx, mask=ok, other=0.0).to(tl.float32) * inv_t - lse
            p = tl.exp(log_p)
            d = g * (tl.where(idx == target, 1.0, 0.0) - p)
            if ENTROPY:
                d -= ge * p * (log_p + ent)
            tl.store(base + idx, (d * inv_t).to(x_ptr.dtype.element_ty), mask=ok)


def _triton_stats(logits, targets, inv_t, with_entropy):
    rows, vocab = logits.shape
    lse, lp, ent = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(3))
    _stats_kernel[(rows,)](logits, targets, lse, lp, ent, vocab, logits.stride(0), float(inv_t), BLOCK=4096, num_warps=8)
    return lse, lp, ent


def _triton_grad(logits, targets, lse, grad_lp, inv_t, ent=None, grad_ent=None):
    rows, vocab = logits.shape
    entropy = grad_ent is not None
    _grad_kernel[(rows,)](logits, targets, lse, grad_lp, ent if entropy else lse, grad_ent if entropy else lse, vocab,
                          logits.stride(0), float(inv_t), BLOCK=4096, ENTROPY=entropy, num_warps=8)
    return logits


_usable: dict = {}  # device -> whether the Triton passes ran and agreed with the torch math there


def triton_runs(device: torch.device) -> bool:
    """Whether the Triton passes run on `device` and agree with the torch math (tried once a device; a failure
    prints one notice and the torch math does the work)."""
    if device not in _usable:
        _usable[device] = triton is not None and trial(lambda: _agrees(device), "the Triton head log-probs failed "
                                                       "their trial; using the torch math", "packed forward")
    return _usable[device]


def _agrees(device) -> bool:
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn((5, 9000), generator=g, device=device) * 3).to(torch.bfloat16)  # over two 4,096 blocks
    targets = torch.tensor([0, 8999, 4095, 4096, 17], device=device)
    grad_lp = torch.linspace(-1, 1, 5, device=device)
    mine, ref = _triton_stats(logits, targets, 0.7, True), _torch_stats(logits, targets, 0.7, True)
    stats = all(torch.allclose(a, b, atol=1e-2, rtol=1e-2) for a, b in zip(mine, ref))
    grads = all(  # without and with the entropy's term (algorithm.entropy_coef)
        torch.allclose(_triton_grad(logits.clone(), targets, ref[0], grad_lp, 0.7, *ent).float(),
                       _torch_grad(logits, targets, ref[0], grad_lp, 0.7, *ent).float(), atol=1e-2)
        for ent in ((), (ref[2], grad_lp.flip(0))))
    return stats and grads
