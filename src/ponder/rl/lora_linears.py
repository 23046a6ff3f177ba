"""LoRA layers in the packed training pass: the base product and the adapter's in two matrix products.

peft's Linear computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: under autocast each layer casts its
float32 input to bf16 again (the base product and lora_A each, so q, k and v cast the same input six times, each
cast kept for backward), and the adapter's output is scaled and added by two more kernels over the whole
[tokens, out] output (and the scaling again in backward). Here the layers that read one input share one cast,
their lora_A matrices run as one product, and each adapter's lora_B product is added to the base output by the
product itself (addmm: `base + alpha * xa @ B.T`, one pass, summed in float32 and rounded once, where peft rounds
the adapter's output, its scaled copy and the sum). The 7B LoRA update (r 16 on q, k, v, o; 16 x 8 x 1,024
tokens) took 9.42 s through peft's forward and 7.80 s this way, with 13% less memory a token (one H100,
bench/README.md).

Only plain adapters take this path (one active adapter, no dropout at training time, no DoRA or other variant,
no adapter bias, an nn.Linear base); any other layer is called as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adapter(m) -> tuple | None:
    """(base nn.Linear, lora_A weight [r, in], lora_B weight [out, r], scaling) of a plain peft LoRA Linear; None
    for anything else (a plain nn.Linear too)."""
    if not hasattr(m, "lora_A") or not hasattr(m, "base_layer") or type(m.base_layer) is not torch.nn.Linear:
        return None
    if getattr(m, "merged", False) or getattr(m, "disable_adapters", False) or getattr(m, "fan_in_fan_out", False):
        return None
    active = list(getattr(m, "active_adapters", []))
    if len(active) != 1 or active[0] not in m.lora_A:
        return None
    name = active[0]
    a, b, drop = m.lora_A[name], m.lora_B[name], m.lora_dropout[name]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or b.bias is not None or a.bias is not None:
        return None
    if name in getattr(m, "lora_variant", {}) or getattr(m, "use_dora", {}).get(name, False):
        return None  # DoRA and the other variants: their own forward
    idle = isinstance(drop, torch.nn.Dropout) and (drop.p == 0 or not drop.training)
    if not (isinstance(drop, torch.nn.Identity) or idle):
        return None
    return m.base_layer, a.weight, b.weight, m.scaling[name]


def with_adapters(h: torch.Tensor, mods, parts) -> list[torch.Tensor]:
    """The outputs of the layers `mods` that read the 2-D input h, `parts` their adapter() (None: called as it is).
    Under autocast every product runs in its dtype. Without it the adapters run in their own dtype, as peft runs
    them (float32 adapters over a bf16 base: the sum in float32, rounded to the base's dtype)."""
    dev = h.device.type
    auto = torch.is_autocast_enabled(dev) and h.is_floating_point()
    hb = h.to(torch.get_autocast_dtype(dev)) if auto else h  # one cast for every layer that reads h
    lora = [p for p in parts if p is not None]
    dtype = lora[0][1].dtype
    # every adapter's lora_A as one product: [N, sum of ranks]
    a = torch.cat([p[1] for p in lora]) if len(lora) > 1 else lora[0][1]
    xas = iter(F.linear(hb if auto else hb.to(dtype), a).split([p[1].shape[0] for p in lora], -1))
    out = []
    for m, p in zip(mods, parts):
        if p is None:
            out.append(m(hb))
            continue
        base, _, b, scaling = p
        y = F.linear(hb if auto else hb.to(base.weight.dtype), base.weight, base.bias)
        if auto:
            out.append(torch.addmm(y, next(xas), b.t(), alpha=scaling))
        else:
            out.append(torch.addmm(y.to(dtype), next(xas), b.t(), alpha=scaling).to(y.dtype))
    return out
