"""The trainer's GPU speed path, exercised on the CPU: rollouts from a copy of the weights in the rollout
dtype that follows every optimizer step, and the micro-batch token budget planned from device memory."""

import re
from types import SimpleNamespace

import pytest
import torch

from ponder.errors import UserError
from ponder.models import checkpointing_on, load
from ponder.rl import memory_plan
from ponder.rl.trainer import GRPOTrainer
from ponder.rollout import SamplingParams
from ponder.rollout.fast import FastEngine

PROMPTS = ["7", "12+3=", "abc", "the answer is"]


def greedy(engine, tok, n=12):
    out = engine.generate([tok(p).input_ids for p in PROMPTS], SamplingParams(n=1, temperature=0.0, max_tokens=n))
    return [o[0].token_ids for o in out]


@pytest.mark.parametrize("optimizer", ["default", "fused"])
def test_bf16_rollout_copy_follows_each_optimizer_step(smoke_cfg, optimizer, monkeypatch):
    if optimizer == "fused":  # the CUDA default, whose step bumps no version counter: the step hook must see it
        real = torch.optim.AdamW
        monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: real(*a, **{**k, "fused": True}))
    cfg = smoke_cfg("name=copy", "rollout.engine=fast", "rollout.engine_options={dtype: bf16}", "optim.lr=0.05",
                    "rewards={test_share_of_sevens: 1.0}",  # registered in conftest.py
                    "rollout.max_new_tokens=8", "train.steps=2")
    t = GRPOTrainer(cfg)
    tok = t.tokenizer
    before = greedy(t.engine, tok)
    assert t.engine.copy is not None and t.engine.copy.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # the update keeps float32 masters
    shadow = t.engine.copy.shadow  # embeddings and norms shared; the matrices (the tied head's too) copied
    assert shadow.get_input_embeddings().weight is t.model.get_input_embeddings().weight
    assert shadow.get_output_embeddings().weight.dtype == torch.bfloat16
    assert shadow.model.norm.weight is t.model.model.norm.weight
    for step in (1, 2):
        t.step()
        t.save()
        after = greedy(t.engine, tok)
        loaded, _ = load(str(t.ckpt_dir / f"step-{step}"))
        assert after == greedy(FastEngine(loaded, tok, dtype="bf16"), tok), f"step {step}: the copy is stale"
        assert after != before, f"step {step}: the update should change greedy answers (lr 0.05)"
        before = after


def test_copy_made_only_when_the_dtype_differs_and_unknown_dtype_is_named():
    from ponder.errors import UserError

    model, tok = load("tiny-random", seed=1)
    eng = FastEngine(model, tok)  # auto on CPU: the model's own float32 weights, no copy
    greedy(eng, tok, 2)
    assert eng.copy is None
    with pytest.raises(UserError, match="dtype must be one of auto, bf16, fp16, fp32"):
        FastEngine(model, tok, dtype="bfloat8")


def stream_tokens(batch) -> int:
    """Tokens of a packed micro-batch: each distinct prompt once, each completion but its last token."""
    return sum(len(p) for p in {tuple(s.prompt_ids) for s in batch}) + sum(len(s.completion_ids) - 1 for s in batch)


def test_budget_for_hand_values():
    mib = 2**20
    # 10 GiB free, 1 MiB a token: 0.9 * 10240 = 9216 tokens, a multiple of 1024
    assert memory_plan.budget_for(mib, 10 * 2**30) == (9216, False)
    assert memory_plan.budget_for(mib, 100 * 2**30) == (memory_plan.CAP, True)  # capped
    # fewer than the floor fit: those (a floor above them ran out of memory), at least one
    assert memory_plan.budget_for(mib, 500 * 2**20) == (450, False)
    assert memory_plan.budget_for(mib, 2**20) == (1, False)
    assert memory_plan.budget_for(0.5 * mib, 3 * 2**30) == (5120, False)  # 0.9 * 6144 = 5529 -> 5120


