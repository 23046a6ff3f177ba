"""The CUDA paths, each way they can run: the fused pieces as chosen on this GPU ("fast"), and every piece on its
fallback ("fallback": Triton, torch.compile and variable-length flash attention made to fail their trials, as a
broken driver, compiler or cache makes them). CPU runs skip this module (CI has no GPU); run it on a GPU with
`python -m pytest tests/test_cuda_paths.py`.

Why: a fallback is what runs when something is wrong on a user's machine, and nothing else exercises it on a
GPU. Three runs of the demo side by side on one H100 once made every trial of one process fail, and its update
then stopped in the padded attention (a CPU index beside CUDA ones).
"""

import pytest
import torch
from random_weights import randomized
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEV = torch.device("cuda")
SMALL = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=301, max_position_embeddings=512, pad_token_id=0)


@pytest.fixture(params=["fast", "fallback"])
def paths(request, monkeypatch):
    """Every cache of a chosen piece emptied, so the pieces are chosen again; with "fallback", chosen with every
    trial failing."""
    import torch._dynamo

    from ponder.kernels import decode_attention, decode_step, fp8_linear, head_logprobs, rope, swiglu, training_step, trials
    from ponder.rl import packed

    fp8_linear.rows_cast.cache_clear()

    for mod, name in [(training_step, "_chosen"), (swiglu, "_chosen"), (packed, "_chosen"),
                      (decode_attention, "_usable"), (head_logprobs, "_usable")]:
        monkeypatch.setattr(mod, name, {})
    monkeypatch.setattr(decode_step, "_compiled", None)
    torch._dynamo.reset()
    if request.param == "fallback":
        def no_compiler(*_, **__):
            raise RuntimeError("the compiler is switched off by this test")

        monkeypatch.setattr(torch, "compile", no_compiler)
        for mod in (trials, decode_attention, head_logprobs, rope, swiglu, fp8_linear):
            monkeypatch.setattr(mod, "triton", None)
        monkeypatch.setattr(packed, "_varlen_fns", lambda: [])
    yield request.param
    torch._dynamo.reset()
    fp8_linear.rows_cast.cache_clear()


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=48, tie_word_embeddings=False))
    else:
        model = LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False))
    return randomized(model, seed=seed).to(DEV)


def batch():
    """Two groups of rows sharing a prompt, one of them many long rows (several attention groups when padded)."""
    from ponder.rl.batching import Sample

    g = torch.Generator().manual_seed(3)
    rnd = lambda n: torch.randint(1, 301, (n,), generator=g).tolist()  # noqa: E731
    p1, p2 = rnd(9), rnd(40)
    return [Sample(p1, rnd(n)) for n in (60, 3, 1, 200)] + [Sample(p2, rnd(n)) for n in (120, 7)]


def reference_logprobs(model, rows):
    """Each row alone through the HF forward under bf16 autocast."""
    out = []
    for s in rows:
        ids = torch.tensor([s.prompt_ids + s.completion_ids], device=DEV)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits[0, len(s.prompt_ids) - 1 : -1].float()
        out.append(logits.log_softmax(-1).gather(-1, ids[0, len(s.prompt_ids):, None]).squeeze(-1))
    return out


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_packed_pass_matches_the_hf_forward(paths, kind, capsys):
    from ponder.rl import packed
    from ponder.rl.packed import packed_logprobs

    model, rows = build(kind), batch()
    with torch.no_grad():  # the first call scores without gradients, as a reference model's does: pieces are chosen here
        packed_logprobs(model, rows, DEV, autocast=True)
    if paths == "fast":  # and chosen by trials that checked gradients all the same
        assert "failed" not in capsys.readouterr().err
        assert packed._chosen["attend"] is not packed.bucketed_attention
    lp, ent, mask = packed_logprobs(model, rows, DEV, with_entropy=True, autocast=True)
    for i, ref in enumerate(reference_logprobs(model, rows)):
        torch.testing.assert_close(lp[i, : len(ref)], ref, atol=0.05, rtol=0.05)
    assert mask.sum() == sum(len(s.completion_ids) for s in rows) and torch.isfinite(ent).all()
    (lp * mask).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or g.abs().sum() == 0]


