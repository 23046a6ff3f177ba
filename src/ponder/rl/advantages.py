"""Group-relative advantages: one scalar per completion, shared by all of its tokens."""

from __future__ import annotations

import torch

EPS = 1e-4  # keeps groups with (near) equal rewards finite; their advantages are ~0 anyway


def advantages(rewards: torch.Tensor, mode: str = "group_std", batch_std: float | None = None) -> torch.Tensor:
    """rewards: [prompts, G]. Returns advantages of the same shape. `batch_std`: the std of the whole batch
    when it holds more than `rewards` (other ranks' groups); default: the std of `rewards`.

    group_std  (r - mean_group) / std_group                  GRPO, DeepSeekMath eq. for outcome supervision
    batch_std  (r - mean_group) / std over the whole batch    scale without per-question reweighting
    none       r - mean_group                                 Dr. GRPO: no difficulty bias from the std
    rloo       r - mean of the other G-1 rewards              RLOO leave-one-out baseline
    std is the population standard deviation (divide by G).
    """
    rewards = rewards.float()
    # a group of equal rewards carries no signal: exactly 0, not the float mean's rounding error scaled up by
    # 1 / (std + EPS) (eight rewards of 0.7 gave |A| = 6e-4)
    uniform = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    centred = torch.where(uniform, 0.0, rewards - rewards.mean(dim=1, keepdim=True))
    if mode == "group_std":
        out = centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + EPS)
    elif mode == "batch_std":
        out = centred / ((rewards.std(unbiased=False) if batch_std is None else batch_std) + EPS)
    elif mode == "none":
        out = centred
    elif mode == "rloo":
        g = rewards.shape[1]
        out = centred * g / (g - 1)  # r_i - (sum - r_i)/(G-1) == G/(G-1) * (r_i - mean)
    else:
        raise ValueError(f"unknown advantage mode {mode!r}")
    return out
