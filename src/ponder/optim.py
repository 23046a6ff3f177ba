"""AdamW and its learning-rate schedule, one for every trainer (GRPO, SFT).

Weights in bfloat16 (train.precision=bf16) lose an update smaller than half their spacing (at 1.0 that is
2^-9: a step of lr 1e-3 never moves a weight of 1.0). KahanAdamW keeps what rounding dropped in a
compensation buffer of the weights' dtype and adds it back at the next step (Kahan summation; Zamirai et al.,
"Revisiting BFloat16 Training", 2020), so bf16 weights follow the float32 trajectory; its moments are
float32. Memory per parameter: 2 (weight) + 2 (gradient) + 8 (moments) + 2 (compensation) = 14 bytes,
against 16 for float32 weights with AdamW.
"""

from __future__ import annotations

import itertools
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


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (torch's update, decoupled weight decay) for weights of low precision: float32 moments, and the
    part of each update the weights' rounding dropped carried to the next step."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p, group) -> None:
        (b1, b2), lr = group["betas"], group["lr"]
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            st["compensation"] = torch.zeros_like(p)
        st["step"] += 1
        t = st["step"].item()
        g = p.grad.float()
        m, v = st["exp_avg"], st["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        w = p.to(torch.float32, copy=True)
        update = (m / denom).mul_(-lr / (1 - b1**t))
        if group["weight_decay"]:
            update.add_(w, alpha=-lr * group["weight_decay"])
        exact = w.add_(update.add_(st["compensation"].float()))
        p.copy_(exact)
        st["compensation"].copy_(exact.sub_(p.float()))

    def load_state_dict(self, state_dict) -> None:
        """torch casts every loaded state tensor to its parameter's dtype: the float32 moments are put back."""
        saved = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        moments = {pid: {k: state_dict["state"][pid][k].float().clone() for k in ("exp_avg", "exp_avg_sq")}
                   for pid in saved if pid in state_dict["state"]}
        super().load_state_dict(state_dict)
        for pid, p in zip(saved, itertools.chain.from_iterable(g["params"] for g in self.param_groups)):
            for k, value in moments.get(pid, {}).items():
                self.state[p][k] = value.to(p.device)


def optimizer_name(model, o: OptimConfig) -> str:
    """optim.optimizer, with auto resolved: Kahan-compensated AdamW for weights below float32, else AdamW."""
    if o.optimizer != "auto":
        return o.optimizer
    low = any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    return "adamw_kahan" if low else "adamw"


def make_optimizer(model, o: OptimConfig, total_steps: int):
    """(AdamW over the trainable parameters, its LambdaLR schedule). On CUDA the fused kernel: one launch for
    all parameters instead of a few per tensor group. The CPU keeps the default implementation, whose
    roundings the documented CPU runs repeat bit for bit. Weights below float32: KahanAdamW (optim.optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer_name(model, o) == "adamw_kahan":
        optimizer = KahanAdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    else:
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused or None)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, o, total_steps))
