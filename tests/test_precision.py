"""train.precision does what it says: fp32 (float32 weights and compute), mixed (float32 masters, bf16
autocast), bf16 (bf16 weights, KahanAdamW), auto (by memory on CUDA, printed). ponder.runtime."""

import json

import pytest
import torch

from ponder import runtime
from ponder.runtime import GIB, Precision, PrecisionChooser, choose_precision
from ponder.train import train

H200 = 140 * GIB  # a round device size: the figures below are computed by hand from it


def test_auto_is_fp32_on_cpu_whatever_the_size():
    assert choose_precision("auto", "cpu", 70_000_000_000, None).name == "fp32"
    assert choose_precision("auto", "cpu", 1000, 2 * GIB).name == "fp32"


def test_auto_with_cpu_offload_keeps_float32_state_in_host_memory(smoke_cfg, monkeypatch):
    """train.offload puts weights, gradients and AdamW state in host memory: the device's size does not bound them,
    and auto picked bf16 weights with bf16 moments for a 7B model on an H100, the run offload is meant for."""
    seven_b = choose_precision("auto", "cuda", 7_600_000_000, 80 * GIB, offload=True)
    assert (seven_b.name, seven_b.moments) == ("mixed", "fp32")
    assert seven_b.line() == ("train.precision auto -> mixed (train.offload: float32 weights, gradients and AdamW state "
                              "in host memory, bf16 compute on the device; set train.precision=bf16 for bf16 weights)")
    assert choose_precision("auto", "cuda", 7_600_000_000, 80 * GIB).name == "bf16"  # not offloaded
    seen = {}  # the trainer hands its setting over
    real = runtime.choose_precision

    def spy(*args, **kwargs):
        seen["offload"] = args[6] if len(args) > 6 else kwargs.get("offload")
        return real(*args, **kwargs)

    monkeypatch.setattr(runtime, "choose_precision", spy)
    from ponder.rl.trainer import GRPOTrainer

    GRPOTrainer(smoke_cfg("name=offloaded", "train.sharding=fsdp", "train.offload=true"))
    assert seen == {"offload": True}


def test_auto_on_cuda_keeps_float32_masters_for_what_fits_and_bf16_for_7b():
    # 1.5B: 1.5e9 x 16 bytes = 22.35 GiB, within 70% of 140 GiB (98 GiB)
    small = choose_precision("auto", "cuda", 1_500_000_000, H200)
    assert small.name == "mixed" and small.dtype == torch.float32 and small.autocast
    assert small.why == ("1.5B parameters: float32 weights, gradients and AdamW state need 22.4 GiB, within 70% of the "
                         "140 GiB device; set train.precision=bf16 for bf16 weights")
    # 7.6B: 7.6e9 x 16 = 113.25 GiB > 98; bf16 + KahanAdamW x 14 = 99.09 GiB, also > 98, so the line names
    # bf16 moments: 7.6e9 x 10 = 70.78 GiB
    big = choose_precision("auto", "cuda", 7_600_000_000, H200)
    assert big.name == "bf16" and big.dtype == torch.bfloat16 and not big.autocast and big.moments == "bf16"
    assert big.line() == ("train.precision auto -> bf16 (7.6B parameters: float32 weights, gradients and AdamW state "
                          "need 113.2 GiB, more than 70% of the 140 GiB device; bf16 weights with KahanAdamW need "
                          "99.1 GiB, more than 70% too: with bf16 moments (optim.moment_dtype auto -> bf16) 70.8; "
                          "set train.precision=mixed to force it)")
    # 3B on a 40 GiB device: 44.7 GiB > 28; bf16 needs 39.1 GiB (> 28 too); 3B on an H200: mixed
    assert choose_precision("auto", "cuda", 3_000_000_000, 40 * GIB).moments == "bf16"
    # 6.5B on an H200: 16 x 6.5e9 = 96.9 GiB <= 98: mixed; 6.8B: 101.3 > 98, but 14 bytes (88.6 GiB) fit: fp32 moments
    assert choose_precision("auto", "cuda", 6_500_000_000, H200).name == "mixed"
    mid = choose_precision("auto", "cuda", 6_800_000_000, H200)
    assert mid.name == "bf16" and mid.moments == "fp32"
    # sharded over 2 ranks, each holds half: 7.6B x 16 / 2 = 56.6 GiB a rank, within 98: float32 masters
    two = choose_precision("auto", "cuda", 7_600_000_000, H200, shards=2)
    assert two.name == "mixed" and two.why.startswith("7.6B parameters sharded over 2 ranks: float32 weights, "
                                                      "gradients and AdamW state need 56.6 GiB a rank, within 70%")


