"""The update's linear layers through the rollout copy's bf16 matrices (ponder.rl.copy_linear), on the CPU: where
the fused float32-output product is missing, the weight gradient is the bf16 product cast and added, as autocast's
path computes it, so the two paths must agree to the last bit or nearly; the GPU's fused product is checked in
tests/test_cuda_paths.py."""

import pytest
import torch

from ponder.rl import copy_linear, packed
from ponder.rl.copy_linear import copies_for, linear_from_copy, stacked
from ponder.rl.trainer import GRPOTrainer


def layers(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    mods = [torch.nn.Linear(16, n, bias=bias) for n in (12, 4, 4)]
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
            if bias:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return mods


def test_gradients_match_autocast_over_float32_weights_across_micro_batches():
    """Three micro-batches accumulate: q|k|v-like layers joined, against F.linear under bf16 autocast over the
    float32 weights (the path it replaces). Inputs and weight gradients agree; a slice of the joined output's
    gradient sent to the wrong layer, or a micro-batch's share dropped, would not."""
    ref, mine = layers(), layers()
    buf = torch.cat([m.weight.detach() for m in mine]).to(torch.bfloat16)  # the engine's joined copy
    bias = torch.cat([m.bias.detach() for m in mine]).to(torch.bfloat16)
    copies, at = {}, 0
    for m in mine:
        n = m.out_features
        copies[id(m.weight)], copies[id(m.bias)] = buf[at : at + n], bias[at : at + n]
        at += n
    w, b = copies_for(mine, copies)
    assert w.data_ptr() == buf.data_ptr() and w.shape == (20, 16)  # consecutive rows: a view, no copy
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn((n, 16), generator=g) for n in (5, 9, 3)]
    weights = [torch.randn((n, 20), generator=g) for n in (5, 9, 3)]
    grads_in = []
    for x, wt in zip(xs, weights):
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yr = torch.nn.functional.linear(xr, torch.cat([m.weight for m in ref]), torch.cat([m.bias for m in ref]))
            ym = linear_from_copy(xm, mine, w, b)
        assert ym.dtype == yr.dtype == torch.bfloat16 and torch.equal(ym, yr)
        (yr.float() * wt).sum().backward()
        (ym.float() * wt).sum().backward()
        grads_in.append((xr.grad, xm.grad))
    for gr, gm in grads_in:
        assert gm.dtype == torch.float32 and torch.equal(gr, gm)
    # the biases' gradients: autocast sums each micro-batch's rows in bf16; here in float32, near the exact sum
    exact = sum(wt.to(torch.bfloat16).double().sum(0) for wt in weights).split([12, 4, 4])
    for r, m, e in zip(ref, mine, exact):
        assert m.weight.grad.dtype == torch.float32
        torch.testing.assert_close(m.weight.grad, r.weight.grad, rtol=0, atol=1e-6)
        assert (m.bias.grad.double() - e).abs().max() < 1e-5 < (r.bias.grad.double() - e).abs().max()


def test_a_weight_trains_when_its_input_needs_no_gradient():
    """An input that needs no gradient (a frozen embedding's rows) beside a master that trains: the output still
    has a backward, and the weight its gradient."""
    mods = layers(bias=False)[:1]
    w16 = mods[0].weight.detach().to(torch.bfloat16)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_from_copy(x, mods, w16, None)
    y.float().sum().backward()
    torch.testing.assert_close(mods[0].weight.grad, torch.ones(12, 5) @ x.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


def test_a_layer_without_a_copy_or_a_wrapper_takes_autocasts_path():
    mods = layers(bias=False)
    copies = {id(m.weight): m.weight.detach().to(torch.bfloat16) for m in mods[:2]}
    assert copies_for(mods, copies) is None and copies_for(mods[:2], copies) is not None
    assert copies_for(mods[:2], None) is None
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    joined = stacked([a, b])  # not rows of one buffer: a copy
    assert joined.data_ptr() != a.data_ptr() and torch.equal(joined, torch.cat([a, b]))


@pytest.mark.parametrize("extra", [(), ("algorithm.mu=2",)], ids=["mu1", "mu2"])
def test_the_trainer_updates_through_the_copy_as_through_autocast(smoke_cfg, monkeypatch, extra):
    """`train.precision=mixed` with the fast engine's bf16 copy on the CPU: one GRPO step over several micro-batches,
    through the copies and (the engine offering none) through autocast's casts. The copy's path must be the one
    taken, and the gradients of every optimizer step agree (biases: within bf16's rounding of autocast's sums). With
    mu = 2 the second step's gradients come from weights the first step moved: a copy not refreshed between them
    would give the first step's weights' gradients."""
    calls, heads = [], []
    real = copy_linear._FromCopy.apply
    monkeypatch.setattr(copy_linear._FromCopy, "apply", lambda *a: calls.append(1) or real(*a))
    real_head = packed.fused_head_logprobs
    monkeypatch.setattr(packed, "fused_head_logprobs", lambda *a, **k: heads.append(k["weight_copy"]) or real_head(*a, **k))
    cfg = ("rollout.engine=fast", "rollout.engine_options={dtype: bf16}", "train.precision=mixed", "optim.lr=0.01",
           "rewards={test_char_hash: 1.0}", "rollout.prompts_per_step=4", "rollout.group_size=4",
           "rollout.max_new_tokens=12", "optim.token_budget=80", "train.steps=1", *extra)
    grads = {"copy": [], "autocast": []}
    for name in grads:
        t = GRPOTrainer(smoke_cfg(f"name={name}", *cfg))
        if name == "autocast":
            t.policy_pass.copies = None
        t.optimizer.register_step_pre_hook(lambda opt, args, kwargs, _t=t, _n=name: grads[_n].append(
            {k: p.grad.clone() for k, p in _t.model.named_parameters()}))
        t.step()
        assert len(calls) > (3 * 4 * 2 if name == "copy" else -1) and (name == "copy") == bool(calls)
        # the head (tied to the embedding here) computes from the engine's bf16 head as well
        head = t.model.get_output_embeddings().weight
        assert head is t.model.get_input_embeddings().weight and heads
        if name == "copy":
            assert all(c is t.engine.rollout_matrices()[id(head)] and c.dtype == torch.bfloat16 for c in heads)
        else:
            assert heads == [None] * len(heads)
        calls.clear(), heads.clear()
    assert len(grads["copy"]) == len(grads["autocast"]) == (2 if extra else 1)
    for mine, ref in zip(grads["copy"], grads["autocast"]):
        assert mine.keys() == ref.keys()
        for name, g in mine.items():
            scale = ref[name].abs().max().item()
            assert scale > 0, name
            torch.testing.assert_close(g, ref[name], rtol=0, atol=2e-2 * scale if "bias" in name else 1e-6, msg=name)
