"""Sequence packing without attention across examples, and the completion-only loss, two ways.

- Stream (`train.forward: packed`, the default where ponder.rl.packed supports the model): a micro-batch is one
  stream of tokens with no padding, through the GRPO trainer's packed pass. Each example is a Sample whose prompt
  is its tokens before the first target and whose completion is the rest; examples with the same prompt run it
  once (R1's rejection-sampled data holds several answers a problem). Attention is variable-length per example,
  so its cost grows with each example's length, not with a row's.
- Rows (`train.forward: padded`, the model's own forward): several examples share one row; each restarts its
  position ids at 0. Given position ids and no attention mask, transformers builds the block-diagonal causal mask
  from the restarts (sdpa and eager get a [row x row] mask and attend over the whole row, flash-attention kernels
  the cu_seqlens of each row), so no token attends to another example. The padding at a row's end is a segment
  of its own and carries no loss. Rows are no wider than the longest example: wider ones would pay the mask's
  square for no less padding.
tests/test_sft.py checks that both give the loss of the same examples run one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ponder.rl.batching import Sample
from ponder.rl.logprobs import check_head, head_logprobs, logit_transform, split_model
from ponder.runtime import probing, to_device
from ponder.sft.data import Encoded


@dataclass
class Scored(Sample):
    """An example as the packed pass takes it; `scored`: 1 where a completion token is a target (a conversation's
    later user turns are not)."""
    scored: list[int] = field(default_factory=list)


def as_sample(ex: Encoded) -> Scored:
    p = ex.prompt_len  # at least 1: the first token is never a target
    return Scored(ex.ids[:p], ex.ids[p:], scored=ex.mask[p:])


def stream_loss_sum(policy_pass, model, batch: list[Scored]) -> torch.Tensor:
    """Sum over target tokens of -log p(token | its own example's prefix), through the packed pass."""
    logp, _, _ = policy_pass.logprobs(model, batch)
    scored = torch.zeros(logp.shape)
    for r, s in enumerate(batch):
        scored[r, : len(s.scored)] = torch.tensor(s.scored, dtype=scored.dtype)
    return -(logp * to_device(scored, logp.device)).sum()


def stream_tokens(batch: list[Sample]) -> int:
    """Tokens the packed pass runs: each distinct prompt once, each completion but its last token."""
    return sum(len(p) for p in {tuple(s.prompt_ids) for s in batch}) + sum(len(s.completion_ids) - 1 for s in batch)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of the examples in each row, no row longer than `capacity`
    (an example longer than it gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def keeps_rows_apart(model) -> bool:
    """Whether the model's own forward keeps examples that share a row apart, given position ids that restart at 0
    (the second example's hidden states alone and after the first agree). transformers does for most families; OPT
    builds its mask without position ids, and Bloom and MPT (ALiBi) take none, so there a row's later examples
    attended to the earlier ones. A probe of 7 tokens in eval mode, without gradients or random draws."""
    backbone, _ = split_model(model)
    first, second = [1, 2, 3], [4, 5, 6, 7]
    with probing(model) as device:
        row = backbone(input_ids=torch.tensor([first + second], device=device),
                       position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device), use_cache=False)
        alone = backbone(input_ids=torch.tensor([second], device=device),
                         position_ids=torch.tensor([[0, 1, 2, 3]], device=device), use_cache=False)
    joint, own = row.last_hidden_state[0, len(first):].float(), alone.last_hidden_state[0].float()
    return bool((joint - own).abs().max() <= 1e-2 * own.abs().max() + 1e-5)


@dataclass
class Packed:
    input_ids: torch.Tensor  # [R, L]
    position_ids: torch.Tensor  # [R, L], restarting at 0 for each example (and for the padding)
    loss_mask: torch.Tensor  # [R, L], 1 where the token is a target

    @property
    def targets(self) -> int:
        return int(self.loss_mask.sum())


def collate(examples: list[Encoded], rows: list[list[int]], pad_id: int, device=None) -> Packed:
    width = max(sum(len(examples[i].ids) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ex = examples[i]
            n = len(ex.ids)
            ids[r, at : at + n] = torch.tensor(ex.ids)
            pos[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = torch.tensor(ex.mask)
            at += n
        pos[r, at:] = torch.arange(width - at)
    return Packed(ids.to(device), pos.to(device), mask.to(device))


def micro_batches(rows: list[list[int]], lengths: list[int], token_budget: int) -> list[list[list[int]]]:
    """Rows grouped so that (longest row x rows) stays within the budget; at least one row each."""
    order = sorted(rows, key=lambda row: sum(lengths[i] for i in row))
    out, cur, widest = [], [], 0
    for row in order:
        w = sum(lengths[i] for i in row)
        if cur and max(widest, w) * (len(cur) + 1) > token_budget:
            out.append(cur)
            cur, widest = [], 0
        cur.append(row)
        widest = max(widest, w)
    if cur:
        out.append(cur)
    return out


def loss_sum(model, batch: Packed, chunk_size: int = 1024) -> torch.Tensor:
    """Sum over target tokens of -log p(token | its own example's prefix)."""
    backbone, head = split_model(model)
    check_head(model)
    hidden = backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    sel = batch.loss_mask[:, 1:] != 0
    logp, _ = head_logprobs(head, hidden[:, :-1][sel], batch.input_ids[:, 1:][sel], 1.0, chunk_size, False,
                            logit_transform(model))
    return -logp.sum()