def test_auto_budget_is_printed_and_no_micro_batch_exceeds_it(smoke_cfg, monkeypatch, capsys):
    # as if measured: 64 KiB a token, and 80 MiB a pass whatever its size (as autocast's casts of frozen weights)
    per_token, fixed, free = 64 * 2**10, 80 * 2**20, 300 * 2**20
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    probes = []
    monkeypatch.setattr(memory_plan, "_peak", lambda pp, model, device, batch: probes.append(batch) or
                        per_token * stream_tokens(batch) + fixed)
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: free)
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 500 * 2**20)  # 4% held back: 20 MiB
    cfg = smoke_cfg("name=budget", "rollout.max_new_tokens=64", "rollout.prompts_per_step=16", "train.steps=2",
                    "rewards={test_char_hash: 1.0}")  # rewards that differ within groups: every sample is updated
    assert cfg.optim.token_budget is None  # the default: planned
    t = GRPOTrainer(cfg)
    seen = []
    real = t.policy_pass.micro_batches
    t.policy_pass.micro_batches = lambda samples, budget: seen.append(real(samples, budget)) or seen[-1]
    m = t.step()
    printed = int(re.search(r"optim.token_budget: ([\d,]+) tokens", capsys.readouterr().err).group(1).replace(",", ""))
    grads = sum(p.numel() * 4 for p in t.model.parameters())
    to_come = 3 * grads  # float32 gradients and two AdamW moments
    # the probe's fixed part counts the gradients its backward made: those are in to_come already
    expect = int((free - to_come - (fixed - grads) - 20 * 2**20) * 0.9 / per_token) // 1024 * 1024
    assert fixed > grads and expect == 2048  # 4096 if the fixed part were forgotten, 3072 without the reserve
    assert printed == expect == m["token_budget"] == t.token_budget() and len(probes) == 3
    stream = [stream_tokens(mb) for batches in seen for mb in batches]
    assert max(stream) <= printed and len(stream) > 1  # the budget split the step
    t.step()
    assert t.token_budget() == printed  # planned once


def test_budget_is_planned_again_when_the_engines_cache_has_grown(smoke_cfg, monkeypatch, capsys):
    """The KV pool doubles as answers grow, into memory the first plan counted free for the update's micro-batches:
    planned once, a later update would run out of memory. The plan is made again after the cache grows, not else."""
    per_token, free = 64 * 2**10, {"bytes": 600 * 2**20}
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    probes = []
    monkeypatch.setattr(memory_plan, "_peak", lambda pp, model, device, batch: probes.append(1) or per_token * stream_tokens(batch))
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: free["bytes"])
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 0)
    t = GRPOTrainer(smoke_cfg("name=regrow", "rollout.max_new_tokens=16", "train.steps=3"))
    cache = {"bytes": 10 * 2**20}
    monkeypatch.setattr(t.engine, "cache_bytes", lambda: cache["bytes"])
    t.step()
    first = t.token_budget()
    cache["bytes"], free["bytes"] = 300 * 2**20, 310 * 2**20  # the pool took 290 MiB of what was free
    t.step()
    second = t.token_budget()
    t.step()
    budgets = [int(b.replace(",", "")) for b in re.findall(r"optim.token_budget: ([\d,]+) tokens", capsys.readouterr().err)]
    assert budgets == [first, second] and second < first and len(probes) == 6  # two plans, each three probes


@pytest.mark.parametrize("first", ["algorithm.beta=0.04", "algorithm.mu=2"])
def test_the_plans_probe_runs_a_backward_when_the_first_pass_scores_without_gradients(smoke_cfg, monkeypatch, first):
    """The budget is planned at the first micro-batch; with beta > 0 (reference log-probs) or mu > 1 (old log-probs)
    that is a no-grad scoring pass, and the probe's backward raised there: on one GPU every such run stopped in its
    first step. The probe runs for real here; only the CUDA memory counters are stood in for."""
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: 2**30)
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2**20 * len(synced))
    synced = []  # at each of the probe's waits: how many parameters hold a gradient other than zero (after its backward: all)
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: synced.append(sum(p.grad is not None and bool(p.grad.any()) for p in t.model.parameters())))
    t = GRPOTrainer(smoke_cfg("name=probe", first, "train.steps=1"))
    t.step()
    n = len(list(t.model.parameters()))
    assert synced == [0, n] * 3  # three probes, each a forward and a backward, and no gradient left behind


