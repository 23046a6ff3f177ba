"""The update's linear layers from the rollout copy's bf16 matrices, their gradients added into the float32 masters.

Under bf16 autocast (train.precision=mixed) each micro-batch casts every float32 weight matrix to bf16 for its
forward, and backward casts each bf16 weight gradient back to float32 and adds it to `.grad`: per micro-batch, three
passes over the weights and two small kernels a matrix (on one H100 the 1.5B update of bench/grpo_step.py spent
0.29 of its 2.86 s in them, 10 micro-batches). The fast engine already holds those bf16 matrices, current since its
rollout (ponder.rollout.fast.RolloutCopy, refreshed after every optimizer step). Here the forward and the input's
gradient use them as they are, and each weight's gradient is one product whose float32 output is added into
`.grad` by the product itself (cuBLAS with bf16 inputs and a float32 output, beta = 1: the gradient accumulation
fusion of large-model trainers). The bf16 products are those autocast computes; the weight gradient is rounded
once, to float32, where autocast rounded each micro-batch's share to bf16 first.

Where the fused product is missing (CPU), the product is cast and added as autocast's path did (a bias's gradient is
summed in float32 either way, where autocast summed in bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ponder.kernels.accumulate import add_product_, fused_float32
from ponder.rollout.fused_weights import rows_of


@torch.no_grad()
def add_product(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """p.grad += a @ b, in float32 (a and b in bf16)."""
    if p.grad is None:
        p.grad = torch.mm(a, b, out_dtype=torch.float32) if fused_float32(a.device) else torch.mm(a, b).to(p.dtype)
    else:
        add_product_(p.grad, a, b)


@torch.no_grad()
def add_sum(p: torch.Tensor, rows: torch.Tensor) -> None:
    """p.grad += rows summed over the first dimension (a bias's gradient), in float32."""
    g = rows.sum(0, dtype=torch.float32).to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


class _FromCopy(torch.autograd.Function):
    """y = x w^T + b over the copies (w: the layers' matrices stacked by output rows); the gradients of the masters
    (`masters`: each layer's weight, then each layer's bias or None) added into their .grad, not returned. The
    masters are inputs so that the output needs a backward whenever one of them trains, whatever x is."""

    @staticmethod
    def forward(ctx, x, w, b, *masters):
        x = x.to(w.dtype)  # as autocast rounds a product's input
        ctx.save_for_backward(x, w)
        half = len(masters) // 2
        ctx.weights, ctx.biases = masters[:half], masters[half:]
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        gy = gy.to(w.dtype)
        gx = gy @ w if ctx.needs_input_grad[0] else None
        gy2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
        at = 0
        for weight, bias in zip(ctx.weights, ctx.biases):
            rows = gy2[:, at : at + weight.shape[0]]
            if weight.requires_grad:
                add_product(weight, rows.t(), x2)
            if bias is not None and bias.requires_grad:
                add_sum(bias, rows)
            at += weight.shape[0]
        return (gx, None, None) + (None,) * (len(ctx.weights) + len(ctx.biases))


def stacked(ts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked along their first dimension: a view where they are consecutive rows of one buffer (the
    engine joins q|k|v and gate|up so), else a copy."""
    joined = rows_of(ts)
    return torch.cat(ts) if joined is None else joined


def copies_for(mods, copies: dict | None):
    """(stacked bf16 matrix, stacked bias or None) of plain linear layers `mods` from `copies` (id of a master
    parameter -> its copy), or None where one of them has no copy (then autocast's path runs)."""
    if not copies or not all(type(m) is torch.nn.Linear for m in mods):
        return None
    ws = [copies.get(id(m.weight)) for m in mods]
    if any(w is None for w in ws):
        return None
    if mods[0].bias is None:
        return (stacked(ws), None) if all(m.bias is None for m in mods) else None
    bs = [copies.get(id(m.bias)) if m.bias is not None else None for m in mods]
    if any(b is None for b in bs):
        return None
    return stacked(ws), stacked(bs)


def linear_from_copy(h: torch.Tensor, mods, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The joined output of layers `mods` over h, through their copies (w, b from copies_for)."""
    if not torch.is_grad_enabled():  # scoring: nothing to add to
        return F.linear(h.to(w.dtype), w, b)
    return _FromCopy.apply(h, w, b, *[m.weight for m in mods], *[m.bias for m in mods])