def test_fast_engine_logprobs_match_a_fresh_forward(paths):
    """Sampled rows through the fast engine from a float32 model (its bf16 rollout copy on CUDA): each row's
    log-probs and entropies (the sampler's, inside the captured graphs) against the HF forward of its own tokens."""
    from ponder.models.tiny import char_tokenizer
    from ponder.rollout import SamplingParams
    from ponder.rollout.fast import FastEngine
    from ponder.rl.batching import Sample

    tok = char_tokenizer()
    model = build("qwen2")
    engine = FastEngine(model, tok, sync_every=4, min_bucket=1)
    prompts = [tok.encode(p) for p in ["Q: 12+7=", "a", "The quick brown fox jumps", "count: 1 2 3 4 5 6 7 8 9"]]
    outs = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=40, seed=1, logprobs=True,
                                                   entropies=True))
    rows = [(p, c) for p, o in zip(prompts, outs) for c in o]
    assert len(rows) == 12 and all(len(c.token_ids) > 0 for _, c in rows)
    refs = reference_logprobs(model, [Sample(list(p), list(c.token_ids)) for p, c in rows])
    for (p, c), ref in zip(rows, refs):
        torch.testing.assert_close(torch.tensor(c.logprobs, device=DEV), ref, atol=0.08, rtol=0.05)
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([p + c.token_ids], device=DEV)).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
        torch.testing.assert_close(torch.tensor(c.entropies, device=DEV), -(logp.exp() * logp).sum(-1), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("setting", ["algorithm.beta=0", "algorithm.beta=0.04", "algorithm.mu=2", "train.precision=fp32",
                                     "train.precision=bf16", "model.gradient_checkpointing=true", "optim.token_budget=null",
                                     "algorithm.beta=0.04 algorithm.ref_reset_every=1 algorithm.ref_mix=0.5",
                                     "algorithm.entropy_coef=0.01",
                                     "algorithm.mu=2 algorithm.dual_clip=3 algorithm.top_entropy_quantile=0.2"])
def test_grpo_steps_on_the_tiny_world(paths, tmp_path, setting):
    """Two steps of the R1-Zero demo's recipe, as `ponder train` runs them, on the GPU. With beta > 0 or mu > 1 the
    first pass of the update scores without gradients: there the token budget's probe (a backward) stopped the run.
    With train.precision=fp32 the packed pass handed float32 to flash attention, which takes half types only. With
    checkpointed layers, checkpoint's early stop inside a compiled piece was taken for the piece failing. With the
    budget unset, the memory plan's probes run on the device's own counters. With ref_mix the reference moves by a
    lerp of each parameter toward the policy's (float32 masters, a bf16-fused rollout copy beside them). With an
    entropy bonus the head's Triton backward pass carries the entropy's gradient too. The 80/20 mask picks its tokens
    on the device (a boolean index: one wait for the GPU a micro-batch)."""
    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer

    cfg = load_config("recipes/zero-tiny.yaml", [f"output_dir={tmp_path}", "train.steps=2", "eval.tasks=[]",
                                                 "rollout.prompts_per_step=8", "train.device=cuda", *setting.split()])
    trainer = GRPOTrainer(cfg)
    for _ in range(2):
        m = trainer.step()
        assert all(torch.isfinite(torch.tensor(float(m[k]))) for k in ("loss", "grad_norm", "entropy")), m
    assert trainer.step_no == 2


def test_an_fp8_kv_cache_on_cuda(paths):
    """rollout.engine_options.kv_dtype fp8 through the engine's CUDA path (the Triton rotary + cache write and the
    decode attention widening e4m3 as it reads, or their fallbacks): the pool holds e4m3, each row's log-probs
    agree with a forward whose decode positions read K/V through the cache's rounding and scales (bf16 autocast,
    the rollout copy's dtype), and the rotary + cache write divides by the scales, rounds as torch does and raises
    the watched peak."""
    from kv_rounding import fp8_kv_forward

    from ponder.kernels.rope import rope_kv
    from ponder.models.tiny import char_tokenizer
    from ponder.rollout import SamplingParams
    from ponder.rollout.fast import FastEngine

    tok = char_tokenizer()
    model = build("qwen2")
    engine = FastEngine(model, tok, sync_every=4, min_bucket=1, kv_dtype="fp8")
    prompts = [tok.encode(p) for p in ["Q: 12+7=", "a", "The quick brown fox jumps", "count: 1 2 3 4 5 6 7 8 9"]]
    outs = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=40, seed=1, logprobs=True))
    assert engine.fwd.kv.dtype == torch.float8_e4m3fn
    twin = fp8_kv_forward(model)
    for p, group in zip(prompts, outs):
        for c in group:
            ids, n = torch.tensor([p + c.token_ids], device=DEV), len(p)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                ref = twin(ids, n, engine.fwd.kv_scale)[n - 1 : -1].float().log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs, device=DEV), ref, atol=0.08, rtol=0.05)
    store = engine.fwd.k.get("rope_store")
    if paths == "fast":
        assert store is not None
    if store is not None:
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (torch.randn((64, n, 64), generator=g, device=DEV) * 3 for n in (14, 2, 2))
        ang = torch.rand((80, 32), generator=g, device=DEV) * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        pos = torch.randint(0, 80, (64,), generator=g, device=DEV)
        table = torch.randperm(64 * 5, generator=g, device=DEV).view(64, 5) + 1  # blocks of 16 slots
        cache = torch.zeros((2, 64 * 5 + 1, 2, 16, 64), device=DEV, dtype=torch.float8_e4m3fn)
        scale = torch.tensor([0.5, 4.0], device=DEV)  # the cache holds K / 0.5 and V / 4
        peak = torch.zeros((), device=DEV)  # the largest |value| stored, watched for saturation
        store(q, k, v, cos, sin, pos, cache, table, scale, peak)
        _, kv = rope_kv(q, k, v, cos[pos][:, None], sin[pos][:, None])
        torch.testing.assert_close(peak, (kv / scale[:, None, None]).abs().max())
        want = torch.zeros_like(cache, dtype=torch.float32)
        want[:, table[torch.arange(64, device=DEV), pos // 16], :, pos % 16] = kv / scale[:, None, None]
        want = want.to(torch.float8_e4m3fn)
        same = (cache.view(torch.uint8) == want.view(torch.uint8)).float().mean().item()
        # all but values that sit on a rounding boundary after float32 arithmetic in another order
        assert same > 0.999, same
        torch.testing.assert_close(cache.float(), want.float(), atol=2**-9, rtol=0.07)


def test_fp8_matrices_on_cuda(paths, monkeypatch):
    """rollout.engine_options.weight_dtype fp8 on CUDA (torch._scaled_mm with rowwise scales, the Triton cast of the
    rows or torch's): each row's log-probs agree with a forward whose products compute from the same e4m3
    matrices and rows (bf16 autocast, the rollout copy's dtype), and the Triton cast gives torch's bytes."""
    from kv_rounding import fp8_weights_model

    from ponder.kernels.fp8_linear import rows_fp8, triton_rows_fp8
    from ponder.models.tiny import char_tokenizer
    from ponder.rollout import SamplingParams, fast_model
    from ponder.rollout.fast import FastEngine

    monkeypatch.setitem(fast_model.FP8_MIN_PARAMS, "cuda", 0)  # every matrix of this small model, not the large only
    tok = char_tokenizer()
    model = build("qwen2")
    engine = FastEngine(model, tok, sync_every=4, min_bucket=1, weight_dtype="fp8")
    prompts = [tok.encode(p) for p in ["Q: 12+7=", "a", "The quick brown fox jumps", "count: 1 2 3 4 5 6 7 8 9"]]
    outs = engine.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=40, seed=1, logprobs=True))
    assert len(engine.fwd.fp8) == 4 * len(model.model.layers)
    twin = fp8_weights_model(model)
    for p, group in zip(prompts, outs):
        for c in group:
            ids, n = torch.tensor([p + c.token_ids], device=DEV), len(p)
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                ref = twin(input_ids=ids).logits[0, n - 1 : -1].float().log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs, device=DEV), ref, atol=0.08, rtol=0.05)
    x = torch.randn((300, 4864), device=DEV, dtype=torch.bfloat16) * 5
    x[7] = 0
    (q, s), (q_ref, s_ref) = triton_rows_fp8(x), rows_fp8(x)
    torch.testing.assert_close(s, s_ref)
    assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean() > 0.999


