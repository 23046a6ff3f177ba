"""GRPO end to end on the smoke task: a random tiny model must measurably learn."""

import json
import math

import pytest
import torch

from ponder.train import train


def _metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_random_model_learns_first_digit_from_below_20_to_above_90(smoke_cfg):
    cfg = smoke_cfg("name=learn")
    train(cfg)
    rows = _metrics(cfg.run_dir)
    first = sum(r["accuracy"] for r in rows[:3]) / 3
    last = sum(r["accuracy"] for r in rows[-5:]) / 5
    assert first < 0.2, first
    assert last > 0.9, last
    # the run directory holds everything DESIGN.md promises
    assert (cfg.run_dir / "config.yaml").is_file()
    assert (cfg.run_dir / "samples.jsonl").read_text().count("\n") == 2 * len(rows)
    assert any((cfg.run_dir / "tensorboard").iterdir())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = cfg.run_dir / "checkpoints" / f"step-{cfg.train.steps}"
    AutoModelForCausalLM.from_pretrained(final)
    AutoTokenizer.from_pretrained(final)


def test_each_variant_runs_and_logs_its_figures(smoke_cfg):
    """Dr. GRPO / DAPO options, mu > 1 (old log-probs kept), KL with a reference reset every 2 steps, RLOO,
    dynamic sampling: each figure checked where a broken variant would show."""
    from ponder.rl.trainer import GRPOTrainer

    cfg = smoke_cfg("name=variants", "train.steps=3", "train.save_every=0", "rollout.prompts_per_step=4",
                    "algorithm.advantage=rloo", "algorithm.loss_agg=dr_grpo", "algorithm.mu=2",
                    "algorithm.minibatches=2", "algorithm.beta=0.04", "algorithm.ref_reset_every=2",
                    "algorithm.dynamic_sampling=true", "optim.lr=0.05", "rewards={test_char_hash: 1.0}")
    t = GRPOTrainer(cfg)
    same_as_ref = lambda: all(torch.equal(a, b) for a, b in zip(t.model.parameters(), t.ref.parameters()))  # noqa: E731
    assert same_as_ref()
    rows = []
    for step in (1, 2, 3):
        rows.append(t.step())
        # the reference follows the policy at every second step only
        assert same_as_ref() == (step == 2), step
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    # later updates in a step are off-policy: with the old log-probs kept, ratios leave [1 - eps, 1 + eps_high]
    # (ignoring them would make every ratio exactly 1, never clipped)
    assert sum(r["clip_low_frac"] + r["clip_high_frac"] for r in rows) > 0
    # the policy has moved away from the reference within steps 1 and 3 (k3 >= 0, and > 0 once it differs)
    assert rows[0]["kl"] > 0 and rows[2]["kl"] > 0
    assert all(r["groups_generated"] >= 4 for r in rows)


def test_a_sequence_level_ratio_clips_whole_completions_in_the_trainer(smoke_cfg, monkeypatch):
    """algorithm.ratio=sequence (GSPO) reaches the loss: in off-policy updates at GSPO's clip range a completion's
    tokens are clipped all together or not at all, so the clipped token count is a sum of whole lengths."""
    from ponder.rl import trainer
    from ponder.rl.trainer import GRPOTrainer

    real, seen = trainer.policy_loss, []

    def spy(logp, old, adv, weight, *args, **kw):
        loss, st = real(logp, old, adv, weight, *args, **kw)
        seen.append((kw["ratio_level"], (weight != 0).sum(1), st))
        return loss, st

    monkeypatch.setattr(trainer, "policy_loss", spy)
    cfg = smoke_cfg("name=gspo", "train.steps=2", "train.save_every=0", "algorithm.ratio=sequence", "algorithm.mu=2",
                    "algorithm.minibatches=2", "algorithm.eps_low=3e-4", "algorithm.eps_high=4e-4", "optim.lr=0.05",
                    "rewards={test_char_hash: 1.0}")
    t = GRPOTrainer(cfg)
    assert t.start_notices == []
    rows = [t.step() for _ in range(2)]
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows)
    assert {level for level, _, _ in seen} == {"sequence"}
    clipped = [(lengths, st["clip_low"] + st["clip_high"]) for _, lengths, st in seen]
    assert sum(c.item() for _, c in clipped) > 0  # later updates are off-policy and leave GSPO's narrow range
    for lengths, c in clipped:  # a sum of whole sequences' lengths (subset-sum over this micro-batch's rows)
        sums = {0}
        for n in lengths.tolist():
            sums |= {x + n for x in sums}
        assert int(c.item()) in sums


