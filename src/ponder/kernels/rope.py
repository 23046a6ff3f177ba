"""Rotary position embedding: the torch math, and the training pass's q and k as Triton kernels (forward and
backward).

q comes as a strided view of the joined q|k|v product ([tokens, heads, dim] with a row stride of the
whole product), and the compiled rotary with dynamic shapes moved such a view at about 0.5 TB/s (H200,
45,000 tokens x 14 heads: 0.30 ms forward, 0.24 ms backward a layer). Here one program takes a block of
tokens, all heads and both halves of the head dim, so every byte is read once with unit stride.
`rope_qk_fn(device)` gives triton_rope_qk(q, k, cos, sin) where Triton runs and agrees with the torch math in a
trial, else None.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from ponder.kernels.trials import trial


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_kv(q, k, v, cos, sin):
    """Rotary on q and k, and k and v stacked [B, 2, kv heads, D] for one write into the cache."""
    return rope(q, cos, sin), torch.stack((rope(k, cos, sin), v), 1)


def rope_qk(q, k, cos, sin):
    return rope(q, cos, sin), rope(k, cos, sin)


TOKENS = 16  # tokens a program

if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n, sx_n, sx_h, sc_n, so_n, so_h, BACKWARD: tl.constexpr,
                     HEADS: tl.constexpr, H_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                     TOKENS: tl.constexpr):
        """Forward: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2 (halves of the head dim). Backward, the transpose:
        dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1 (x is then dy)."""
        t = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)
        h = tl.arange(0, H_PAD)
        d = tl.arange(0, HALF_PAD)
        t_ok, d_ok = t < n, d < HALF
        cs = t[:, None] * sc_n + d[None, :]
        cs_ok = t_ok[:, None] & d_ok[None, :]
        c1 = tl.load(cos_ptr + cs, mask=cs_ok, other=0.0).to(tl.float32)[:, None, :]
        c2 = tl.load(cos_ptr + cs + HALF, mask=cs_ok, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(sin_ptr + cs, mask=cs_ok, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(sin_ptr + cs + HALF, mask=cs_ok, other=0.0).to(tl.float32)[:, None, :]
        ok = t_ok[:, None, None] & (h < HEADS)[None, :, None] & d_ok[None, None, :]
        at = x_ptr + t[:, None, None] * sx_n + h[None, :, None] * sx_h + d[None, None, :]
        x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(at + HALF, mask=ok, other=0.0).to(tl.float32)
        if BACKWARD:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        out = out_ptr + t[:, None, None] * so_n + h[None, :, None] * so_h + d[None, None, :]
        tl.store(out, y1.to(out_ptr.dtype.element_ty), mask=ok)
        tl.store(out + HALF, y2.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x, cos, sin, backward: bool):
    """x [N, heads, D] (unit-stride head dim), cos/sin [N, D] -> a new contiguous [N, heads, D]."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, heads, dim = x.shape
    half = dim // 2
    out = torch.empty((n, heads, dim), dtype=x.dtype, device=x.device)
    _rope_kernel[(triton.cdiv(n, TOKENS),)](
        x, cos, sin, out, n, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
        BACKWARD=backward, HEADS=heads, H_PAD=triton.next_power_of_2(heads), HALF=half,
        HALF_PAD=triton.next_power_of_2(half), TOKENS=TOKENS, num_warps=4)
    return out


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, cos, sin, False), _launch(k, cos, sin, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        return _launch(dq, cos, sin, True), _launch(dk, cos, sin, True), None, None


def triton_rope_qk(q, k, cos, sin):
    """rope_qk's contract: q [N, heads, D], k [N, kv heads, D], cos/sin [N, 1, D] (positions carry
    no gradient)."""
    cos, sin = (t.reshape(t.shape[0], t.shape[-1]) for t in (cos, sin))
    if cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    return _RopeQK.apply(q, k, cos.detach(), sin.detach())


def rope_qk_fn(device: torch.device):
    if device.type != "cuda" or triton is None:
        return None
    return triton_rope_qk if trial(lambda: _agrees(device), "the Triton rotary failed its trial; it runs compiled",
                            "packed forward") else None


def _agrees(device) -> bool:
    """Values and both gradients against the torch math, q a strided view as in the packed pass."""
    g = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16)
    qkv = torch.randn((37, 6 * 24 + 2 * 24), generator=g, **bf).requires_grad_()
    q, k = qkv[:, : 6 * 24].view(37, 6, 24), qkv[:, 6 * 24 :].view(37, 2, 24)
    ang = torch.rand((37, 12), generator=g, device=device) * 6
    cos, sin = (torch.cat([f(ang), f(ang * 0.5)], -1).to(torch.bfloat16)[:, None] for f in (torch.cos, torch.sin))
    outs = []
    for fn in (triton_rope_qk, rope_qk):
        a, b = fn(q, k, cos, sin)
        w = torch.linspace(-1, 1, a.numel() + b.numel(), device=device)
        loss = (a.float().reshape(-1) * w[: a.numel()]).sum() + (b.float().reshape(-1) * w[a.numel():]).sum()
        outs.append((a, b, *torch.autograd.grad(loss, qkv)))
    return all(torch.allclose(x.float(), y.float(), atol=3e-2, rtol=3e-2) for x, y in zip(*outs))


# CPU, eager: rope in four operations instead of seven. cat((-x2, x1)) * sin is swap(x) * signed(sin), where swap
# exchanges the halves of the head dim (one copy) and signed(sin) = cat((-sin1, sin2)) is made once for the table:
# each product is the same one up to its sign, so the result is rope's bit for bit.
def signed_sin(sin):
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_signed(x, cos, ssin):
    """rope(x, cos, sin) given ssin = signed_sin(sin); swapping the halves is a roll by half the head dim (one
    copy: flip and cat took longer on CPU)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * ssin


def rope_qk_signed(q, k, cos, sin):
    """rope_qk, bit for bit, values and gradients, in fewer operations each way (CPU training): backward is a
    roll and two products where rope's took a negation, a split of the concatenation and zero-filled slices."""
    ssin = signed_sin(sin)
    return rope_signed(q, cos, ssin), rope_signed(k, cos, ssin)
