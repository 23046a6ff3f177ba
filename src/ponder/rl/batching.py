"""Rollout samples as tensors: right-padded micro-batches chosen by a token budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ponder.runtime import to_device


@dataclass
class Sample:
    """One completion of one prompt, with everything the loss needs."""

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float = 0.0
    truncated: bool = False
    weight: float = 0.0  # per-token loss weight from the aggregation (0: carries no loss)
    old_logp: torch.Tensor | None = None  # [C] when mu > 1 or several mini-batches
    ref_logp: torch.Tensor | None = None  # [C] when beta > 0
    rollout_logp: torch.Tensor | None = None  # [C] the engine's, as it sampled (algorithm.rollout_is_cap)
    rollout_entropy: float | None = None  # summed over the completion's tokens, by the engine (train.skip_zero_advantage)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def micro_batches(samples: list[Sample], token_budget: int) -> list[list[Sample]]:
    """Group samples of similar length so that (padded length x count) stays within the budget."""
    order = sorted(samples, key=lambda s: s.length)
    out: list[list[Sample]] = []
    cur: list[Sample] = []
    for s in order:
        if cur and s.length * (len(cur) + 1) > token_budget:
            out.append(cur)
            cur = []
        cur.append(s)
    if cur:
        out.append(cur)
    return out


@dataclass
class Tensors:
    input_ids: torch.Tensor  # [B, L] right-padded prompt + completion
    attention_mask: torch.Tensor  # [B, L]
    target_pos: torch.Tensor  # [B, T] position of the logit that predicts each completion token
    targets: torch.Tensor  # [B, T] completion tokens
    mask: torch.Tensor  # [B, T] 1 on real completion tokens
    extras: dict = field(default_factory=dict)


def to_tensors(batch: list[Sample], pad_id: int, device) -> Tensors:
    width = max(s.length for s in batch)
    t_max = max(max(len(s.completion_ids) for s in batch), 1)
    b = len(batch)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    att = torch.zeros((b, width), dtype=torch.long)
    pos = torch.zeros((b, t_max), dtype=torch.long)
    tgt = torch.full((b, t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t_max))
    for i, s in enumerate(batch):
        seq = s.prompt_ids + s.completion_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        att[i, : len(seq)] = 1
        c, p = len(s.completion_ids), len(s.prompt_ids)
        if c:
            pos[i, :c] = torch.arange(p - 1, p - 1 + c)
            tgt[i, :c] = torch.tensor(s.completion_ids)
            mask[i, :c] = 1
    return Tensors(*(to_device(t, device) for t in (ids, att, pos, tgt, mask)))


def per_row(values: list[float], device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.float32), device)


def pad_rows(rows: list[torch.Tensor], width: int, device) -> torch.Tensor:
    out = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return to_device(out, device)