def test_the_dual_clip_reaches_the_update_and_logs_its_share(smoke_cfg):
    """Off-policy (mu = 2, two mini-batches, a large step), some ratios of negative-advantage tokens pass
    1.3: the dual clip holds them and the run logs their share; without the option there is no such figure."""
    from ponder.rl.trainer import GRPOTrainer

    args = ("train.steps=2", "train.save_every=0", "rollout.prompts_per_step=4", "algorithm.mu=2",
            "algorithm.minibatches=2", "optim.lr=0.05", "rewards={test_char_hash: 1.0}")
    t = GRPOTrainer(smoke_cfg("name=dual", *args, "algorithm.dual_clip=1.3"))
    rows = [t.step(), t.step()]
    assert any(r["clip_dual_frac"] > 0 for r in rows), rows
    assert all(0 <= r["clip_dual_frac"] <= 1 for r in rows)
    assert "clip_dual_frac" not in GRPOTrainer(smoke_cfg("name=plain", *args)).step()


def test_only_the_high_entropy_tokens_carry_policy_gradient(smoke_cfg, monkeypatch):
    """algorithm.top_entropy_quantile: each micro-batch's mask of its highest-entropy live tokens, a quarter of
    them, is what weighs the policy-gradient term."""
    import ponder.rl.trainer as trainer_module

    calls, scales = [], []
    mask_of, loss_of = trainer_module.high_entropy_mask, trainer_module.policy_loss

    def masking(entropy, live, share):
        calls.append((entropy.detach().clone(), live, mask_of(entropy, live, share)))
        return calls[-1][2]

    monkeypatch.setattr(trainer_module, "high_entropy_mask", masking)
    monkeypatch.setattr(trainer_module, "policy_loss", lambda *a, **k: scales.append(k["token_scale"]) or loss_of(*a, **k))
    t = trainer_module.GRPOTrainer(smoke_cfg("name=forks", "train.steps=1", "train.save_every=0",
                                              "rollout.prompts_per_step=4", "algorithm.top_entropy_quantile=0.25",
                                              "rewards={test_char_hash: 1.0}"))
    assert math.isfinite(t.step()["grad_norm"])
    assert calls and len(calls) == len(scales) and all(s is c[2] for s, c in zip(scales, calls))
    for entropy, live, mask in calls:
        assert mask.sum() == round(0.25 * live.sum().item())
        assert entropy[mask.bool()].min() >= entropy[live & ~mask.bool()].max()  # the kept are the highest


def test_the_sequence_level_ratio_says_where_it_does_nothing():
    from ponder.config import AlgoConfig
    from ponder.rl.trainer import ratio_notices

    assert ratio_notices(AlgoConfig()) == []
    assert "changes nothing at mu = 1" in ratio_notices(AlgoConfig(ratio="sequence"))[0]
    assert "[0.8, 1.2]" in ratio_notices(AlgoConfig(ratio="sequence", mu=2))[0]
    assert ratio_notices(AlgoConfig(ratio="sequence", mu=2, eps_low=3e-4, eps_high=4e-4)) == []
    both = ratio_notices(AlgoConfig(ratio="sequence", dual_clip=3.0))
    assert len(both) == 2 and both[1].startswith("ponder: algorithm.dual_clip=3 changes nothing at mu = 1")
    assert ratio_notices(AlgoConfig(dual_clip=3.0, minibatches=2)) == []


def test_an_fp8_kv_cache_without_importance_correction_is_noticed():
    from transformers import GPT2Config, GPT2LMHeadModel

    from ponder.config import AlgoConfig
    from ponder.models import load
    from ponder.models.tiny import char_tokenizer
    from ponder.rl.trainer import rollout_notices
    from ponder.rollout import make_engine

    tok, qwen = char_tokenizer(), load("tiny-random", seed=1)[0]
    fp8 = make_engine("fast", qwen, tok, kv_dtype="fp8")
    assert "algorithm.rollout_is_cap" in rollout_notices(fp8, AlgoConfig())[0]
    assert rollout_notices(fp8, AlgoConfig(rollout_is_cap=2.0)) == []
    assert rollout_notices(make_engine("fast", qwen, tok), AlgoConfig()) == []
    assert rollout_notices(make_engine("hf", qwen, tok), AlgoConfig()) == []
    both = rollout_notices(make_engine("fast", qwen, tok, kv_dtype="fp8", weight_dtype="fp8"), AlgoConfig())
    assert both[0].startswith("ponder: rollout.engine_options kv_dtype=fp8 and weight_dtype=fp8 samples through rounded")
    # a model the fast engine hands to hf: transformers' cache is not rounded, nothing to notice
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    assert rollout_notices(make_engine("fast", gpt2, tok, kv_dtype="fp8"), AlgoConfig()) == []