def test_auto_boundary_is_inclusive_and_lora_counts_the_frozen_base_only():
    mem = 10 * GIB  # room: 7 GiB = 7,516,192,768 bytes = 469,762,048 parameters x 16 bytes exactly
    assert choose_precision("auto", "cuda", 469_762_048, mem).name == "mixed"
    assert choose_precision("auto", "cuda", 469_762_049, mem).name == "bf16"
    # LoRA: 7.6B frozen float32 weights are 28.3 GiB (4 bytes each); the adapters are a rounding error
    lora = choose_precision("auto", "cuda", 7_600_000_000, H200, frozen=True)
    assert lora.name == "mixed" and "float32 base weights need 28.3 GiB" in lora.why


def test_an_explicit_setting_is_kept_as_it_is():
    for name in ("fp32", "mixed", "bf16"):
        assert choose_precision(name, "cuda", 7_600_000_000, H200) == Precision(name)
        assert choose_precision(name, "cpu", 10) == Precision(name)
    assert Precision("fp32").dtype == torch.float32 and not Precision("fp32").autocast


def test_the_chooser_prints_auto_s_choice_on_cuda_only(monkeypatch, capsys):
    model = torch.nn.Linear(1000, 1000)  # 1,001,000 parameters
    monkeypatch.setattr(runtime, "device_memory", lambda device: 2 * 2**20 * 16)  # 32 MiB: room for 1.47M
    assert PrecisionChooser("auto", torch.device("cuda", 0))(model) == torch.float32
    assert capsys.readouterr().err == ("ponder: train.precision auto -> mixed (1.0M parameters: float32 weights, gradients "
                                       "and AdamW state need 0.0 GiB, within 70% of the 0 GiB device; set "
                                       "train.precision=bf16 for bf16 weights)\n")
    monkeypatch.setattr(runtime, "device_memory", lambda device: 2**20 * 16)  # 16 MiB: room for 0.73M
    chooser = PrecisionChooser("auto", torch.device("cuda", 0))
    assert chooser(model) == torch.bfloat16 and chooser.chosen.name == "bf16"
    assert "auto -> bf16 (1.0M parameters" in capsys.readouterr().err
    for requested, device in (("auto", "cpu"), ("bf16", "cuda"), ("mixed", "cuda")):
        PrecisionChooser(requested, torch.device(device))(model)
        assert capsys.readouterr().err == "", (requested, device)
    monkeypatch.setattr(runtime, "device_memory", lambda device: 2 * 2**20 * 16)
    PrecisionChooser("auto", torch.device("cuda", 0), announce=False)(model)  # ranks other than 0
    assert capsys.readouterr().err == ""


def test_auto_keeps_a_resumed_bf16_run_bf16(tmp_path, monkeypatch, capsys):
    model = torch.nn.Linear(10, 10)
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    assert PrecisionChooser("auto", torch.device("cpu"), resumed=tmp_path)(model) == torch.bfloat16  # not fp32
    monkeypatch.setattr(runtime, "device_memory", lambda device: 100 * GIB)  # mixed would fit easily
    chooser = PrecisionChooser("auto", torch.device("cuda", 0), resumed=tmp_path)
    assert chooser(model) == torch.bfloat16
    assert "auto -> bf16 (as the run being resumed" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))  # a float32 run decides afresh
    assert PrecisionChooser("auto", torch.device("cuda", 0), resumed=tmp_path)(model) == torch.float32
    assert PrecisionChooser("fp32", torch.device("cpu"), resumed=tmp_path)(model) == torch.float32