def test_a_token_is_costed_at_the_longest_rows_when_attention_grows_with_them(monkeypatch):
    """The padded pass (float32 on CUDA, or no varlen kernel) holds a queries x keys tensor a segment, so a token
    of a 4,096-token answer costs more than one of the probe's 240-token rows: costed at the probe's rows alone,
    long rollouts got a budget that did not fit. A stand-in pass costs 3 MiB + stream tokens x (40 KiB + 16 bytes
    x its rows' length with their prompt); the three probes recover those figures, and the plan costs a token at the longest rows."""
    a, q, fixed = 40 * 2**10, 16.0, 3 * 2**20
    row = lambda batch: len(batch[0].prompt_ids) + len(batch[0].completion_ids) - 1  # noqa: E731  (the keys a query sees)
    monkeypatch.setattr(memory_plan, "_peak", lambda pp, model, device, b: fixed + stream_tokens(b) * (a + q * row(b)))
    cost = memory_plan.measure_cost(memory_plan.policy_probe(SimpleNamespace(scratch=None), None, None, vocab=50))
    assert cost.per_token == pytest.approx(a) and cost.per_token_row == pytest.approx(q) and cost.fixed == pytest.approx(fixed)
    assert cost.at(4096) == pytest.approx(40 * 2**10 + 16 * 4096)  # 104 KiB: 2.4x what a token of a 240-token row costs
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: 2**30)
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 0)
    monkeypatch.setattr(memory_plan, "state_to_come", lambda model, optimizer, device=None: 0)
    plan = memory_plan.plan(SimpleNamespace(scratch=None), None, None, None, 50, print_line=False, longest=4096)
    assert plan.per_token == pytest.approx(cost.at(4096))
    assert plan.budget == int((2**30 - fixed) * 0.9 / cost.at(4096)) // 1024 * 1024 == 8192  # 21,504 at 240-token rows


def test_fixed_budget_is_used_as_given(smoke_cfg):
    t = GRPOTrainer(smoke_cfg("name=fixed", "optim.token_budget=4096"))
    assert t.token_budget() == 4096
    assert GRPOTrainer(smoke_cfg("name=cpu")).token_budget() == memory_plan.CPU_BUDGET  # no device memory to read


def stand_in_memory(monkeypatch, holder: dict, free: int) -> list:
    """Device memory as if read: `free` bytes once the gradients and AdamW state of holder["t"] are counted; a
    probe's peak 64 KiB a stream token without checkpointing, 8 KiB with it. Returns the list each probe adds to."""
    probes = []
    cost = lambda model: (8 if checkpointing_on(model) else 64) * 2**10  # noqa: E731
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    monkeypatch.setattr(memory_plan, "_peak", lambda pp, model, device, batch: probes.append(1) or cost(model) * stream_tokens(batch))
    monkeypatch.setattr(memory_plan, "free_bytes",
                        lambda device: memory_plan.state_to_come(holder["t"].model, holder["t"].optimizer) + free)
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 0)
    return probes


@pytest.mark.parametrize("setting", ["auto", "false"])
def test_plan_turns_on_activation_checkpointing_when_one_sample_would_not_fit(smoke_cfg, monkeypatch, capsys, setting):
    """64 KiB a token without checkpointing, 8 KiB with it; 2 MiB free once gradients and AdamW state are
    counted: one full-length sample (its prompt and 64 new tokens, over 32 tokens) needs over 2 MiB * 0.9."""
    holder = {}
    stand_in_memory(monkeypatch, holder, 2 * 2**20)
    cfg = smoke_cfg("name=ckpt", "rollout.max_new_tokens=64", f"model.gradient_checkpointing={setting}")
    holder["t"] = t = GRPOTrainer(cfg)
    assert not checkpointing_on(t.model)
    if setting == "false":  # refused: the plan leaves it off, and the longest sample would not run: one line, no step
        with pytest.raises(UserError, match=r"the longest row \(\d+ tokens\) needs .* without activation checkpointing "
                                            r"\(model.gradient_checkpointing: auto turns it on when it helps\).*lower "
                                            r"rollout.max_new_tokens, or train adapters only"):
            t.step()
        assert not checkpointing_on(t.model) and t.step_no == 0
        return
    t.step()
    err = capsys.readouterr().err
    # 2 MiB x 0.9 / 64 KiB = 28 tokens; checkpointed, / 8 KiB = 230
    assert checkpointing_on(t.model) and "activation checkpointing on: without it a micro-batch could hold 28 tokens" in err
    assert "optim.token_budget: 230 tokens a micro-batch" in err


