import math

import pytest
import torch

from ponder.rl.losses import high_entropy_mask, k3_kl, micro_batch_weights, policy_loss, sequence_token_weights


def _loss(lengths, adv, agg, max_new=8, micro=None):
    """ratio == 1 everywhere, so each token's loss is -A; returns the aggregated loss."""
    width = max(lengths)
    logp = torch.zeros(len(lengths), width)
    mask = torch.tensor([[1.0] * l + [0.0] * (width - l) for l in lengths])
    w = sequence_token_weights(lengths, agg, max_new) if micro is None else [x for ws in micro_batch_weights(micro) for x in ws]
    weight = mask * torch.tensor(w)[:, None]
    loss, _ = policy_loss(logp, logp.detach(), torch.tensor(adv), weight, 0.2, 0.2)
    return loss.item()


def test_aggregations_match_hand_values():
    lengths, adv = [2, 4], [1.0, 0.5]
    assert _loss(lengths, adv, "grpo") == pytest.approx((-1 + -0.5) / 2)  # per-sequence means, then mean
    assert _loss(lengths, adv, "dapo") == pytest.approx((2 * -1 + 4 * -0.5) / 6)  # all tokens of the batch
    assert _loss(lengths, adv, "dr_grpo", max_new=8) == pytest.approx((2 * -1 + 4 * -0.5) / (2 * 8))
    # bnpo with micro-batches [seq 1], [seq 2]: each micro-batch's token mean, averaged
    assert _loss(lengths, adv, "bnpo", micro=[[2], [4]]) == pytest.approx((-1 + -0.5) / 2)
    # ... and with one micro-batch it is the batch token mean
    assert _loss(lengths, adv, "bnpo", micro=[[2, 4]]) == pytest.approx((2 * -1 + 4 * -0.5) / 6)


def test_clipping_follows_the_pessimistic_bound():
    old = torch.zeros(1, 1)
    one = torch.ones(1, 1)
    # A > 0, ratio 1.5 > 1 + eps_high: clipped to 1.28, no gradient
    logp = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, st = policy_loss(logp, old, torch.tensor([1.0]), one, 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(-1.28)
    assert logp.grad.item() == 0.0 and st["clip_high"] == 1 and st["clip_low"] == 0
    # A < 0, ratio 0.5 < 1 - eps_low: min(-0.5, -0.8) = -0.8 -> loss 0.8, no gradient
    logp = torch.full((1, 1), math.log(0.5), requires_grad=True)
    loss, st = policy_loss(logp, old, torch.tensor([-1.0]), one, 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(0.8)
    assert logp.grad.item() == 0.0 and st["clip_low"] == 1
    # A < 0, ratio 1.5: the unclipped branch is the pessimistic one and keeps its gradient
    logp = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, st = policy_loss(logp, old, torch.tensor([-1.0]), one, 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(1.5)
    assert logp.grad.item() == pytest.approx(1.5)  # d(-ratio*A)/dlogp = ratio
    assert st["clip_low"] == 0 and st["clip_high"] == 0


def test_dual_clip_holds_a_negative_advantages_loss_at_dual_clip_times_its_size():
    old = torch.zeros(1, 3)
    one = torch.ones(1, 3)
    ratios = [4.0, 2.0, 0.5]  # past the dual clip of 3, between it and the clip, below the clip
    for adv, dual, want_loss, want_grad, want_dual in [
        # A = -2: -A x ratio would be 8, 4, 1.6 (0.5 clipped to 0.8); the first is held at 3 x 2 = 6, without gradient
        (-2.0, 3.0, [6.0, 4.0, 1.6], [0.0, 4.0, 0.0], 1),
        (-2.0, None, [8.0, 4.0, 1.6], [8.0, 4.0, 0.0], 0),  # off: the loss grows with the ratio
        # A > 0: the clip already bounds it (1.2 x A at most); the dual clip leaves it alone
        (2.0, 3.0, [-2.4, -2.4, -1.0], [0.0, 0.0, -1.0], 0),
    ]:
        logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
        loss, st = policy_loss(logp, old, torch.tensor([adv]), one, 0.2, 0.2, dual_clip=dual)
        loss.backward()
        token_losses = [policy_loss(logp[:, i:i + 1].detach(), old[:, :1], torch.tensor([adv]), one[:, :1], 0.2, 0.2,
                                    dual_clip=dual)[0].item() for i in range(3)]
        assert token_losses == pytest.approx(want_loss)
        assert loss.item() == pytest.approx(sum(want_loss))
        assert logp.grad[0].tolist() == pytest.approx(want_grad)  # d(-A x ratio)/dlogp = -A x ratio
        assert st["clip_dual"].item() == want_dual


def test_the_high_entropy_mask_keeps_the_top_share_of_live_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 5.0, 5.0]])
    live = torch.tensor([[True] * 4, [True, True, False, False]])  # the padding's entropies (5.0) are not tokens
    # six live tokens, half kept: 0.9, 0.7 and 0.5
    assert high_entropy_mask(entropy, live, 0.5).tolist() == [[0, 1, 1, 1], [0, 0, 0, 0]]
    assert high_entropy_mask(entropy, live, 0.2).tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]  # 1.2 rounds to one
    assert high_entropy_mask(entropy, live, 1.0).tolist() == live.float().tolist()
    # ties at the cut are all kept; an empty micro-batch keeps nothing
    assert high_entropy_mask(torch.tensor([[0.5, 0.5, 0.1]]), torch.ones(1, 3, dtype=torch.bool), 1 / 3).tolist() == [[1, 1, 0]]
    assert high_entropy_mask(entropy, torch.zeros_like(live), 0.2).sum() == 0