# ------------------------------------------------------------------------------------------------ runs
def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_bf16_grpo_run_trains_bf16_weights_with_kahan_and_no_rollout_copy(smoke_cfg):
    from ponder.optim import KahanAdamW
    from ponder.rl.trainer import GRPOTrainer

    cfg = smoke_cfg("name=bf16", "train.precision=bf16", "rollout.engine=fast", "algorithm.beta=0.04",
                    "rewards={test_char_hash: 1.0}", "train.steps=1")
    t = GRPOTrainer(cfg)
    assert t.precision.name == "bf16" and not t.policy_pass.autocast
    assert {p.dtype for p in t.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in t.ref.parameters()} == {torch.bfloat16}  # the reference in the same dtype
    assert type(t.optimizer) is KahanAdamW and t.optimizer.moment_dtype == torch.float32
    before = _weights(t.model)
    m = t.step()
    assert t.engine.copy is None  # bf16 weights are sampled from as they are: no copy, no cast
    assert t.engine.fwd.dtype == torch.bfloat16 and not t.engine.fwd.autocast
    assert m["grad_norm"] > 0 and m["kl"] == 0  # the first update's log-probs are the reference's
    after = t.model.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in after.values())
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) == len(before), set(before) - set(moved)  # every weight moved (lr 3e-3)
    state = t.optimizer.state[next(t.model.parameters())]
    assert state["exp_avg"].dtype == torch.float32 and state["compensation"].dtype == torch.bfloat16
    assert any(s["compensation"].abs().sum() > 0 for s in t.optimizer.state.values())


def test_fast_engine_on_bf16_weights_matches_transformers_greedy():
    from ponder.models import load
    from ponder.rollout import SamplingParams
    from ponder.rollout.fast import FastEngine
    from ponder.rollout.hf import HFEngine

    model, tok = load("tiny-base", dtype=torch.bfloat16)
    ids = [tok(p).input_ids for p in ("7 + 4 + 11", "Compute 12 + 1", "the city", "94 + 19 =")]
    params = SamplingParams(n=1, temperature=0.0, max_tokens=24)
    fast = FastEngine(model, tok)
    got = [o[0].token_ids for o in fast.generate(ids, params)]
    assert fast.copy is None and all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert got == [o[0].token_ids for o in HFEngine(model, tok).generate(ids, params)]  # measured: all 24 tokens agree