def test_overlong_filtering_masks_truncated_completions(smoke_cfg):
    from ponder.rl.trainer import GRPOTrainer

    for masked in (True, False):
        # a reward that varies within groups: without masking, the step must move the weights
        t = GRPOTrainer(smoke_cfg(f"name=overlong-{masked}", f"algorithm.mask_truncated={str(masked).lower()}",
                                  "rewards={test_share_of_sevens: 1.0}"))
        collect = t.collect

        def all_truncated():
            kept, everything, timing = collect()
            for g in kept:
                for s in g.samples:
                    s.truncated = True
            return kept, everything, timing

        t.collect = all_truncated
        before = [p.detach().clone() for p in t.model.parameters()]
        m = t.step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
        assert unchanged == masked
        # no token measured: no per-token figure (it logged entropy 0, and the entropy guardrail stopped runs on it)
        per_token = [m["entropy"], m["kl"], m["clip_low_frac"], m["clip_high_frac"]]
        assert all(math.isnan(v) for v in per_token) if masked else m["entropy"] > 0


def test_the_logged_learning_rate_is_the_one_the_update_used(smoke_cfg):
    """The schedule stepped before the figures were read: each step logged the next step's rate (a linear schedule's
    step 1 logged 2/3 of the rate it trained at, its last step 0)."""
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg("name=lr", "optim.lr=0.003", "optim.schedule=linear", "train.steps=3"))
    used, logged = [], []
    for _ in range(3):
        used.append(t.optimizer.param_groups[0]["lr"])
        logged.append(t.step()["lr"])
    assert logged == used and used[0] == pytest.approx(0.003) and used[2] == pytest.approx(0.001)


def test_no_reference_model_without_kl(smoke_cfg):
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg("name=noref", "algorithm.beta=0"))
    assert t.ref is None


def _grad(t) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None])


def _update(smoke_cfg, name, agg, budget):
    """One update on the first step's rollouts (a reward that varies in every group); (trainer, micro-batches).
    The padded pass, whose micro-batches (rows by padded length) split unevenly at this budget; the packed
    pass's split is checked against it in test_packed_forward_gives_the_gradient_of_the_padded_forward."""
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg(f"name={name}", f"optim.token_budget={budget}", f"algorithm.loss_agg={agg}",
                              "rollout.max_new_tokens=6", "optim.lr=0", "rewards={test_char_hash: 1.0}", "train.forward=padded"))
    groups, _, _ = t.collect()
    assert all(len(set(g.rewards)) > 1 for g in groups)  # every group has a signal
    seen, real = [], t.policy_pass.micro_batches
    t.policy_pass.micro_batches = lambda samples, b: seen.append(real(samples, b)) or seen[-1]
    t.update([s for g in groups for s in g.samples])
    return t, seen[0]


def test_micro_batching_gives_the_gradient_of_the_whole_batch(smoke_cfg):
    """Token-budget micro-batches of unequal sizes, with accumulation, must equal one big batch, for every
    aggregation but bnpo (whose normaliser is the micro-batch by definition: see the next test)."""
    for agg in ("grpo", "dapo", "dr_grpo"):
        whole, one = _update(smoke_cfg, f"mb-{agg}-whole", agg, 100_000)
        split, parts = _update(smoke_cfg, f"mb-{agg}-split", agg, 100)
        assert len(one) == 1 and len({len(mb) for mb in parts}) > 1  # unequal micro-batches
        assert torch.allclose(_grad(whole), _grad(split), atol=1e-6, rtol=1e-4), agg