def test_truncated_importance_sampling_on_the_bf16_rollout_copy(paths, tmp_path):
    """algorithm.rollout_is_cap on CUDA: the engine samples from the bf16 rollout copy, the update scores with the
    float32 masters under autocast, so pi_old / pi_engine is near 1 but not 1; it reaches the loss and the metrics."""
    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer

    cfg = load_config("recipes/zero-tiny.yaml", [f"output_dir={tmp_path}", "train.steps=2", "eval.tasks=[]",
                                                 "rollout.prompts_per_step=8", "train.device=cuda",
                                                 "train.skip_zero_advantage=false", "algorithm.rollout_is_cap=2"])
    trainer = GRPOTrainer(cfg)
    for _ in range(2):
        m = trainer.step()
        print(f"rollout_is/mean {m['rollout_is/mean']:.6f} capped {m['rollout_is/capped_frac']:.6f}")
        assert abs(m["rollout_is/mean"] - 1) < 0.05 and m["rollout_is/capped_frac"] < 0.01, m


@pytest.mark.parametrize("setting", ["model.gradient_checkpointing=auto", "model.gradient_checkpointing=true",
                                     "train.forward=padded"])
def test_sft_steps_plan_their_budget_from_device_memory(paths, tmp_path, capsys, setting):
    """Two steps of the cold-start recipe with the budget unset: the plan's SFT probes run on the GPU's memory
    counters and print a budget, which both steps log, and the steps train (checkpointed too, and through the model's
    own forward)."""
    import json
    import re

    from ponder.config import load_config
    from ponder.sft import sft
    from ponder.sft.config import SFTConfig

    cfg = load_config("recipes/coldstart-tiny.yaml", [f"output_dir={tmp_path}", "train.steps=2", "eval.tasks=[]",
                                                      "optim.token_budget=null", "train.device=cuda", "train.log_samples=0",
                                                      setting], cls=SFTConfig)
    trainer = sft(cfg, quiet=True)
    budget = int(re.search(r"optim.token_budget: ([\d,]+) tokens", capsys.readouterr().err).group(1).replace(",", ""))
    steps = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["token_budget"] for m in steps] == [budget, budget] and budget >= 1024
    assert all(m["loss"] > 0 and m["skipped_updates"] == 0 for m in steps)



