"""The clipped policy-gradient loss, its aggregations over tokens, and the KL estimators (k3, k2, k1)."""

from __future__ import annotations

import torch


def sequence_token_weights(lengths: list[int], agg: str, max_new_tokens: int,
                           n_total: float | None = None, tokens_total: float | None = None) -> list[float]:
    """Weight of every token of each sequence, so that sum(weight * token_loss) is the batch loss.

    Computed over the whole optimizer batch before it is split into micro-batches, so gradient
    accumulation gives exactly the loss of the unsplit batch. With several ranks, `n_total` and
    `tokens_total` are the counts over all of them (default: this rank's).
      grpo     mean over a sequence's tokens, then mean over sequences      1 / (|o_i| * N)
      dapo     mean over all tokens of the batch                            1 / sum |o_i|
      dr_grpo  sum over tokens / (N * max completion tokens)                1 / (N * L_max)
      bnpo     mean over the tokens of each micro-batch: set per micro-batch (see micro_batch_weights)
    """
    n = len(lengths)
    if n == 0:
        return []
    n_all = n_total or n
    if agg == "grpo":
        return [1.0 / (max(l, 1) * n_all) for l in lengths]
    if agg == "dapo":
        return [1.0 / max(tokens_total or sum(lengths), 1)] * n
    if agg == "dr_grpo":
        return [1.0 / (n_all * max_new_tokens)] * n
    if agg == "bnpo":
        return [float("nan")] * n  # placeholder: depends on the micro-batch split
    raise ValueError(f"unknown loss aggregation {agg!r}")


def micro_batch_weights(micro_lengths: list[list[int]], total: float | None = None) -> list[list[float]]:
    """bnpo: each micro-batch's token mean, averaged over the micro-batches (`total`: of every rank; default
    this rank's). Ranks may have different numbers of micro-batches (mask_truncated leaves uneven counts)."""
    k = total or len(micro_lengths)
    return [[1.0 / (max(sum(ls), 1) * k)] * len(ls) for ls in micro_lengths]


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """A per-token estimate of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence").
    k3: exp(d) - d - 1, d = ref - logp (DeepSeekMath; unbiased, >= 0, but its gradient as a loss is not KL's);
    k2: d^2 / 2 (biased as a value, its gradient is the KL's own in expectation on-policy); k1: -d (unbiased, noisy,
    may be negative)."""
    if estimator == "k3":
        return k3_kl(logp, ref_logp)
    d = ref_logp - logp
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k1":
        return -d
    raise ValueError(f"unknown KL estimator {estimator!r}")


def high_entropy_mask(entropy: torch.Tensor, live: torch.Tensor, share: float) -> torch.Tensor:
    """1 on the `share` of the live tokens whose entropy is highest (ties at the cut kept), 0 elsewhere: the 80/20
    rule's tokens (arXiv 2506.01939), chosen within the tokens given (one micro-batch, as the paper's code does)."""
    values = entropy.detach()[live]
    if share >= 1 or not values.numel():
        return live.float()
    cut = values.topk(max(1, round(share * values.numel()))).values[-1]
    return ((entropy.detach() >= cut) & live).float()


def policy_loss(
    logp: torch.Tensor,  # [B, T] log-probs of the sampled tokens under the current policy (with grad)
    old_logp: torch.Tensor,  # [B, T] under the policy that sampled them (== logp.detach() when mu = 1)
    adv: torch.Tensor,  # [B] one advantage per sequence
    weight: torch.Tensor,  # [B, T] token weights from the aggregation, 0 on padding and masked tokens
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    ratio_level: str = "token",
    kl_estimator: str = "k3",
    token_scale: torch.Tensor | None = None,  # [B, T] detached weights of the policy-gradient term (TIS), not the KL's
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,  # [B, T] each token's entropy, with gradients (when entropy_coef)
    dual_clip: float | None = None,
):
    """Returns (loss, stats). loss = sum(weight * token_loss); stats are detached token sums, as 0-d tensors
    on the loss's device (read them once per step: each read waits for the GPU)."""
    log_ratio = logp - old_logp
    live = (weight != 0).float()
    if ratio_level == "sequence":
        # GSPO (arXiv 2507.18071): one ratio a sequence, the geometric mean of its tokens' ratios, clipped as a
        # whole; each token keeps its own gradient path (GSPO-token), whose sum over a sequence is GSPO's gradient
        seq = (log_ratio.detach() * live).sum(1) / live.sum(1).clamp(min=1)
        log_ratio = seq[:, None] + logp - logp.detach()
    ratio = torch.exp(log_ratio)
    a = adv[:, None]
    unclipped = ratio * a
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a  # clip-higher: eps_high may exceed eps_low
    token_loss = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:  # dual-clip: -A x ratio, unbounded for A < 0 as the ratio grows, held at -A x dual_clip
        token_loss = torch.where(a < 0, torch.minimum(token_loss, -dual_clip * a), token_loss)
    if token_scale is not None:
        token_loss = token_loss * token_scale
    kl = None
    if beta:
        kl = kl_estimate(logp, ref_logp, kl_estimator)  # added to the loss, not the reward (DeepSeekMath)
        token_loss = token_loss + beta * kl
    if entropy_coef:
        token_loss = token_loss - entropy_coef * entropy  # an entropy bonus, aggregated as the tokens' loss is (verl)
    loss = (token_loss * weight).sum()
    stats = {
        # a token is clipped when the clipped branch wins the min and carries no gradient
        "clip_low": ((ratio < 1 - eps_low) & (a < 0)).float().mul(live).sum(),
        "clip_high": ((ratio > 1 + eps_high) & (a > 0)).float().mul(live).sum(),
        "clip_dual": (((ratio > dual_clip) & (a < 0)).float().mul(live).sum() if dual_clip is not None
                      else live.new_zeros(())),
        "kl": kl.detach().mul(live).sum() if kl is not None else live.new_zeros(()),
        "tokens": live.sum(),
    }
    return loss, stats
