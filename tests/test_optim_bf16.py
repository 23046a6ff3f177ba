"""bf16 weights keep the update's precision with KahanAdamW (ponder.optim); float32 weights keep torch's AdamW."""

import copy

import pytest
import torch

from ponder.config import OptimConfig
from ponder.optim import KahanAdamW, make_optimizer


def constant_gradient(dtype, cls, steps=100):
    """Adam with a constant gradient moves by exactly lr a step: 1.0 -> 0.9 after 100 steps of lr 1e-3."""
    p = torch.nn.Parameter(torch.ones((), dtype=dtype))
    opt = cls([p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        opt.step()
    return p, opt


def test_kahan_keeps_updates_that_bf16_rounding_drops():
    fp32, _ = constant_gradient(torch.float32, torch.optim.AdamW)
    assert fp32.item() == pytest.approx(0.9, abs=1e-5)
    # bf16 spacing below 1.0 is 2^-8: a step of 1e-3 rounds back to 1.0, every time
    naive, _ = constant_gradient(torch.bfloat16, torch.optim.AdamW)
    assert naive.item() == 1.0
    kahan, opt = constant_gradient(torch.bfloat16, KahanAdamW)
    assert kahan.item() == 0.8984375  # 230/256: the bf16 value nearest to 0.9
    # weight + compensation is the float32 value within a tenth of one step (the bf16 compensation rounds too)
    assert (kahan.float() + opt.state[kahan]["compensation"].float()).item() == pytest.approx(0.9, abs=1e-4)


def test_kahan_on_float32_is_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ta, tk = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1), KahanAdamW([b], lr=1e-2, weight_decay=0.1)
    for i in range(20):
        g = torch.randn(50, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = g.clone(), g.clone()
        ta.step()
        tk.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-5)  # a float32 ulp or so: the compensation also keeps fp32 rounding


def test_adamws_state_loads_into_kahan_and_continues_as_adamw():
    """A run resumed with --allow-changes into optim.optimizer=adamw_kahan (or train.precision=bf16) loads AdamW's
    state, which has no compensation: its first step was a KeyError, and config.yaml had recorded the change, so every
    resume after failed alike."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ta = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    grads = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    for g in grads[:5]:
        a.grad = g.clone()
        ta.step()
    b.data.copy_(a.detach())
    tk = KahanAdamW([b], lr=1e-2, weight_decay=0.1)
    tk.load_state_dict(copy.deepcopy(ta.state_dict()))
    assert torch.equal(tk.state[b]["compensation"], torch.zeros(50))
    for g in grads[5:]:
        a.grad, b.grad = g.clone(), g.clone()
        ta.step()
        tk.step()
    assert torch.allclose(a, b, rtol=0, atol=1e-5)


def regression(dtype, cls, steps=200):
    """A small MLP fitted with lr 1e-4 (updates far below the weights' bf16 spacing): its final weights."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    start = torch.cat([p.detach().flatten() for p in net.parameters()]).clone()
    net = net.to(dtype)
    opt = cls(net.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 32, generator=g)
        ((net(x.to(dtype)).float() - 0.5 * x[:, :1]) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().float().flatten() for p in net.parameters()]), start


def test_bf16_training_tracks_float32_with_kahan_not_without():
    ref, start = regression(torch.float32, torch.optim.AdamW)
    moved = (ref - start).norm()
    naive, _ = regression(torch.bfloat16, torch.optim.AdamW)
    kahan, _ = regression(torch.bfloat16, KahanAdamW)
    # measured: naive 0.91 of the float32 move away from it (it makes half the move), Kahan 0.03
    assert (naive - ref).norm() / moved > 0.5
    assert (kahan - ref).norm() / moved < 0.1


def test_state_dict_round_trip_keeps_float32_moments():
    p, opt = constant_gradient(torch.bfloat16, KahanAdamW, steps=3)
    q = torch.nn.Parameter(p.detach().clone())
    other = KahanAdamW([q], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for k in ("exp_avg", "exp_avg_sq", "compensation", "step"):
        assert other.state[q][k].dtype == opt.state[p][k].dtype and torch.equal(other.state[q][k], opt.state[p][k]), k
    assert other.state[q]["exp_avg"].dtype == torch.float32


def test_auto_picks_by_the_weights_dtype():
    net = torch.nn.Linear(4, 4)
    assert type(make_optimizer(net, OptimConfig(), 1)[0]) is torch.optim.AdamW  # float32: unchanged
    assert type(make_optimizer(net.to(torch.bfloat16), OptimConfig(), 1)[0]) is KahanAdamW
    assert type(make_optimizer(net, OptimConfig(optimizer="adamw"), 1)[0]) is torch.optim.AdamW


def bf16_moments(params, **kw):
    return KahanAdamW(params, **kw, moment_dtype=torch.bfloat16)


def test_bf16_moments_track_float32_on_the_regression():
    ref, start = regression(torch.float32, torch.optim.AdamW)
    moved = (ref - start).norm()
    full, _ = regression(torch.bfloat16, KahanAdamW)
    half, _ = regression(torch.bfloat16, bf16_moments)
    # measured: 0.0307 of the float32 move with float32 moments, 0.0316 with bf16 ones
    assert (full - ref).norm() / moved < 0.035
    assert (half - ref).norm() / moved < 0.035
    assert not torch.equal(half, full)  # the option did something


def test_bf16_second_moment_decays_as_float32_would():
    """After one gradient of 1, v decays by 0.999 a step: a change below half a bf16 spacing (2^-9 of the
    value), so rounding to nearest would keep v at its first value for ever. Stochastic rounding decays it."""
    p = torch.nn.Parameter(torch.zeros(10000, dtype=torch.bfloat16))
    opt = bf16_moments([p], lr=0.0, betas=(0.9, 0.999), weight_decay=0.0)
    p.grad = torch.ones_like(p)
    opt.step()
    for _ in range(1000):
        p.grad = torch.zeros_like(p)
        opt.step()
    v = opt.state[p]["exp_avg_sq"]
    assert v.dtype == torch.bfloat16 and opt.state[p]["exp_avg"].dtype == torch.bfloat16
    # measured: mean 3.67657e-4 against 3.67695e-4 (round to nearest: 9.99e-4, its first value)
    assert v.float().mean().item() == pytest.approx(1e-3 * 0.999**1000, rel=2e-3)


def test_stochastic_rounding_is_unbiased_and_lands_on_neighbours():
    from ponder.optim import _round_stochastic

    x = torch.full((100000,), 1 + 2**-9)  # a quarter of the bf16 spacing (2^-7) above 1
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _round_stochastic(out, x, torch.Generator().manual_seed(0))
    assert set(out.float().unique().tolist()) == {1.0, 1 + 2**-7}
    # the mean of 100,000 draws has a standard deviation of 1.1e-5 (measured off by 2.2e-5); nearest: 1.0 always
    assert out.float().mean().item() == pytest.approx(1 + 2**-9, abs=5e-5)
    _round_stochastic(out, -x, torch.Generator().manual_seed(0))  # negative values: the same in magnitude
    assert out.float().mean().item() == pytest.approx(-(1 + 2**-9), abs=5e-5)


def test_state_dict_round_trip_keeps_bf16_moments_and_continues_exactly():
    def run(steps, resume_from=None):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 64, dtype=torch.bfloat16))
        opt = bf16_moments([p], lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0)
        if resume_from is not None:
            p.data.copy_(resume_from[0])
            opt.load_state_dict(copy.deepcopy(resume_from[1]))
        for i in range(steps):
            p.grad = torch.sin(torch.arange(64.0) * (i + 1)).to(torch.bfloat16)
            opt.step()
        return p, opt

    whole, whole_opt = run(6)
    p, opt = run(3)
    saved = (p.detach().clone(), opt.state_dict())
    p2, opt2 = run(0, saved)
    for k in ("exp_avg", "exp_avg_sq", "compensation"):
        assert opt2.state[p2][k].dtype == opt.state[p][k].dtype and torch.equal(opt2.state[p2][k], opt.state[p][k]), k
    assert opt2.state[p2]["exp_avg"].dtype == torch.bfloat16
    # the step counter seeds the rounding: three more steps after the resume give the six-step run's weights
    # (the resumed run's first three steps are not repeated, so the test continues from step 3 by hand)
    for i in range(3, 6):
        p2.grad = torch.sin(torch.arange(64.0) * (i + 1)).to(torch.bfloat16)
        opt2.step()
    assert torch.equal(p2, whole)
    for k in ("exp_avg", "exp_avg_sq", "compensation"):
        assert torch.equal(opt2.state[p2][k], whole_opt.state[whole][k]), k


