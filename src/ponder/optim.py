"""AdamW and its learning-rate schedule, one for every trainer (GRPO, SFT).

Weights in bfloat16 (train.precision=bf16) lose an update smaller than half their spacing (at 1.0 that is
2^-9: a step of lr 1e-3 never moves a weight of 1.0). KahanAdamW keeps what rounding dropped in a
compensation buffer of the weights' dtype and adds it back at the next step (Kahan summation; Zamirai et al.,
"Revisiting BFloat16 Training", 2020), so bf16 weights follow the float32 trajectory; its moments are
float32. Memory per parameter: 2 (weight) + 2 (gradient) + 8 (moments) + 2 (compensation) = 14 bytes,
against 16 for float32 weights with AdamW.

`moment_dtype=bf16` (optim.moment_dtype) stores the two moments in bfloat16 too: 10 bytes a parameter, 28 GiB
less for a 7.6B model. The update is still computed in float32; only the stored moments are rounded, and
stochastically (up or down with the probability that makes the rounding unbiased). Round-to-nearest would
bias them: bf16 keeps 8 significant bits, half a spacing is 0.2-0.4% of a value, and the second moment's
decay with beta2 = 0.999 (torch's default) is 0.1% a step, so it would never fall after a large gradient
(with ponder's 0.99 it falls, by whole spacings). The cost is noise: each stored moment is off by up to one
spacing (0.4-0.8% of its value) at a step, on average by nothing. On tests/test_optim_bf16.py's regression
(200 steps, bf16 weights) the final weights sit 0.031 of the float32 move away from the float32 run with
float32 moments and 0.032 with bf16 ones; with beta2 0.999 also 0.031 and 0.032, and round-to-nearest moments
gave 0.032 there too: the run is too short for the frozen second moment to matter, which
test_bf16_second_moment_decays_as_float32_would shows directly. The draws are seeded by the step and the
parameter's place, so a run repeats and a resumed run continues exactly with no generator state saved.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch

from ponder.config import OptimConfig
from ponder.errors import UserError

MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def lr_factor(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then `schedule` (constant, or cosine or linear down to `min_lr`) to
    `total_steps`."""
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min((step - o.warmup_steps) / max(total_steps - o.warmup_steps, 1), 1.0)
    floor = o.min_lr / o.lr if o.lr > 0 else 0.0
    if o.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if o.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    return 1.0


class KahanAdamW(torch.optim.Optimizer):
    """AdamW (torch's update, decoupled weight decay) for weights of low precision: float32 moments (or
    stochastically rounded bf16 ones: `moment_dtype`), and the part of each update the weights' rounding
    dropped carried to the next step."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 moment_dtype: torch.dtype = torch.float32):
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"KahanAdamW: moment_dtype must be float32 or bfloat16, got {moment_dtype}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0  # the parameter's place in the optimizer: with the step, it seeds bf16 moments' rounding
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group, index)
                index += 1
        return loss

    def _update(self, p, group, index: int) -> None:
        (b1, b2), lr = group["betas"], group["lr"]
        st = self._state_of(p)
        st["step"] += 1
        t = st["step"].item()
        g = p.grad.float()
        m, v = st["exp_avg"].float(), st["exp_avg_sq"].float()  # the stored tensors themselves when float32
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if self.moment_dtype != torch.float32:
            draws = torch.Generator(p.device).manual_seed(int(t) * 1_000_003 + index)
            _round_stochastic(st["exp_avg"], m, draws)
            _round_stochastic(st["exp_avg_sq"], v, draws)
        denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(group["eps"])
        w = p.to(torch.float32, copy=True)
        update = (m / denom).mul_(-lr / (1 - b1**t))
        if group["weight_decay"]:
            update.add_(w, alpha=-lr * group["weight_decay"])
        exact = w.add_(update.add_(st["compensation"].float()))
        p.copy_(exact)
        st["compensation"].copy_(exact.sub_(p.float()))

    def make_state(self) -> None:
        """Every trainable parameter's state, now rather than in the first step. The memory plan calls it after its
        probes: made in the first step, among the freed pieces of the first update's activations, a 7B model's last
        bf16 moment found 7.7 GiB free in torch's cache but no 1 GiB block (one 80 GB H100, ponder sft on
        32,000-token examples)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._state_of(p)

    def _state_of(self, p) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype)
            st["compensation"] = torch.zeros_like(p)
        return st

    def load_state_dict(self, state_dict) -> None:
        """torch casts every loaded state tensor to its parameter's dtype: the moments are put back in
        `moment_dtype` (the saved values as they were when the run's setting is unchanged). AdamW's state (a run
        resumed with --allow-changes into bf16 weights) has no compensation: nothing carried yet, zeros."""
        saved = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        moments = {pid: {k: state_dict["state"][pid][k].to(self.moment_dtype, copy=True) for k in ("exp_avg", "exp_avg_sq")}
                   for pid in saved if pid in state_dict["state"]}
        super().load_state_dict(state_dict)
        for pid, p in zip(saved, itertools.chain.from_iterable(g["params"] for g in self.param_groups)):
            for k, value in moments.get(pid, {}).items():
                self.state[p][k] = value.to(p.device)
            if pid in moments and "compensation" not in self.state[p]:
                self.state[p]["compensation"] = torch.zeros_like(p)


