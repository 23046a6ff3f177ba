"""`ponder sft`'s micro-batch budget from device memory: the plan GRPO makes (ponder.rl.memory_plan), with the probe
passes of SFT's forward (the packed stream, GRPO's probe; or the model's own over rows). The device's memory counters
are stood in for; the probe passes and the steps run for real."""

import json
import re

import pytest
import torch

from ponder.models import checkpointing_on
from ponder.rl import memory_plan
from ponder.rl.forward import PolicyPass
from ponder.sft import sft
from ponder.sft.packing import stream_tokens
from ponder.sft import trainer as sft_trainer
from test_sft import cfg_for, write_jsonl

# examples of 30 to 250 characters: the built-in model's tokenizer gives a token a character
ROWS = [{"prompt": f"Say {'ab' * (i % 7 + 1)}", "completion": " " + "xy" * (10 + 12 * i)} for i in range(10)]


def stand_in_memory(monkeypatch, free, per_token, fixed=0):
    """Device memory as if read: `free(trainer)` bytes; each probe's peak is `fixed` + its tokens x per_token(model),
    found from the batch the SFT pass really ran (padded rows: rows x width; the packed stream: its tokens)."""
    seen, probes, made = [], [], []
    real_loss, real_logprobs, real_init = sft_trainer.loss_sum, PolicyPass.logprobs, sft_trainer.SFTTrainer.__init__

    def loss_sum(model, batch):
        seen.append(batch.input_ids.numel())
        return real_loss(model, batch)

    def logprobs(self, model, batch, **kwargs):
        seen.append(stream_tokens(batch))
        return real_logprobs(self, model, batch, **kwargs)

    def peak_of(step, model, device):
        step()
        model.zero_grad(set_to_none=True)
        probes.append(seen[-1])
        return fixed + seen[-1] * per_token(model)

    def init(self, *args, **kwargs):
        made.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(sft_trainer, "loss_sum", loss_sum)
    monkeypatch.setattr(PolicyPass, "logprobs", logprobs)
    monkeypatch.setattr(sft_trainer.SFTTrainer, "__init__", init)
    monkeypatch.setattr(memory_plan, "peak_of", peak_of)
    monkeypatch.setattr(memory_plan, "reads_memory", lambda device: True)
    monkeypatch.setattr(memory_plan, "free_bytes", lambda device: free(made[-1]))
    monkeypatch.setattr(memory_plan, "total_bytes", lambda device: 0)
    return seen, probes


def printed_budget(err: str) -> int:
    return int(re.search(r"optim.token_budget: ([\d,]+) tokens", err).group(1).replace(",", ""))


@pytest.mark.parametrize("forward", ["packed", "padded"])
def test_the_budget_is_planned_from_free_memory_printed_and_kept(tmp_path, monkeypatch, capsys, forward):
    """64 KiB a token and 24 MiB a pass whatever its size (the gradients among it), and 90 MiB free beside the state
    to come and that fixed part: 0.9 x 90 MiB / 64 KiB = 1,296 tokens -> 1,024 (a multiple of 1,024). Every
    micro-batch of the steps holds at most that many tokens (padded ones counted)."""
    per_token, fixed = 64 * 2**10, 24 * 2**20

    def free(t):
        grads = sum(p.numel() * 4 for p in t.model.parameters())
        return memory_plan.state_to_come(t.model, t.optimizer) + (fixed - grads) + 90 * 2**20

    seen, probes = stand_in_memory(monkeypatch, free, lambda model: per_token, fixed)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS * 4)
    tr = sft(cfg_for(tmp_path, [data], f"name=plan-{forward}", "data.template=plain", "train.steps=2",
                     "train.batch_size=40", f"train.forward={forward}"), quiet=True)
    budget = printed_budget(capsys.readouterr().err)
    assert budget == int(90 * 2**20 * 0.9 / per_token) // 1024 * 1024 == 1024 and len(probes) == 3
    if forward == "padded":  # the probes' rows: 8 x 240 and 25 x 240 tokens, 2 x 960
        assert probes == [1920, 6000, 1920]
    else:  # GRPO's: a prompt of 128 tokens, then 8 and 25 completions of 240, 2 of 960
        assert probes == [2048, 6128, 2048]
    steps = [json.loads(line) for line in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["token_budget"] for m in steps] == [budget, budget]  # planned once
    trained = seen[3:]  # the steps' micro-batches, padded: rows x the widest
    assert len(trained) > 2 and max(trained) <= budget


@pytest.mark.parametrize("lora, forward", [(False, "packed"), (True, "packed"), (False, "padded")],
                         ids=["packed", "lora", "padded"])