def test_bf16_moments_need_the_kahan_optimizer():
    from ponder.errors import UserError

    with pytest.raises(UserError) as e:
        make_optimizer(torch.nn.Linear(4, 4), OptimConfig(moment_dtype="bf16"), 1)
    assert str(e.value) == ("optim.moment_dtype=bf16 is an option of adamw_kahan, and this run's optimizer is adamw; use "
                            "train.precision=bf16 (or optim.optimizer=adamw_kahan), or leave moment_dtype at auto")
    # adamw named by the user: bf16 weights would not change it, so the line does not offer them
    with pytest.raises(UserError) as e:
        make_optimizer(torch.nn.Linear(4, 4).to(torch.bfloat16), OptimConfig(optimizer="adamw", moment_dtype="bf16"), 1)
    assert str(e.value).endswith("this run's optimizer is adamw; use optim.optimizer=adamw_kahan, or leave moment_dtype at auto")
    opt = make_optimizer(torch.nn.Linear(4, 4).to(torch.bfloat16), OptimConfig(moment_dtype="bf16"), 1)[0]
    assert type(opt) is KahanAdamW and opt.moment_dtype == torch.bfloat16


def test_a_skipped_first_update_advances_the_schedule_without_torchs_warning():
    """A run whose first step skips its update (every sample masked) still moves the schedule on a step, and torch's
    'lr_scheduler.step() before optimizer.step()' warning is not printed to the user."""
    import warnings

    model = torch.nn.Linear(2, 2)
    o = OptimConfig(lr=1e-3, warmup_steps=4)
    opt, sched = make_optimizer(model, o, total_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)  # warm-up step 0 of 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()  # no optimizer.step() before it
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 / 4)