def test_the_updates_products_through_the_copy_add_float32_gradients():
    """ponder.rl.copy_linear on CUDA: the weight gradient is one product with a float32 output added into .grad
    (torch.addmm's out_dtype), over three micro-batches. Against the float64 gradient of the same bf16 operands it is
    nearer than autocast's, which rounds each micro-batch's share to bf16 before adding it."""
    from ponder.kernels.accumulate import fused_float32
    from ponder.rl import copy_linear

    assert fused_float32(DEV), "torch.addmm takes no out_dtype here: the update casts and adds instead"
    g = torch.Generator(device=DEV).manual_seed(0)
    ref, mine = (torch.nn.Linear(256, 384, bias=False, device=DEV) for _ in range(2))
    with torch.no_grad():
        mine.weight.copy_(ref.weight)
    w16 = mine.weight.detach().to(torch.bfloat16)
    exact = torch.zeros_like(ref.weight, dtype=torch.float64)
    for n in (300, 77, 512):
        x = torch.randn((n, 256), generator=g, device=DEV, requires_grad=True)
        gy = torch.randn((n, 384), generator=g, device=DEV).to(torch.bfloat16)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yr = ref(x)
            ym = copy_linear.linear_from_copy(x, (mine,), w16, None)
        torch.testing.assert_close(ym, yr, rtol=0, atol=0)
        yr.backward(gy)
        ym.backward(gy)
        exact += gy.double().t() @ x.detach().to(torch.bfloat16).double()
    assert mine.weight.grad.dtype == torch.float32
    err_mine, err_ref = ((p.weight.grad.double() - exact).abs().max().item() for p in (mine, ref))
    assert err_mine < err_ref / 4, (err_mine, err_ref)


def test_the_heads_float32_weight_gradient_is_summed_in_float32_over_its_chunks(paths):
    """ponder.kernels.head_logprobs with bf16 rows and a float32 head (train.precision=mixed): each chunk's weight
    gradient is added into the float32 sum by the product itself, so the sum over chunks is the exact one of the
    same bf16 gradients to float32's rounding, where a bf16 product a chunk then added was off by bf16's (1e-3)."""
    from ponder.kernels import head_logprobs as fh

    g = torch.Generator(device=DEV).manual_seed(0)
    h = torch.randn((300, 64), generator=g, device=DEV).to(torch.bfloat16).requires_grad_()
    w = torch.randn((1000, 64), generator=g, device=DEV, requires_grad=True)
    t = torch.randint(0, 1000, (300,), generator=g, device=DEV)
    up = torch.randn(300, generator=g, device=DEV)
    lp, _ = fh.head_logprobs(h, w, t, chunk_rows=64, keep=False)
    (grad_w,) = torch.autograd.grad((lp * up).sum(), (w,))
    assert grad_w.dtype == torch.float32
    fast = fh.triton_runs(DEV)
    stats, grad = (fh._triton_stats, fh._triton_grad) if fast else (fh._torch_stats, fh._torch_grad)
    exact = torch.zeros_like(w, dtype=torch.float64)
    for a in range(0, 300, 64):  # the same bf16 gradients of the same chunks' logits, summed in float64
        hc = h.detach()[a : a + 64]
        logits = hc @ w.detach().to(torch.bfloat16).T
        lse = stats(logits, t[a : a + 64], 1.0, False)[0]
        exact += grad(logits, t[a : a + 64], lse, up[a : a + 64].contiguous(), 1.0).double().T @ hc.double()
    err = (grad_w.double() - exact).abs().max().item() / exact.abs().max().item()
    assert err < 1e-5, err
