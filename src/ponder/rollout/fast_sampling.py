"""Token sampling on the device: temperature, top-k, top-p, min-p (in transformers' order), greedy at temperature 0."""

from __future__ import annotations

import torch

from ponder.kernels.decode_step import EAGER
from ponder.kernels.sampler import entropy_of


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """float32 logits of the sampling distribution; filtered-out tokens are -inf."""
    x = logits.float()
    if temperature == 0:
        return x
    if temperature != 1.0:
        x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        # drop the least likely tokens whose total mass stays within 1 - top_p; the top token always stays
        sorted_x, order = x.sort(dim=-1)
        drop = sorted_x.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p > 0:
        # in probabilities, as transformers compares them (the most likely token always stays)
        p = x.softmax(-1)
        x = x.masked_fill(p < min_p * p.amax(-1, keepdim=True), float("-inf"))
    return x


def cuts(top_k: int, top_p: float, min_p: float, vocab: int | None = None) -> bool:
    """Whether sampling drops tokens: then it sorts or compares eagerly, and a captured decode step stops at the logits."""
    return (top_k > 0 and (vocab is None or top_k < vocab)) or top_p < 1.0 or min_p > 0


def sample(logits, temperature, top_k, top_p, keys, want_logprobs: bool, kernels=EAGER, min_p: float = 0.0):
    """[B, V] logits -> tokens [B], their log-probabilities under the sampling distribution (when asked, else None)
    and each row's entropy at the temperature (1 when greedy), over the whole vocabulary whatever top-k, top-p and
    min-p keep: the entropy the trainer logs. `keys` [B] (see ponder.kernels.sampler.row_keys) fix each row's draw."""
    if temperature == 0:
        tokens, logprobs, entropies = kernels["greedy_pick"](logits, keys, 1.0)
    elif not cuts(top_k, top_p, min_p, logits.shape[-1]):  # plain sampling: no sort (CUDA: two Triton kernels)
        tokens, logprobs, entropies = kernels["pick"](logits, keys, 1.0 / temperature)
    else:
        tokens, logprobs, _ = EAGER["pick"](process_logits(logits, temperature, top_k, top_p, min_p), keys, 1.0)
        x = logits.float() / temperature
        entropies = entropy_of(x, x.logsumexp(-1))
    return tokens, (logprobs if want_logprobs else None), entropies