def test_lora_over_bf16_weights_trains_float32_adapters(smoke_cfg):
    from ponder.rl.trainer import GRPOTrainer

    cfg = smoke_cfg("name=lora", "train.precision=bf16", "model.lora={r: 4, alpha: 8}", "algorithm.beta=0.04",
                    "rewards={test_char_hash: 1.0}", "optim.lr=0.01")
    t = GRPOTrainer(cfg)
    frozen = {p.dtype for p in t.model.parameters() if not p.requires_grad}
    trained = {n: p for n, p in t.model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and {p.dtype for p in trained.values()} == {torch.float32}  # peft's way
    assert type(t.optimizer) is torch.optim.AdamW  # float32 adapters need no compensation
    before = {n: p.detach().clone() for n, p in trained.items()}
    assert t.step()["grad_norm"] > 0
    assert all("lora_" in n for n in trained) and any(not torch.equal(before[n], p) for n, p in trained.items())


def test_mixed_on_cpu_runs_under_autocast_and_fp32_does_not(smoke_cfg):
    from ponder.rl.trainer import GRPOTrainer

    runs = {}
    for name in ("fp32", "mixed", "auto"):
        t = GRPOTrainer(smoke_cfg(f"name={name}", f"train.precision={name}", "rollout.max_new_tokens=3"))
        assert {p.dtype for p in t.model.parameters()} == {torch.float32} and type(t.optimizer) is torch.optim.AdamW
        samples = [s for g in t.collect()[0] for s in g.samples][:8]
        with torch.no_grad():
            runs[name] = t.policy_pass.logprobs(t.model, samples)[0]
        assert t.policy_pass.autocast == (name == "mixed")
    assert torch.equal(runs["fp32"], runs["auto"])  # auto is fp32 on CPU
    # bf16 products: close to float32, not equal
    assert not torch.equal(runs["fp32"], runs["mixed"]) and torch.allclose(runs["fp32"], runs["mixed"], atol=0.1)


def _metrics(run_dir):
    volatile = ("time", "time/generate", "time/reward", "time/train", "time/total", "tokens_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in volatile}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("moments", ["fp32", "bf16"])
def test_bf16_run_resumes_exactly_and_exports_a_bf16_model(smoke_cfg, moments):
    from transformers import AutoModelForCausalLM

    common = ("train.precision=bf16", f"optim.moment_dtype={moments}", "train.steps=4", "train.save_every=2",
              "rewards={test_char_hash: 1.0}", "rollout.prompts_per_step=4", "algorithm.beta=0.04")
    full = train(smoke_cfg("name=full", *common))
    cut_cfg = smoke_cfg("name=cut", *common)
    train(cut_cfg, stop_after=3)  # step 3 is logged but only step-2 is saved: it is redone
    resumed = train(cut_cfg, resume=True)
    a, b = _metrics(full.run_dir), _metrics(cut_cfg.run_dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4] and a == b  # bit for bit: losses, rewards, grad norms, KL
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        s, r = full.optimizer.state[p], resumed.optimizer.state[q]
        for k in ("exp_avg", "exp_avg_sq", "compensation", "step"):  # the compensation too, in its dtype
            assert s[k].dtype == r[k].dtype and torch.equal(s[k], r[k]), k
    assert s["exp_avg"].dtype == (torch.bfloat16 if moments == "bf16" else torch.float32)
    # the export loads with from_pretrained: bf16 in its config and tensors, the weights as trained
    final = full.run_dir / "checkpoints" / "step-4"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(final)
    assert loaded.dtype == torch.bfloat16
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, full.model.state_dict()[k]), k


def test_bf16_sft_trains_bf16_weights_with_kahan(tmp_path):
    from ponder.config import load_config
    from ponder.optim import KahanAdamW
    from ponder.sft import sft
    from ponder.sft.config import SFTConfig

    rows = [{"prompt": "Compute 1 + 2", "completion": " <answer> 3 </answer>"}] * 4
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"output_dir={tmp_path}", f"data.files={json.dumps([str(data)])}", "train.log_samples=0",
                             "train.save_every=0", "train.precision=bf16", "train.steps=3", "train.batch_size=4",
                             "optim.lr=1e-3"], cls=SFTConfig)
    tr = sft(cfg, stop_after=1, quiet=True)
    assert tr.precision.name == "bf16" and type(tr.optimizer) is KahanAdamW
    assert {p.dtype for p in tr.model.parameters()} == {torch.bfloat16}
    losses = [json.loads(line)["loss"] for line in (tr.run_dir / "metrics.jsonl").read_text().splitlines()]
    before = _weights(tr.model)
    for _ in range(2):
        losses.append(tr.step()["loss"])
    assert all(v.dtype == torch.bfloat16 for v in tr.model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in tr.model.state_dict().items())
    assert losses[-1] < losses[0]  # three steps on one example: the loss falls