def test_checkpointing_is_turned_on_when_the_longest_example_would_not_fit(tmp_path, monkeypatch, capsys, lora, forward):
    """64 KiB a token without checkpointing, 8 KiB with it, 4 MiB free once the state is counted: 3.6 MiB holds 57
    tokens, and the longest example is about 240; checkpointed, 460."""
    seen, probes = stand_in_memory(monkeypatch, lambda t: memory_plan.state_to_come(t.model, t.optimizer) + 4 * 2**20,
                                   lambda model: (8 if checkpointing_on(model) else 64) * 2**10)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    tr = sft(cfg_for(tmp_path, [data], f"name=ckpt-{lora}-{forward}", "data.template=plain", "train.steps=1",
                     "model.gradient_checkpointing=auto", f"train.forward={forward}",
                     *(["model.lora={r: 4, alpha: 8}"] if lora else [])), quiet=True)
    err = capsys.readouterr().err
    m = json.loads((tr.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    longest = max(tr.lengths)
    assert 200 < longest < 460 and checkpointing_on(tr.model) and len(probes) == 6
    assert f"activation checkpointing on: without it a micro-batch could hold 57 tokens, less than the longest row's {longest:,}" in err
    assert "optim.token_budget: 460 tokens a micro-batch" in err
    assert m["loss"] > 0 and m["skipped_updates"] == 0 and m["grad_norm"] > 0  # checkpointed LoRA layers get gradients


@pytest.mark.parametrize("setting", ["false", "auto"], ids=["refused", "not-enough"])
def test_a_longest_example_that_cannot_fit_is_one_line_before_any_step(tmp_path, monkeypatch, setting):
    """As above (64 KiB a token, 4 MiB free), but checkpointing refused, or a checkpointed token costing 32 KiB: 3.6
    MiB then holds 115 tokens, fewer than the longest example's 200 or more. The run stops in one line naming what to
    do, before a step could run out of memory on that example (a 7B model's 32,000-token example on an H100 did)."""
    from ponder.errors import UserError

    seen, probes = stand_in_memory(monkeypatch, lambda t: memory_plan.state_to_come(t.model, t.optimizer) + 4 * 2**20,
                                   lambda model: (32 if checkpointing_on(model) else 64) * 2**10)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    how = ("without activation checkpointing \\(model.gradient_checkpointing: auto turns it on when it helps\\)"
           if setting == "false" else "even with activation checkpointing")
    with pytest.raises(UserError, match=rf"the longest row \(\d{{3}} tokens\) needs \d\.\d GiB of activations {how}, and "
                                        rf"0\.0 GiB are free for them; cut the examples \(data.max_len\), or train adapters"):
        sft(cfg_for(tmp_path, [data], f"name=long-{setting}", "data.template=plain", "train.steps=1",
                    f"model.gradient_checkpointing={setting}"), quiet=True)
    assert len(probes) == (3 if setting == "false" else 6) and len(seen) == len(probes)  # no step's pass ran


def test_without_device_memory_the_fixed_budget_and_a_set_budget_as_given(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    for extra, want in (((), memory_plan.CPU_BUDGET), (("optim.token_budget=2048",), 2048)):
        tr = sft(cfg_for(tmp_path, [data], f"name=fixed{want}", "data.template=plain", "train.steps=1", *extra), quiet=True)
        assert json.loads((tr.run_dir / "metrics.jsonl").read_text().splitlines()[0])["token_budget"] == want


@pytest.mark.parametrize("extra, fixes", [
    ((), r"train adapters only \(model\.lora: \{r: 16, alpha: 32\}\), or use bf16 weights \(train\.precision=bf16\), "
         r"or use a device with more memory$"),
    (("train.precision=bf16", "model.lora={r: 4, alpha: 8}"), r"for activations; use a device with more memory$"),
], ids=["float32", "bf16-lora"])
def test_a_state_that_leaves_no_room_for_a_micro_batch_is_one_line_before_any_pass(tmp_path, monkeypatch, extra, fixes):
    """A 7B model's full-parameter GRPO on an 80 GB H100 printed a budget with -4.6 GiB free and ran out of memory
    in the first optimizer step. Here the gradients and AdamW state to come are 2 GiB more than the device has free:
    one line with the figures and what to do, before any probe or step; only the ways the run has not taken (an H100
    run already in bf16 was told to use bf16)."""
    from ponder.errors import UserError

    seen, probes = stand_in_memory(monkeypatch, lambda t: memory_plan.state_to_come(t.model, t.optimizer) - 2 * 2**30,
                                   lambda model: 2**10)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UserError, match=r"the update does not fit this device: .*leave -2\.0 GiB for activations; " + fixes
                       if not extra else fixes):
        sft(cfg_for(tmp_path, [data], "name=full", "data.template=plain", "train.steps=1", *extra), quiet=True)
    assert seen == [] and probes == []


def test_the_memory_probe_leaves_the_random_state_as_it_was(monkeypatch):
    """The plan's probe runs a forward and backward at the first step of every process, on resume after the saved
    random state is restored: its dropout draws gave the resumed steps other masks than the uninterrupted run's."""
    from ponder.rl import memory_plan

    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    model = torch.nn.Linear(2, 2)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    memory_plan.peak_of(lambda: torch.nn.functional.dropout(torch.ones(100), 0.5), model, "cpu")
    assert torch.equal(torch.rand(3), expected)