def test_bnpo_averages_the_token_means_of_the_micro_batches(smoke_cfg, monkeypatch):
    """bnpo's gradient is (1/K) sum over micro-batches of (1/tokens of the micro-batch) sum of token gradients:
    the same as one big batch whose tokens carry those weights."""
    import ponder.rl.trainer as trainer_mod

    split, parts = _update(smoke_cfg, "bnpo-split", "bnpo", 100)
    assert len({sum(len(s.completion_ids) for s in mb) for mb in parts}) > 1  # unequal token counts
    by_sample = {}
    for mb in parts:
        tokens = sum(len(s.completion_ids) for s in mb)
        for s in mb:
            by_sample[(tuple(s.prompt_ids), tuple(s.completion_ids), s.advantage)] = 1.0 / (tokens * len(parts))
    monkeypatch.setattr(trainer_mod, "sequence_token_weights", lambda lengths, *a, **k: list(weights))
    t = trainer_mod.GRPOTrainer(smoke_cfg("name=bnpo-whole", "optim.token_budget=100000", "algorithm.loss_agg=dapo",
                                          "rollout.max_new_tokens=6", "optim.lr=0", "rewards={test_char_hash: 1.0}",
                                          "train.forward=padded"))
    groups, _, _ = t.collect()
    samples = [s for g in groups for s in g.samples]
    weights = [by_sample[(tuple(s.prompt_ids), tuple(s.completion_ids), s.advantage)] for s in samples]
    t.update(samples)
    assert torch.allclose(_grad(t), _grad(split), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("entropy_coef", [0, 0.3])
def test_packed_forward_gives_the_gradient_of_the_padded_forward(smoke_cfg, entropy_coef):
    """train.forward=packed (each prompt once, no padding; micro-batches of whole groups) against the model's
    own forward on padded rows, with and without micro-batching, and for the LoRA reference pass; with an entropy
    bonus, the entropy's gradient through the fused head against the chunked head's autograd."""
    from ponder.rl.trainer import GRPOTrainer

    grads = []
    for forward, budget in (("padded", 100_000), ("packed", 100_000), ("packed", 40)):
        t = GRPOTrainer(smoke_cfg(f"name=pk-{forward}-{budget}", f"optim.token_budget={budget}", f"train.forward={forward}",
                                  "rollout.max_new_tokens=6", "optim.lr=0", "algorithm.mu=2",
                                  f"algorithm.entropy_coef={entropy_coef}"))
        assert t.policy_pass.packed == (forward == "packed")
        groups, _, _ = t.collect()
        samples = [s for g in groups for s in g.samples]
        t._score(samples, "old_logp", t.model)
        t.update(samples)
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters() if p.grad is not None]))
    for g in grads[1:]:
        assert torch.allclose(grads[0], g, atol=1e-6, rtol=1e-4)


def test_lora_trains_adapters_only_and_uses_the_base_as_reference(smoke_cfg):
    from ponder.rewards import REWARDS
    from ponder.rl.trainer import GRPOTrainer

    # a dense reward (share of digits) so that every group has signal and the adapters must move
    REWARDS["digit_share"] = lambda completions, **_: [sum(c.isdigit() for c in x) / max(len(x), 1) for x in completions]
    try:
        t = GRPOTrainer(smoke_cfg("name=lora", "model.lora={r: 4, alpha: 8}", "algorithm.beta=0.1", "optim.lr=1e-2",
                                  "rollout.prompts_per_step=4", "rewards={digit_share: 1.0}", "train.forward=packed"))
    finally:
        del REWARDS["digit_share"]
    assert t.ref is None  # no copy: the reference is the base with adapters switched off
    base = {k: v.clone() for k, v in t.model.state_dict().items() if "lora_" not in k}
    first = t.step()
    assert first["kl"] == 0.0  # LoRA starts as the identity (B = 0): policy == reference
    t.step()
    second = t.step()
    assert second["kl"] > 0.0
    after = t.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert any(not torch.equal(v, 0 * v) for k, v in after.items() if "lora_B" in k)


def test_engine_options_reach_the_engine_and_unknown_ones_are_named(smoke_cfg):
    from ponder.errors import UserError
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg("name=eopts", "rollout.engine=fast", "rollout.engine_options={keep_cache: false, sync_every: 4}"))
    assert (t.engine.keep_cache, t.engine.sync_every) == (False, 4)
    with pytest.raises(UserError, match=r"rollout.engine_options: the fast engine has no option 'keep_cach'; its options are .*keep_cache"):
        GRPOTrainer(smoke_cfg("name=eopts-bad", "rollout.engine=fast", "rollout.engine_options={keep_cach: false}"))


def test_training_log_probs_use_the_sampling_temperature(smoke_cfg):
    """Tokens drawn at temperature 0.5 are scored under the same tempered distribution, in both the old
    log-probs (mu = 2) and the updates: with the weights frozen (lr 0) every ratio is exactly 1, never clipped."""
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg("name=temperature", "rollout.temperature=0.5", "algorithm.mu=2", "optim.lr=0",
                              "rollout.max_new_tokens=6", "rewards={test_char_hash: 1.0}"))
    m = t.step()
    assert m["clip_low_frac"] == 0 and m["clip_high_frac"] == 0  # at temperature 1 in the update: 7% clipped