SHARDED_STEP = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from ponder.optim import KahanAdamW

dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
torch.manual_seed(0)
plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).to(torch.bfloat16)
sharded = fully_shard(__import__("copy").deepcopy(plain))
x = torch.randn(2, 8, dtype=torch.bfloat16)
for m in (plain, sharded):
    opt = KahanAdamW(list(m.parameters()), lr=1e-2, moment_dtype=torch.bfloat16)
    for _ in range(3):
        m(x).float().square().sum().backward()
        opt.step()
        opt.zero_grad()
for a, b in zip(plain.parameters(), sharded.parameters()):
    assert torch.equal(a, b.full_tensor()), (a, b)
dist.destroy_process_group()
print("ok")
"""


def test_bf16_moments_step_sharded_parameters_as_plain_ones():
    """FSDP2 parameters are DTensors: the stochastic rounding of the moments added a noise tensor of the parameter's
    global shape to the shard (`mixed torch.Tensor and DTensor`), so sharded bf16 runs with bf16 moments (what
    train.precision auto picks for big models) stopped at their first optimizer step. One process, gloo."""
    import os
    import subprocess
    import sys

    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", SHARDED_STEP], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_a_decaying_schedule_ends_at_min_lr():
    """cosine and linear decayed to 0; optim.min_lr is where they end (open-r1's cosine_with_min_lr)."""
    from ponder.config import OptimConfig
    from ponder.optim import lr_factor

    o = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="cosine", warmup_steps=2)
    assert [round(lr_factor(s, o, 12), 6) for s in (0, 1, 2, 7, 12, 20)] == [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    o = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="linear")
    assert [round(lr_factor(s, o, 10), 6) for s in (0, 5, 10)] == [1.0, 0.55, 0.1]
    assert lr_factor(5, OptimConfig(lr=1e-3, schedule="cosine"), 10) == 0.5  # min_lr 0: as before
    assert lr_factor(3, OptimConfig(lr=0.0, schedule="linear"), 10) == 0.7  # frozen weights: no division by 0


def test_min_lr_above_lr_is_one_line(error_line, tmp_path):
    assert error_line("train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "optim.lr=1e-5",
                      "optim.min_lr=1e-4") == "ponder: error: config optim.min_lr must be between 0 and optim.lr (1e-05); got 0.0001"