def test_a_prompt_longer_than_any_the_plan_saw_makes_it_again(smoke_cfg, monkeypatch, capsys):
    """The plan costs the run's longest rows, and the first update knows only the first step's prompts. A later
    prompt 10x as long, whose samples would not fit without checkpointing, is planned for when it comes (not a
    step later, when its update has run out of memory); prompts no longer than the planned one plan nothing."""
    holder = {}
    # 4 MiB usable once the state is counted: 3.6 MiB / 64 KiB = 57 tokens a micro-batch, more than a first step's
    # sample (a prompt of 21-24 tokens and 16 new) and less than a 240-token prompt's
    probes = stand_in_memory(monkeypatch, holder, 4 * 2**20)
    holder["t"] = t = GRPOTrainer(smoke_cfg("name=longer", "rollout.max_new_tokens=16", "rollout.prompts_per_step=4"))
    monkeypatch.setattr(t.engine, "cache_bytes", lambda: 2**20)  # a pool with room to spare: it never grows
    draw = t.sampler.next
    t.step()
    assert not checkpointing_on(t.model) and len(probes) == 3
    t.sampler.next = lambda k: [dict(ex, prompt=ex["prompt"] * (10 if i == 0 else 1)) for i, ex in enumerate(draw(k))]
    t.step()
    err = capsys.readouterr().err
    assert checkpointing_on(t.model) and len(probes) == 9  # planned again (3 probes), and checkpointed (3 more)
    assert "activation checkpointing on" in err
    t.sampler.next = draw
    t.step()
    assert len(probes) == 9  # shorter prompts: the plan stands


def test_the_first_plan_counts_the_datas_longest_prompt(smoke_cfg, monkeypatch, capsys):
    """One prompt of the data 10x as long as the rest, not drawn in the first step: the first plan already costs its
    samples and checkpoints for them (a prompt that could not fit even checkpointed would stop the run there, not
    when it is drawn hours in), and drawing it later plans nothing again. Memory as in the test above."""
    holder = {}
    probes = stand_in_memory(monkeypatch, holder, 4 * 2**20)
    holder["t"] = t = GRPOTrainer(smoke_cfg("name=data-longest", "rollout.max_new_tokens=16", "rollout.prompts_per_step=4"))
    monkeypatch.setattr(t.engine, "cache_bytes", lambda: 2**20)
    first = t.sampler.next(4)
    t.sampler.position = 0
    long = next(ex for ex in t.examples if ex not in first)
    long["prompt"] *= 10
    t.step()
    err = capsys.readouterr().err
    longest = len(t._encode(long)) + 16
    assert checkpointing_on(t.model) and len(probes) == 6
    assert f"less than the longest row's {longest:,}" in err
    t.sampler.next = lambda k: [long] * k
    t.step()
    assert len(probes) == 6  # its samples came: planned for already


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_pass_whose_fixed_part_leaves_no_room_stops_the_run_in_one_line(smoke_cfg, monkeypatch, lora):
    """2 GiB free once gradients and AdamW state are counted (a device of 80), and the probe finds that a pass holds
    8 GiB whatever its size (as LoRA's bf16 casts of a frozen 7B base do): no micro-batch fits. One line with the
    figures and GRPO's ways out, before the update (on a GPU it ran out of memory in the optimizer's step); a LoRA run
    is not told to train adapters."""
    holder, gib = {}, 2**30
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    monkeypatch.setattr(memory_plan, "_peak", lambda pp, model, device, batch: 8 * gib + 2**10 * stream_tokens(batch))
    monkeypatch.setattr(memory_plan, "free_bytes",
                        lambda device: memory_plan.state_to_come(holder["t"].model, holder["t"].optimizer) + 2 * gib)
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 0)
    holder["t"] = t = GRPOTrainer(smoke_cfg("name=full", *(["model.lora={r: 4, alpha: 8}"] if lora else [])))
    with pytest.raises(UserError) as e:
        t.step()
    ways = ("keep the optimizer state in CPU memory (train.sharding=fsdp train.offload=true), or shard over more GPUs "
            "(torchrun --nproc-per-node N)")
    assert str(e.value).endswith("and a margin leave -6.0 GiB for activations; "
                                 + ("" if lora else "train adapters only (model.lora: {r: 16, alpha: 32}), ") + ways)
    assert "(8.0 GiB)" in str(e.value)
    assert t.step_no == 0