def test_gradient_clipping_bounds_the_applied_gradient(smoke_cfg):
    """optim.grad_clip: the gradient the optimizer applies has at most that norm; the logged norm is the raw one."""
    t, _ = _update(smoke_cfg, "clip", "grpo", 100_000)  # grad_clip 1.0 there: a raw norm well below it
    raw = _grad(t).norm().item()
    clip = raw / 10
    t.cfg.optim.grad_clip = clip
    groups, _, _ = t.collect()
    stats = t.update([s for g in groups for s in g.samples])
    assert stats["grad_norm"] > clip and _grad(t).norm().item() == pytest.approx(clip, rel=1e-4)


def _zero_advantage_update(smoke_cfg, name, agg, skip, zero_groups, *extra):
    """One update on the first step's rollouts, the samples of the first `zero_groups` groups given advantage 0
    (as a group of equal rewards gets); (trainer, its stats, (grad enabled, samples) of each pass, the weights before)."""
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg(f"name={name}", f"algorithm.loss_agg={agg}", f"train.skip_zero_advantage={skip}",
                              "rollout.max_new_tokens=6", "rewards={test_char_hash: 1.0}", "optim.token_budget=100",
                              *extra))
    groups, _, _ = t.collect()
    for g in groups[:zero_groups]:
        for s in g.samples:
            s.advantage = 0.0
    passes, real = [], t.policy_pass.logprobs
    t.policy_pass.logprobs = lambda model, mb, **k: (passes.append((torch.is_grad_enabled(), len(mb))), real(model, mb, **k))[1]
    before = [p.detach().clone() for p in t.model.parameters()]
    stats = t.update([s for g in groups for s in g.samples])
    return t, stats, passes, before


def test_samples_with_zero_advantage_take_no_backward_and_leave_the_gradient_and_entropy_as_they_were(smoke_cfg):
    """train.skip_zero_advantage: with beta 0, a sample whose advantage is 0 only gets a forward without gradient
    (for the entropy); the gradient, loss, entropy and token count equal those of the update that ran it through
    backward, for each aggregation whose normaliser does not depend on the micro-batch split."""
    for agg in ("grpo", "dapo", "dr_grpo"):
        ran, ran_stats, ran_passes, _ = _zero_advantage_update(smoke_cfg, f"zero-{agg}-ran", agg, False, 2, "optim.lr=0")
        skip, skip_stats, skip_passes, _ = _zero_advantage_update(smoke_cfg, f"zero-{agg}-skip", agg, True, 2, "optim.lr=0")
        samples = sum(n for _, n in ran_passes)
        idle = 2 * skip.cfg.rollout.group_size
        assert all(grad for grad, _ in ran_passes)
        assert sum(n for grad, n in skip_passes if grad) == samples - idle  # the zero-advantage samples: no backward
        assert sum(n for grad, n in skip_passes if not grad) == idle  # ... their forward for the entropy (update()
        # alone: the weights need not be the rollout's, so the rollout's entropies are not taken)
        assert torch.allclose(_grad(ran), _grad(skip), atol=1e-7, rtol=1e-5), agg
        for k in ("loss", "entropy", "tokens"):
            assert skip_stats[k] == pytest.approx(ran_stats[k], rel=1e-5, abs=1e-9), (agg, k)
    _, _, passes, _ = _zero_advantage_update(smoke_cfg, "zero-bnpo", "bnpo", True, 2, "optim.lr=0")
    assert all(grad for grad, _ in passes)  # bnpo's weights depend on the split: every sample goes through backward
    _, _, passes, _ = _zero_advantage_update(smoke_cfg, "zero-kl", "grpo", True, 2, "optim.lr=0", "algorithm.beta=0.1")
    assert all(grad for grad, _ in passes)  # the KL term has a gradient whatever the advantage


