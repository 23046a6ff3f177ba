"""Log-probabilities (and entropies) of completion tokens under a model, for the trainer's batches."""

from __future__ import annotations

import torch

from ponder import sharding
from ponder.errors import UserError
from ponder.rl import packed
from ponder.rl.batching import Sample, Tensors, micro_batches, to_tensors
from ponder.rl.logprobs import shared_prefix_length, token_logprobs
from ponder import runtime

MIN_SHARED_PREFIX = 32  # below this, one forward over whole rows is as cheap


def completion_logprobs(model, t: Tensors, *, autocast: bool = False, with_entropy: bool = False, temperature: float = 1.0,
                        entropy_grad: bool = False):
    """[B, T] log p(token) of each completion token, and its entropy (detached unless entropy_grad) when asked; under bf16
    autocast when asked (train.precision=mixed).

    `temperature` is the sampling temperature: the ratio must compare the distributions the tokens
    were actually drawn from.
    """
    positions = t.target_pos + 1
    scored = positions[t.mask.bool()]
    prefix = min(shared_prefix_length(t.input_ids, t.attention_mask), int(scored.min()) - 1 if scored.numel() else 0)
    with runtime.autocast(t.input_ids.device, autocast):
        return token_logprobs(model, t.input_ids, t.attention_mask, positions=positions, temperature=temperature,
                              with_entropy=with_entropy, shared_prefix=prefix if prefix >= MIN_SHARED_PREFIX else 0,
                              entropy_grad=entropy_grad)


def use_packed(forward: str, model) -> bool:
    """`train.forward`: packed, padded, or auto (packed for the architectures it supports, on any device: on
    two CPU cores the cpu_step workload's update took 0.24 s packed against 0.32 s padded)."""
    if forward == "packed":
        if not packed.supports(model):
            raise UserError(f"train.forward: packed supports the Llama family without sliding windows, not "
                            f"'{model.config.model_type}'; use forward: padded (or auto)")
        return True
    return forward == "auto" and packed.supports(model)


class PolicyPass:
    """Micro-batches and their log-probs, one way or the other: packed (ponder.rl.packed) or right-padded rows
    through the model's own forward. Both give [B, T] log-probs, entropies and the [B, T] token mask.
    `scratch()` may give idle device memory for the packed head (the rollout engine's, between its calls).
    `autocast`: bf16 autocast over float32 weights (train.precision=mixed); bf16 weights need none. Under it,
    `copies()` may give the rollout engine's bf16 copies of the linear layers' matrices (ponder.rl.copy_linear)."""

    def __init__(self, is_packed: bool, pad_id: int, device, autocast: bool, scratch=None, copies=None,
                 entropy_grad: bool = False):
        self.packed, self.pad_id, self.device, self.autocast, self.scratch = is_packed, pad_id, device, autocast, scratch
        self.copies = copies if autocast else None
        self.entropy_grad = entropy_grad

    def micro_batches(self, samples: list[Sample], token_budget: int) -> list[list[Sample]]:
        return (packed.packed_micro_batches if self.packed else micro_batches)(samples, token_budget)

    def logprobs(self, model, batch: list[Sample], *, with_entropy: bool = False, temperature: float = 1.0):
        """Log-probs [B, T], entropies [B, T] (None unless with_entropy; with gradients where `entropy_grad`, a loss
        with an entropy term) and the token mask."""
        # a sharded model gathers its root's weights for this as for its own forward (ponder.sharding)
        return sharding.forward(model, lambda: self._logprobs(model, batch, with_entropy, temperature, self.entropy_grad))

    def _logprobs(self, model, batch: list[Sample], with_entropy: bool, temperature: float, entropy_grad: bool):
        if self.packed:
            scratch = self.scratch() if self.scratch is not None and torch.is_grad_enabled() else None
            copies = self.copies() if self.copies is not None else None
            return packed.packed_logprobs(model, batch, self.device, with_entropy=with_entropy, temperature=temperature,
                                          autocast=self.autocast, scratch=scratch, copies=copies, entropy_grad=entropy_grad)
        t = to_tensors(batch, self.pad_id, self.device)
        lp, ent = completion_logprobs(model, t, autocast=self.autocast, with_entropy=with_entropy, temperature=temperature,
                                      entropy_grad=entropy_grad)
        return lp, ent, t.mask