def test_the_plan_makes_the_optimizer_state_after_its_probes_and_before_the_update(smoke_cfg, monkeypatch):
    """bf16 weights train with KahanAdamW, whose state (two moments and a compensation a parameter) the plan makes
    right after its probes: made in the first optimizer step, among the update's freed activations, a 7B model's
    last moment found no block to fit in. Its steps give the weights of the state made lazily."""
    from ponder.optim import KahanAdamW

    passes, made = [], []
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    monkeypatch.setattr(memory_plan, "_peak", lambda pp, model, device, batch: passes.append(1) or 2**10 * stream_tokens(batch))
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: 2**30)
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 0)
    real = KahanAdamW.make_state
    monkeypatch.setattr(KahanAdamW, "make_state", lambda self: made.append((len(passes), len(self.state))) or real(self))
    t = GRPOTrainer(smoke_cfg("name=state", "train.precision=bf16", "train.skip_zero_advantage=false"))
    assert type(t.optimizer) is KahanAdamW and not t.optimizer.state
    trainable = [p for p in t.model.parameters() if p.requires_grad]
    learn = t.learn
    t.learn = lambda samples: (t.token_budget(), made.append(len(t.optimizer.state)), learn(samples))[2]
    t.step()
    assert made == [(3, 0), len(trainable)]  # after the three probes, before the update: every parameter's state
    for p in trainable:
        st = t.optimizer.state[p]
        assert st["exp_avg"].dtype == t.optimizer.moment_dtype and st["compensation"].shape == p.shape and st["step"] == 1
    # the same weights as the state made in the first step
    p0 = [p.detach().clone() for p in trainable]
    grads = [torch.randn_like(p) for p in trainable]
    copies = [torch.nn.Parameter(p.clone()) for p in p0]
    eager = KahanAdamW(copies, lr=1e-3, moment_dtype=torch.bfloat16)
    lazy = KahanAdamW([torch.nn.Parameter(p.clone()) for p in p0], lr=1e-3, moment_dtype=torch.bfloat16)
    eager.make_state()
    for opt in (eager, lazy):
        for q, g in zip(opt.param_groups[0]["params"], grads):
            q.grad = g.clone()
        opt.step()
    for a, b in zip(eager.param_groups[0]["params"], lazy.param_groups[0]["params"]):
        assert torch.equal(a, b)


def test_plan_leaves_checkpointing_off_when_a_sample_fits():
    assert not memory_plan.needs_checkpointing(2**20, 10 * 2**30, longest=4224)  # 4.1 GiB of 9 usable
    assert memory_plan.needs_checkpointing(2**20, 4 * 2**30, longest=4224)  # of 3.6 usable
    assert not memory_plan.needs_checkpointing(2**20, 2**20, longest=0)  # nothing known of the lengths: leave it


def test_the_probe_runs_beside_every_gradient_as_later_micro_batches_do(monkeypatch):
    """A micro-batch after the first finds every gradient made: a checkpointed pass's activations peak at the start of
    its backward beside them. From no gradients the probe peaked at the end of backward, gradients made and activations
    gone, and costed a 7B model's token at a tenth of its cost. Here the memory counter is what the gradients and a
    tensor the pass holds weigh: the peak is the pass's alone, and no gradient is left behind."""
    model = torch.nn.Linear(64, 64)
    held = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    weigh = lambda: sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None) + sum(held)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: weigh())
    peaks = []

    def step():
        held.append(10_000)  # the activations, kept until backward
        peaks.append(weigh())
        model(torch.randn(3, 64)).sum().backward()
        held.pop()
        peaks.append(weigh())  # the gradients made: from none, 16,640 bytes, the old probe's peak

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: max(peaks))
    assert memory_plan.peak_of(step, model, None) == 10_000
    assert all(p.grad is None for p in model.parameters())