@pytest.mark.parametrize("mu", [1, 2])
def test_the_skipped_samples_entropy_comes_from_the_rollout_without_a_forward(smoke_cfg, mu):
    """The fast engine gives each token's entropy: while the weights are the rollout's (before the step's first
    optimizer step) the zero-advantage samples need no forward at all, and the logged entropy and token count are
    those the forward gave. After an optimizer step (mu = 2's second pass) the forward runs again: the weights moved.
    The hf engine gives none: its samples keep their forward."""
    from ponder.rl.trainer import GRPOTrainer

    stats, passes = {}, {}
    for name, engine, use_rollout in (("forward", "fast", False), ("rollout", "fast", True), ("hf", "hf", True)):
        t = GRPOTrainer(smoke_cfg(f"name=ent-{name}", f"rollout.engine={engine}", "rollout.max_new_tokens=6",
                                  "rewards={test_char_hash: 1.0}", f"algorithm.mu={mu}", "optim.lr=0"))
        groups, _, _ = t.collect()
        for g in groups[:3]:
            for s in g.samples:
                s.advantage = 0.0
                assert (s.rollout_entropy is None) == (engine == "hf")
                if not use_rollout:
                    s.rollout_entropy = None
        seen, real = [], t.policy_pass.logprobs
        t.policy_pass.logprobs = lambda model, mb, **k: (seen.append((torch.is_grad_enabled(), len(mb))), real(model, mb, **k))[1]
        stats[name], passes[name] = t.learn([s for g in groups for s in g.samples]), seen
    idle, scored = 3 * 8, (16 * 8 - 3 * 8 if mu > 1 else 0)  # mu 2: the others' old log-probs, scored first
    no_grad = {name: sum(n for grad, n in p if not grad) - scored for name, p in passes.items()}
    assert no_grad["forward"] == no_grad["hf"] == mu * idle
    assert no_grad["rollout"] == (mu - 1) * idle  # none in the first pass; the second's weights had moved
    for first, ref in zip(stats["rollout"], stats["forward"]):
        assert first["tokens"] == ref["tokens"]
        assert first["entropy"] == pytest.approx(ref["entropy"], rel=1e-5)


def test_an_update_whose_samples_all_have_zero_advantage_still_steps_the_optimizer(smoke_cfg):
    """All idle: no sample's backward runs, yet AdamW steps as it would on their zero gradients (its weight decay
    and moments move the weights); the same weights as the update that ran them all."""
    after = []
    for skip in (False, True):
        t, stats, passes, before = _zero_advantage_update(smoke_cfg, f"all-idle-{skip}", "grpo", skip, 99,
                                                          "optim.lr=0.01", "optim.weight_decay=0.1")
        assert stats["skipped"] == 0.0 and stats["grad_norm"] == 0.0
        after.append([p.detach().clone() for p in t.model.parameters()])
        assert not all(torch.equal(a, b) for a, b in zip(before, after[-1]))  # the decay moved them
        assert [n for grad, n in passes if grad] == ([1] if skip else [n for _, n in passes])  # one padding sample
    for a, b in zip(*after):
        assert torch.equal(a, b)


def test_zero_advantage_samples_are_not_scored_for_later_passes_and_the_passes_end_alike(smoke_cfg):
    """mu 2 and two mini-batches (old log-probs kept for the later passes): the idle samples' old log-probs are not
    computed, and the weights after the four optimizer steps match those of the run that put every sample through."""
    from ponder.rl.trainer import GRPOTrainer

    weights = []
    for skip in (False, True):
        t = GRPOTrainer(smoke_cfg(f"name=zero-mu-{skip}", f"train.skip_zero_advantage={skip}", "algorithm.mu=2",
                                  "algorithm.minibatches=2", "rollout.max_new_tokens=6", "rewards={test_char_hash: 1.0}",
                                  "optim.lr=1e-3"))
        groups, _, _ = t.collect()
        for g in groups[1::2]:
            for s in g.samples:
                s.advantage = 0.0
        t.learn([s for g in groups for s in g.samples])
        assert all((s.old_logp is None) == (skip and s.advantage == 0) for g in groups for s in g.samples)
        weights.append(torch.cat([p.detach().flatten() for p in t.model.parameters()]))
    # Adam divides each gradient by its own scale: rounding-level differences of near-zero gradients move weights by
    # a small share of the learning rate, which is all that differs (lr 1e-3: at most 1e-5 here)
    assert torch.allclose(weights[0], weights[1], atol=1e-5, rtol=0)


def test_log_samples_writes_that_many_completions_each_prompts_first_then_its_second():
    """train.log_samples wrote the first completion of the first k groups: 64 asked of 128 gave 16 (one per prompt),
    and the rows said nothing of the completion's length or whether it was cut off."""
    from ponder.rl.batching import Sample
    from ponder.rl.trainer import GRPOTrainer, Group

    groups = [Group({"prompt": f"p{i}", "answer": str(i)},
                    [Sample([1], [5] * (i + j + 1), truncated=j == 1) for j in range(3)],
                    [f"c{i}{j}" for j in range(3)], [float(i + j) for j in range(3)], {"accuracy": [1.0, 0.0, 0.5]})
              for i in range(2)]
    rows = GRPOTrainer.sample_rows(None, groups, 5)
    assert [r["completion"] for r in rows] == ["c00", "c10", "c01", "c11", "c02"]
    assert [(r["completion_length"], r["truncated"], r["reward"]) for r in rows[:3]] == [(1, False, 0.0), (2, False, 1.0),
                                                                                         (2, True, 1.0)]
    assert rows[2]["rewards"] == {"accuracy": 0.0} and rows[1]["prompt"] == "p1" and rows[1]["answer"] == "1"
    assert len(GRPOTrainer.sample_rows(None, groups, 64)) == 6


