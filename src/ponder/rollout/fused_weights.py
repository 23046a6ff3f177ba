"""One matrix product for q, k and v, and one for gate and up, without a copy of the weights.

At batch 256 a decode step's k and v projections are tiny products whose time is mostly fixed cost. Here
the weights of the linear layers that read the same input are moved, once, into one buffer, and each
layer's parameter becomes a view of its rows: the model computes exactly what it did, an optimizer
updating the parameters in place updates the buffer, and the engine multiplies by the whole buffer.
Only plain nn.Linear layers are joined (LoRA layers and other wrappers are left alone).
"""

from __future__ import annotations

import torch


def joined(mods) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) covering `mods` stacked by output rows: views of their parameters when they already
    are consecutive rows of one buffer; None when they are not, or when one is a wrapper (a LoRA layer's
    `weight` is its base's alone: its adapter would be left out)."""
    if not all(type(m) is torch.nn.Linear for m in mods):
        return None
    weight = rows_of([m.weight for m in mods])
    if weight is None:
        return None
    if mods[0].bias is None:
        return weight, None
    bias = rows_of([m.bias for m in mods])
    return None if bias is None else (weight, bias)


def rows_of(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensors stacked along their first dimension, as a view, where they are consecutive rows of one buffer;
    else None."""
    if not all(_follows(a, b) for a, b in zip(ts, ts[1:])):
        return None
    first = ts[0]
    return first.as_strided((sum(t.shape[0] for t in ts),) + tuple(first.shape[1:]), first.stride(), first.storage_offset())


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.is_contiguous() and b.is_contiguous()
            and b.storage_offset() == a.storage_offset() + a.numel())


def join(mods) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Make the parameters of `mods` (nn.Linear reading the same input) consecutive rows of one buffer, in
    place, and return joined(mods); None (nothing changed) when they cannot be joined."""
    if not all(type(m) is torch.nn.Linear for m in mods):
        return None
    ws = [m.weight for m in mods]
    has_bias = [m.bias is not None for m in mods]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) > 1 or len(set(has_bias)) > 1:
        return None
    done = joined(mods)
    if done is not None:
        return done
    with torch.no_grad():
        for name in ("weight", "bias") if has_bias[0] else ("weight",):
            params = [getattr(m, name) for m in mods]
            buf = torch.cat([p.detach() for p in params])
            at = 0
            for p in params:
                p.data = buf[at : at + p.shape[0]]  # same Parameter object: optimizers keep their state
                at += p.shape[0]
    return joined(mods)