def _round_stochastic(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator) -> None:
    """`out` (bfloat16) = float32 `x` rounded up or down in magnitude, up with probability the dropped share
    of a spacing: a bf16 value is a float32 whose low 16 bits are zero, so add 16 random bits, then clear them."""
    if hasattr(x, "to_local"):  # a shard of an FSDP2 parameter (DTensor): the bits of this rank's part
        x, out = x.to_local(), out.to_local()
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    bits = x.view(torch.int32).add(noise).bitwise_and_(-(1 << 16))
    out.copy_(bits.view(torch.float32))  # exact: the value is already a bf16 one


def optimizer_name(model, o: OptimConfig) -> str:
    """optim.optimizer, with auto resolved: Kahan-compensated AdamW for weights below float32, else AdamW."""
    if o.optimizer != "auto":
        return o.optimizer
    low = any(p.requires_grad and p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    return "adamw_kahan" if low else "adamw"


def make_optimizer(model, o: OptimConfig, total_steps: int, moments: str = "fp32"):
    """(AdamW over the trainable parameters, its LambdaLR schedule). On CUDA the fused kernel: one launch for
    all parameters instead of a few per tensor group. The CPU keeps the default implementation, whose
    roundings the documented CPU runs repeat bit for bit. Weights below float32: KahanAdamW (optim.optimizer),
    its moments `optim.moment_dtype`, or under auto `moments` (what train.precision auto chose)."""
    params = [p for p in model.parameters() if p.requires_grad]
    name = optimizer_name(model, o)
    if o.moment_dtype not in ("auto", "fp32") and name != "adamw_kahan":
        # the fix that applies: an optimizer named by the user is theirs to change; auto follows the weights' dtype
        use = "optim.optimizer=adamw_kahan" if o.optimizer != "auto" else "train.precision=bf16 (or optim.optimizer=adamw_kahan)"
        raise UserError(f"optim.moment_dtype={o.moment_dtype} is an option of adamw_kahan, and this run's optimizer is {name}; "
                        f"use {use}, or leave moment_dtype at auto")
    if name == "adamw_kahan":
        optimizer = KahanAdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                               moment_dtype=MOMENT_DTYPES[moments if o.moment_dtype == "auto" else o.moment_dtype])
    else:
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, fused=fused or None)
    return optimizer, RunSchedule(optimizer, lambda step: lr_factor(step, o, total_steps))


class RunSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The learning rate by training step. A step whose update was skipped (every sample masked, a non-finite
    loss) still advances it: the schedule counts the run's steps, not the optimizer's. So torch's warning about a
    schedule stepped before its optimizer, which a skipped first step would print, is not said."""

    def step(self, epoch=None):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            super().step(epoch)


def state_bytes(optimizer, p) -> int:
    """Bytes `optimizer` keeps for parameter `p` once it has stepped: AdamW two moments in the parameter's
    dtype; KahanAdamW two in its moment dtype and a compensation in the parameter's."""
    if isinstance(optimizer, KahanAdamW):
        return p.numel() * (2 * optimizer.moment_dtype.itemsize + p.element_size())
    return 2 * p.numel() * p.element_size()