def test_dynamic_sampling_keeps_groups_by_their_correctness_not_a_shaping_term(smoke_cfg):
    """DAPO drops the prompts answered all right or all wrong. A group all right whose totals differ only by a shaping
    term (an overlong penalty) was kept, and group_std scaled that term up to full-size advantages."""
    from ponder.rl.trainer import GRPOTrainer, Group

    def group(accuracy, shaping):
        return Group({}, [], [], [(a or 0.0) + s for a, s in zip(accuracy, shaping)], {"accuracy": accuracy, "overlong": shaping})

    t = GRPOTrainer(smoke_cfg("name=ds", "rewards={accuracy: 1.0, overlong: {weight: 1.0, max_len: 8, buffer: 4}}", "algorithm.dynamic_sampling=true"))
    assert not t._varies(group([1.0] * 4, [0.0, -0.1, 0.0, -0.3]))  # all right: no signal on correctness
    assert not t._varies(group([0.0] * 4, [0.0, -0.1, 0.0, 0.0]))  # all wrong
    assert t._varies(group([1.0, 0.0, 1.0, 1.0], [0.0] * 4))
    assert t._varies(group([None] * 4, [0.0, -0.1, 0.0, 0.0]))  # accuracy does not apply to the task: the total decides
    # a math and code mix: each group by the correctness reward that applies to it
    code = Group({}, [], [], [1.0, 0.9, 1.0, 0.8], {"accuracy": [None] * 4, "code": [1.0] * 4, "overlong": [0, -.1, 0, -.2]})
    assert not t._varies(code)
    t.cfg.algorithm.dynamic_sampling_by = "overlong"
    assert t._varies(group([1.0] * 4, [0.0, -0.1, 0.0, -0.3]))

    # through a step: a constant correctness reward drops every group, so each resampling round runs
    steps = {}
    for by in ("test_constant", None):
        extra = [f"algorithm.dynamic_sampling_by={by}"] if by else []
        t = GRPOTrainer(smoke_cfg(f"name=ds-{by}", "train.steps=1", "train.save_every=0", "rollout.prompts_per_step=2",
                                  "rewards={test_constant: 1.0, test_char_hash: 0.01}", "algorithm.dynamic_sampling=true",
                                  "algorithm.max_resample_rounds=2", *extra))
        steps[by] = t.step()["groups_generated"]
    assert steps == {"test_constant": 6, None: 2}  # without it the run has no accuracy reward: the total decides
    # every group dropped: the last ones are trained on with zero advantage, not their shaping term's scaled up
    t = GRPOTrainer(smoke_cfg("name=ds-none", "train.steps=1", "train.save_every=0", "rollout.prompts_per_step=2",
                              "rewards={test_constant: 1.0, test_char_hash: 0.01}", "algorithm.dynamic_sampling=true",
                              "algorithm.dynamic_sampling_by=test_constant", "algorithm.max_resample_rounds=0"))
    kept, everything, _ = t.collect()
    assert len(kept) == 2 and len({r for g in kept for r in g.rewards}) > 1  # the totals differ ...
    assert all(s.advantage == 0.0 for g in kept for s in g.samples)  # ... and no advantage comes of it


def test_dynamic_sampling_by_must_name_one_of_the_runs_rewards(error_line, tmp_path):
    assert error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "algorithm.dynamic_sampling_by=acuracy") == (
        "ponder: error: config algorithm.dynamic_sampling_by names 'acuracy', which is not one of the run's rewards "
        "(accuracy); name one of them, or leave it unset")