def test_k3_kl_hand_value_and_sign():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # exp(d) - d - 1 with d = log(.25/.5)
    assert k3_kl(logp, ref).item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert k3_kl(logp, logp).item() == 0.0
    x = torch.randn(1000)
    assert (k3_kl(x, torch.randn(1000)) >= 0).all()


def test_kl_term_adds_beta_times_k3():
    logp = torch.full((1, 1), math.log(0.5))
    ref = torch.full((1, 1), math.log(0.25))
    base, _ = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), 0.2, 0.2)
    with_kl, st = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 1), 0.2, 0.2, beta=0.1, ref_logp=ref)
    assert with_kl.item() - base.item() == pytest.approx(0.1 * (0.5 - math.log(0.5) - 1))
    assert float(st["kl"]) == pytest.approx(0.5 - math.log(0.5) - 1)


def test_an_entropy_bonus_lowers_the_loss_by_its_weighted_entropy():
    """loss = sum(w * (pg - coef * H)): two tokens of weights 0.25 and 0.75, entropies 1.5 and 0.5; the entropy's
    gradient is -coef * w."""
    logp = torch.zeros(1, 2)
    weight = torch.tensor([[0.25, 0.75]])
    entropy = torch.tensor([[1.5, 0.5]], requires_grad=True)
    base, _ = policy_loss(logp, logp, torch.tensor([1.0]), weight, 0.2, 0.2)
    loss, _ = policy_loss(logp, logp, torch.tensor([1.0]), weight, 0.2, 0.2, entropy_coef=0.1, entropy=entropy)
    assert loss.item() - base.item() == pytest.approx(-0.1 * (0.25 * 1.5 + 0.75 * 0.5))
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.025, -0.075]]))


def test_kl_estimators_hand_values_and_the_gradient_of_k2():
    """k1 = -d, k2 = d^2 / 2, k3 = exp(d) - d - 1 with d = ref - logp. As a loss, k2's gradient in logp is -d =
    log(pi / ref), the reverse KL's own per sample; k3's is 1 - pi_ref / pi."""
    d = math.log(0.25 / 0.5)
    for name, want in (("k1", -d), ("k2", d * d / 2), ("k3", math.exp(d) - d - 1)):
        logp = torch.full((1, 1), math.log(0.5), requires_grad=True)
        ref = torch.full((1, 1), math.log(0.25))
        loss, st = policy_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 1), 0.2, 0.2, beta=0.1,
                               ref_logp=ref, kl_estimator=name)
        assert float(st["kl"]) == pytest.approx(want) and loss.item() == pytest.approx(0.1 * want), name
        loss.backward()
        grad = {"k1": 1.0, "k2": -d, "k3": 1 - math.exp(d)}[name]
        assert logp.grad.item() == pytest.approx(0.1 * grad), name


def test_gradient_step_raises_the_probability_of_a_rewarded_token():
    theta = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.5)
    for adv, token in ((1.0, 3), (-1.0, 1)):
        before = theta.log_softmax(0)[token].item()
        logp = theta.log_softmax(0)[token].view(1, 1)
        loss, _ = policy_loss(logp, logp.detach(), torch.tensor([adv]), torch.ones(1, 1), 0.2, 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = theta.log_softmax(0)[token].item()
        assert (after > before) if adv > 0 else (after < before)


def test_a_ratio_between_the_two_clip_bounds_is_not_counted_as_clipped_high():
    """Clip-higher (eps_low 0.2, eps_high 0.28): a ratio of 1.25 with A > 0 is above 1 + eps_low but inside
    1 + eps_high, so it keeps its gradient and is no clip_high token (the statistic must use eps_high)."""
    old = torch.zeros(1, 1)
    logp = torch.full((1, 1), math.log(1.25), requires_grad=True)
    loss, st = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 1), 0.2, 0.28)
    loss.backward()
    assert loss.item() == pytest.approx(-1.25)
    assert logp.grad.item() == pytest.approx(-1.25)  # d(-ratio*A)/dlogp = -ratio: unclipped
    assert st["clip_high"] == 0 and st["clip_low"] == 0 and st["tokens"] == 1