def test_bf16_pretraining_trains_bf16_weights_and_saves_float32(tmp_path, monkeypatch, capsys):
    from rich.console import Console

    from ponder import optim
    from ponder.models import load
    from ponder.pretrain import pretrain
    from test_pretrain import small

    made = []
    real = optim.KahanAdamW
    monkeypatch.setattr(optim, "KahanAdamW", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    out = pretrain(small(tmp_path, precision="bf16"), recipe="r.yaml", console=Console(width=120))
    losses = [float(x.split()[3]) for x in capsys.readouterr().out.splitlines() if x.startswith("step ")]
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 1.0  # learns as the float32 run does (its test: the same bound)
    # the weights were bf16 while they trained (pretrain casts them to float32 to save): their compensation is
    states = list(made[0].state.values())
    assert states and all(s["compensation"].dtype == torch.bfloat16 and s["exp_avg"].dtype == torch.float32 for s in states)
    model, _ = load(str(out))  # save_dtype float32 (the default): a float32 model on disk
    assert {q.dtype for q in model.parameters()} == {torch.float32}


def test_keep_freed_memory_holds_pages_across_large_tensors():
    """CPU training keeps freed blocks in the heap: a large tensor allocated again after being freed reuses
    mapped pages instead of faulting fresh ones in (where glibc's mallopt exists; elsewhere nothing to test)."""
    import resource
    import sys

    from ponder.runtime import keep_freed_memory

    if not sys.platform.startswith("linux") or not keep_freed_memory():
        pytest.skip("no glibc mallopt here")
    torch.ones(8 << 20).sum()  # 32 MiB: mapped once, kept when freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        torch.ones(8 << 20).sum()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2000  # a fresh 32 MiB would be 8192 each


def _lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():  # B non-zero, so that the adapters move the log-probs and A has a gradient
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


def test_lora_under_mixed_keeps_its_frozen_base_in_bf16_and_computes_the_same_bit_for_bit():
    """mixed over a float32 base: autocast casts each base matrix to bf16 at every product and keeps the cast for
    backward. Stored in bf16 once instead (half the base's memory), the same passes give the same log-probs and
    adapter gradients to the last bit, for a base whose values bf16 holds exactly (as a model shipped in bf16)."""
    import copy

    from ponder.models import load, narrow_frozen_matrices
    from ponder.rl.batching import Sample
    from ponder.rl.packed import packed_logprobs

    base, _ = load("tiny-random", dtype=torch.float32)
    for p in base.parameters():
        p.data = p.data.to(torch.bfloat16).float()
    wide = _lora(base)
    narrow = copy.deepcopy(wide)
    n = narrow_frozen_matrices(narrow)
    dtypes = {name: p.dtype for name, p in narrow.named_parameters()}
    assert n == sum(p.numel() for name, p in narrow.named_parameters() if dtypes[name] == torch.bfloat16) > 0
    assert all(dtypes[name] == torch.float32 for name in dtypes if "lora_" in name or "norm" in name or "embed" in name)
    assert all(dtypes[name] == torch.bfloat16 for name in dtypes if "base_layer" in name or "k_proj" in name)
    g = torch.Generator().manual_seed(1)
    batch = [Sample(torch.randint(3, 40, (7,), generator=g).tolist(), torch.randint(3, 40, (k,), generator=g).tolist())
             for k in (5, 9, 3)]
    out = {}
    for tag, model in (("wide", wide), ("narrow", narrow)):
        lp, _, mask = packed_logprobs(model, batch, "cpu", autocast=True)
        (lp * mask).sum().backward()
        out[tag] = lp.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert torch.equal(out["wide"][0], out["narrow"][0])
    assert out["wide"][1].keys() == out["narrow"][1].keys() and len(out["wide"][1]) > 0
    assert all(torch.equal(out["wide"][1][k], out["narrow"][1][k]) for k in out["wide"][1])


def test_a_lora_run_under_mixed_trains_and_exports_float32(smoke_cfg, tmp_path):
    from transformers import AutoModelForCausalLM

    from ponder.models import save
    from ponder.rl.trainer import GRPOTrainer

    cfg = smoke_cfg("name=lora-mixed", "train.precision=mixed", "model.lora={r: 4, alpha: 8}",
                    "rewards={test_char_hash: 1.0}", "optim.lr=0.01", "rollout.max_new_tokens=4")
    t = GRPOTrainer(cfg)
    frozen = {p.dtype for n, p in t.model.named_parameters() if "base_layer" in n}
    assert frozen == {torch.bfloat16} and {p.dtype for p in t.model.parameters() if p.requires_grad} == {torch.float32}
    assert t.step()["grad_norm"] > 0  # rollouts (under autocast, as the passes) and the update ran
    save(t.model, t.tokenizer, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype="auto")
    assert {p.dtype for p in exported.parameters()} == {torch.float32}
    merged = t.model.base_model.model.model.layers[0].self_attn.q_proj
    want = merged.base_layer.weight.float() + merged.get_delta_weight("default").float()
    assert torch.equal(exported.model.layers[0].self_attn.q_proj.weight, want.cpu())