def test_truncated_importance_sampling_weighs_tokens_by_the_engines_probabilities(smoke_cfg, monkeypatch):
    """algorithm.rollout_is_cap: each token's policy-gradient term times min(pi_old / pi_engine, cap). On the CPU the
    engine samples the trainer's own distribution, so the ratio is 1 (the engine's log-probs agree with the update's);
    an engine whose probabilities were three times the trainer's weighs each token by 1/3, one with a third of them
    by the cap, 2: twice the loss."""
    from ponder.rl import trainer as trainer_mod
    from ponder.rl.trainer import GRPOTrainer

    args = ("train.steps=1", "train.save_every=0", "rollout.prompts_per_step=4", "rewards={test_char_hash: 1.0}",
            "rollout.temperature=0.7", "train.skip_zero_advantage=false")
    plain = GRPOTrainer(smoke_cfg("name=plain", *args)).step()
    assert "rollout_is/mean" not in plain
    same = GRPOTrainer(smoke_cfg("name=tis", *args, "algorithm.rollout_is_cap=2")).step()
    assert same["rollout_is/mean"] == pytest.approx(1.0, abs=1e-4) and same["rollout_is/capped_frac"] == 0
    assert same["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-7)

    real = trainer_mod.Sample

    def shifted(*a, rollout_logp=None, **kw):  # the engine's probability three times the trainer's
        return real(*a, rollout_logp=None if rollout_logp is None else rollout_logp + math.log(3), **kw)

    monkeypatch.setattr(trainer_mod, "Sample", shifted)
    off = GRPOTrainer(smoke_cfg("name=tis-off", *args, "algorithm.rollout_is_cap=2")).step()
    assert off["rollout_is/mean"] == pytest.approx(1 / 3, rel=1e-4) and off["rollout_is/capped_frac"] == 0
    monkeypatch.setattr(trainer_mod, "Sample", lambda *a, rollout_logp=None, **kw: real(
        *a, rollout_logp=None if rollout_logp is None else rollout_logp - math.log(3), **kw))
    capped = GRPOTrainer(smoke_cfg("name=tis-capped", *args, "algorithm.rollout_is_cap=2")).step()
    assert capped["rollout_is/mean"] == pytest.approx(3.0, rel=1e-4) and capped["rollout_is/capped_frac"] == 1.0
    assert capped["loss"] == pytest.approx(2 * plain["loss"], rel=1e-4, abs=1e-7)
    assert off["loss"] == pytest.approx(plain["loss"] / 3, rel=1e-4, abs=1e-7)


def test_a_soft_reference_update_mixes_the_policy_in(smoke_cfg, error_line, tmp_path):
    """algorithm.ref_mix (TR-DPO, TRL's ref_model_mixup_alpha): at each reset the reference moves that share of the way
    to the policy, where R1's reset replaces it."""
    from ponder.rl.trainer import GRPOTrainer

    t = GRPOTrainer(smoke_cfg("name=mix", "train.steps=1", "train.save_every=0", "rollout.prompts_per_step=4",
                              "algorithm.beta=0.04", "algorithm.ref_reset_every=1", "algorithm.ref_mix=0.25",
                              "optim.lr=0.05", "rewards={test_char_hash: 1.0}"))
    before = {k: v.clone() for k, v in t.ref.state_dict().items()}
    t.step()
    policy, moved = t.model.state_dict(), 0
    for name, r in t.ref.state_dict().items():
        torch.testing.assert_close(r, 0.75 * before[name] + 0.25 * policy[name], rtol=1e-6, atol=1e-7)
        moved += not torch.equal(r, policy[name])
    assert moved  # not replaced
    line = error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "algorithm.ref_mix=0.5")
    assert line == ("ponder: error: config algorithm.ref_mix applies at each reference reset: set algorithm.beta above 0 "
                    "and algorithm.ref_reset_every too, or leave ref_mix at 1")


def test_an_entropy_bonus_raises_the_entropy_where_the_rewards_teach_nothing(smoke_cfg, tmp_path):
    """algorithm.entropy_coef: with one reward for every answer each advantage is 0, so GRPO's own term moves
    nothing (the samples are skipped); the bonus alone reaches them and spreads tiny-base's sharp distribution."""
    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer

    def trainer(coef):
        return GRPOTrainer(load_config("recipes/zero-tiny.yaml", [
            f"output_dir={tmp_path}", f"name=ent-{coef}", "rewards={test_constant: 1.0}", "eval.tasks=[]",
            "rollout.prompts_per_step=4", "rollout.max_new_tokens=64", "optim.lr=0.003", "train.save_every=0",
            f"algorithm.entropy_coef={coef}"]))

    still = trainer(0)
    before = [p.detach().clone() for p in still.model.parameters()]
    assert still.step()["grad_norm"] == 0 and all(torch.equal(p, b) for p, b in zip(still.model.parameters(), before))
    t = trainer(0.5)
    entropy = [t.step()["entropy"] for _ in range(5)]  # 0.18, 0.18, 0.26, 1.06, 2.41 on the two-core machine
    assert entropy[0] < 0.3 and entropy[-1] > 3 * entropy[0], entropy
