"""AdamW and its learning-rate schedule, one for every trainer (GRPO, SFT)."""

from __future__ import annotations

import math

import torch

from ponder.config import OptimConfig


def lr_factor(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then `schedule` (constant, cosine or linear to 0) to `total_steps`."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(total_steps - o.warmup_steps, 1)
    if o.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if o.schedule == "linear":
        return max(0.0, 1 - progress)
    return 1.0


def make_optimizer(model, o: OptimConfig, total_steps: int):
    """(AdamW over the trainable parameters, its LambdaLR schedule). On CUDA the fused kernel: one launch for
    all parameters instead of a few per tensor group. The CPU keeps the default implementation, whose
    roundings the documented CPU runs repeat bit for bit."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, o, total_steps))