def _gspo(log_ratios, adv, width=3, eps=(0.2, 0.2), level="sequence"):
    """Sequences with the given per-token log ratios (padded to `width` with garbage log-probs), grpo weights;
    returns (loss, gradient of each token's log-prob, stats)."""
    n = len(log_ratios)
    logp = torch.full((n, width), 7.0)  # padding: a value that would move any ratio it leaked into
    for i, r in enumerate(log_ratios):
        logp[i, : len(r)] = torch.tensor(r)
    logp.requires_grad_(True)
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (width - len(r)) for r in log_ratios])
    weight = mask * torch.tensor(sequence_token_weights([len(r) for r in log_ratios], "grpo", width))[:, None]
    loss, st = policy_loss(logp, torch.zeros(n, width), torch.tensor(adv), weight, *eps, ratio_level=level)
    loss.backward()
    return loss.item(), logp.grad, st


def test_the_sequence_ratio_is_the_geometric_mean_and_clips_whole_sequences():
    """GSPO: s_i = exp(mean_t log ratio_t), min(s A, clip(s) A) per sequence; here with hand values."""
    l11, l13, l2 = math.log(1.1), math.log(1.3), math.log(2.0)
    loss, grad, st = _gspo([[l11, l13], [l2, 0.0, 0.0]], [1.0, 1.0])
    s0 = math.sqrt(1.1 * 1.3)  # 1.196: inside [0.8, 1.2]
    # sequence 1: 2^(1/3) = 1.26 > 1.2 with A > 0: clipped to 1.2 as a whole, its tokens of ratio 1 included
    assert loss == pytest.approx((-s0 - 1.2) / 2)
    # d/d logp_t of -(1/N) s A, s = exp(mean log ratio): -(1/N) A s / |y|, the same for each token of the sequence
    assert grad[0, :2].tolist() == pytest.approx([-s0 / 4] * 2)
    assert grad[1].tolist() == [0.0, 0.0, 0.0] and grad[0, 2].item() == 0.0
    assert (st["clip_high"].item(), st["clip_low"].item(), st["tokens"].item()) == (3, 0, 5)
    # per token, sequence 1's last two tokens (ratio 1) keep their gradient and only its first is clipped (and
    # sequence 0's 1.3)
    loss, grad, st = _gspo([[l11, l13], [l2, 0.0, 0.0]], [1.0, 1.0], level="token")
    assert loss == pytest.approx(-(1.1 + 1.2) / 4 - (1.2 + 1 + 1) / 6)
    assert grad[1].tolist() == pytest.approx([0.0, -1 / 6, -1 / 6]) and st["clip_high"].item() == 2


def test_the_sequence_ratio_with_a_negative_advantage_and_gspo_clip_range():
    """A < 0 and a ratio below 1 - eps_low: clipped (the pessimistic bound), no gradient; at GSPO's own range
    (3e-4, 4e-4) a sequence whose tokens move by +1% and -1% stays inside (mean log ratio ~ 0)."""
    loss, grad, st = _gspo([[math.log(0.5), 0.0]], [-1.0], width=2)
    assert loss == pytest.approx(0.8) and grad.abs().sum().item() == 0.0 and st["clip_low"].item() == 2
    up, down = math.log(1.01), -math.log(1.01)
    loss, grad, st = _gspo([[up, down]], [1.0], width=2, eps=(3e-4, 4e-4))
    assert loss == pytest.approx(-1.0) and st["clip_high"].item() == 0
    assert grad[0].tolist() == pytest.approx([-0.5, -0.5])
    _, _, st = _gspo([[up, down]], [1.0], width=2, eps=(3e-4, 4e-4), level="token")
    assert st["clip_high"].item() == 1  # per token, the +1% token leaves [1 - 3e-4, 1 + 4e-4]


def test_on_policy_the_sequence_ratio_gives_the_token_ratios_loss_and_gradient():
    torch.manual_seed(0)
    base = torch.randn(3, 4)
    mask = torch.tensor([[1.0] * 4, [1.0] * 2 + [0.0] * 2, [1.0] * 3 + [0.0]])
    weight = mask * torch.tensor(sequence_token_weights([4, 2, 3], "grpo", 4))[:, None]
    out = {}
    for level in ("token", "sequence"):
        logp = base.clone().requires_grad_(True)
        loss, _ = policy_loss(logp, logp.detach(), torch.tensor([0.5, -1.0, 2.0]), weight, 0.2, 0.2, ratio_level=level)
        loss.backward()
        out[level] = (loss.item(), logp.grad)
    assert out["token"][0] == pytest.approx(out["sequence"][0])
    assert torch.allclose(out["token"][1], out["sequence"][1])
