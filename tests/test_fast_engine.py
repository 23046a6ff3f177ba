"""The fast engine against transformers' generate (greedy, exact tokens), the sampling distribution
(chi-square), and a fresh forward pass (log-probs). CPU, fp32, small random models."""

import random

import pytest
import random_weights
from kv_rounding import fp8_kv_forward, fp8_weights_model
import torch
import torch.nn.functional as F
from transformers import (
    ArceeConfig, ArceeForCausalLM, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, InternLM3Config, LlamaConfig,
    LlamaForCausalLM, Ministral3Config, MinistralConfig, MinistralForCausalLM, MistralConfig, MistralForCausalLM,
    MixtralConfig, MixtralForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config,
    Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, SeedOssConfig,
    SeedOssForCausalLM, SmolLM3Config, SmolLM3ForCausalLM,
)

from ponder.errors import UserError
from ponder.models import load
from ponder.models.tiny import char_tokenizer
from ponder.rollout import SamplingParams, make_engine
from ponder.rollout import fast_model
from ponder.rollout.fast import FastEngine
from ponder.kernels.arch import describe
from ponder.kernels.sampler import cdf_agrees, cdf_pick, row_keys
from ponder.rollout.fast_sampling import process_logits
from ponder.rollout.hf import HFEngine

TOK = char_tokenizer()
SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=len(TOK), max_position_embeddings=256, initializer_range=0.2, pad_token_id=0, eos_token_id=2)


def randomized(model, std=0.15, seed=0):
    """Random norms and biases too, so that every weight the engine reads matters; in eval mode."""
    return random_weights.randomized(model, std, seed).eval()


def seeded(seed, build):
    torch.manual_seed(seed)
    return randomized(build(), seed=seed)


def models():
    yield "tiny-random", load("tiny-random", seed=1)[0]
    yield "tiny-random-micro", randomized(load("tiny-random-micro", seed=2)[0])
    yield "llama", seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)))
    yield "qwen2", seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    yield "qwen3", seeded(1, lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=24, tie_word_embeddings=False)))
    yield "mistral", seeded(0, lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=None)))
    yield "arcee", seeded(0, lambda: ArceeForCausalLM(ArceeConfig(**SMALL, tie_word_embeddings=False)))  # no gate_proj
    # biases on every projection (the default has them on q, k and v); head_dim not hidden / heads
    yield "seed_oss", seeded(0, lambda: SeedOssForCausalLM(SeedOssConfig(
        **SMALL, head_dim=24, attention_out_bias=True, mlp_bias=True, tie_word_embeddings=False)))
    yield "qwen3_moe", seeded(0, moe)
    # one qkv_proj and one gate_up_proj; no window here (Phi-3-mini's 2,047 would send these calls to hf)
    yield "phi3", seeded(0, lambda: Phi3ForCausalLM(Phi3Config(**SMALL, sliding_window=None, tie_word_embeddings=False)))
    yield "olmo2", seeded(0, lambda: Olmo2ForCausalLM(Olmo2Config(**SMALL, tie_word_embeddings=False)))  # norms after blocks
    # layer 1 without rotary embedding (NoPE; the default leaves every fourth so)
    yield "smollm3", seeded(1, lambda: SmolLM3ForCausalLM(SmolLM3Config(**SMALL, no_rope_layers=[1, 0], tie_word_embeddings=False)))
    # every layer "sliding_attention" in layer_types, its window (4,096) beyond these calls
    yield "ministral", seeded(0, lambda: MinistralForCausalLM(MinistralConfig(**SMALL, head_dim=16, tie_word_embeddings=False)))
    # queries scaled by 1 + 0.5 log(1 + floor(position / 8)): past position 8 here, past 16,384 in the real models
    yield "ministral3", seeded(0, lambda: AutoModelForCausalLM.from_config(Ministral3Config(**SMALL, head_dim=16, rope_parameters=dict(
        rope_type="default", rope_theta=1e4, llama_4_scaling_beta=0.5, original_max_position_embeddings=8))))
    yield "mixtral", seeded(0, lambda: MixtralForCausalLM(MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2)))
    # InternLM3: run by transformers' Llama classes under its own model_type; biases on q/k/v, o and the MLP
    yield "internlm3", seeded(0, lambda: AutoModelForCausalLM.from_config(InternLM3Config(**SMALL, qkv_bias=True, bias=True)))


def moe():
    """Qwen3-MoE: layer 0 a block of 4 experts (2 a token), layer 1 a dense MLP (mlp_only_layers)."""
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, head_dim=24, moe_intermediate_size=48, num_experts=4,
                                              num_experts_per_tok=2, mlp_only_layers=[1], tie_word_embeddings=False))


PROMPTS = ["Q: 12+7=", "a", "The quick brown fox jumps", "xyz xyz", "count: 1 2 3 4 5 6 7 8 9"]


def encode(prompts):
    return [TOK.encode(p) for p in prompts]


def set_eos_mid_generation(model, prompts, steps=14):
    """Make EOS a token that greedy decoding emits part-way for some but not all sequences."""
    model.generation_config.eos_token_id = len(TOK) + 5  # never produced: see the whole greedy output
    outs = HFEngine(model, TOK).generate(prompts, SamplingParams(temperature=0, max_tokens=steps))
    seqs = [o[0].token_ids for o in outs]
    for t in [t for s in seqs for t in s[3:10]]:
        hit = [t in s for s in seqs]
        if 0 < sum(hit) < len(seqs):
            model.generation_config.eos_token_id = t
            return t
    raise AssertionError("no token splits the sequences; change the prompts")


@pytest.mark.parametrize("name,model", list(models()), ids=lambda v: v if isinstance(v, str) else "")
def test_greedy_equals_transformers_generate_with_mixed_lengths_and_eos(name, model):
    prompts = encode(PROMPTS)
    eos = set_eos_mid_generation(model, prompts)
    params = SamplingParams(n=2, temperature=0, max_tokens=14)
    ref = HFEngine(model, TOK).generate(prompts, params)
    assert describe(model)[0] is not None, describe(model)[1]  # the fast path itself, not a fallback to HF
    # sync every 2 steps and buckets down to 1: finished rows leave the batch (compaction runs)
    got = FastEngine(model, TOK, sync_every=2, min_bucket=1).generate(prompts, params)
    # the HF engine drops pad tokens from unfinished answers, so the comparison needs answers without them
    assert all(TOK.pad_token_id not in c.token_ids for o in got for c in o)
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in ref]
    assert [[c.finish_reason for c in o] for o in got] == [[c.finish_reason for c in o] for o in ref]
    reasons = {c.finish_reason for o in got for c in o}
    assert reasons == {"stop", "length"}, f"EOS {eos} should end some sequences, not all"
    assert all(c.token_ids[-1] == eos for o in got for c in o if c.finish_reason == "stop")


def test_hf_engine_ignores_the_checkpoints_sampling_settings():
    """A checkpoint's generation_config.json (Qwen2.5-*-Instruct: repetition_penalty 1.05, top_k 20, top_p 0.8)
    must not reach the hf engine's calls: greedy tokens equal the fast engine's, sampled log-probs are the
    policy's log-softmax."""
    model = randomized(load("tiny-random-micro", seed=2)[0])
    model.generation_config.eos_token_id = len(TOK) + 5
    prompts = encode(PROMPTS)
    greedy = SamplingParams(temperature=0, max_tokens=16)
    want = FastEngine(model, TOK).generate(prompts, greedy)
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p, gc.top_k, gc.repetition_penalty = True, 0.7, 0.8, 20, 1.3
    gc.min_p, gc.no_repeat_ngram_size = 0.2, 2
    assert HFEngine(model, TOK).generate(prompts, greedy) == want
    sampled = HFEngine(model, TOK).generate(prompts[:2], SamplingParams(n=2, temperature=1.0, max_tokens=12, logprobs=True, seed=3))
    for p, group in zip(prompts[:2], sampled):
        for c in group:
            with torch.no_grad():
                ref = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
            ref = ref.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4), (c.logprobs, ref)
    assert gc.repetition_penalty == 1.3 and gc.min_p == 0.2  # the model's own config is left as it was


def test_hf_engine_samples_under_min_p_and_scores_the_processed_distribution():
    """rollout.min_p reaches transformers' generate: every sampled token is at least min_p x the most likely one's
    probability, and its log-probability is that of the distribution left after the cut."""
    model = randomized(load("tiny-random-micro", seed=2)[0])
    model.generation_config.eos_token_id = len(TOK) + 5
    prompts = encode(PROMPTS)[:2]
    params = SamplingParams(n=4, temperature=0.1, min_p=0.3, max_tokens=10, logprobs=True, seed=3)
    for p, group in zip(prompts, HFEngine(model, TOK).generate(prompts, params)):
        for c in group:
            with torch.no_grad():
                x = model(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1].float() / 0.1
            probs = x.softmax(-1)
            kept = probs >= 0.3 * probs.amax(-1, keepdim=True)
            assert kept.gather(-1, torch.tensor(c.token_ids)[:, None]).all()
            want = x.masked_fill(~kept, float("-inf")).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert (kept.sum(-1) < x.shape[-1]).all()  # the cut dropped tokens at every step
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def test_stop_strings_match_transformers():
    model = randomized(load("tiny-random-micro", seed=2)[0])
    model.generation_config.eos_token_id = len(TOK) + 5
    prompts = encode(PROMPTS)
    plain = HFEngine(model, TOK).generate(prompts, SamplingParams(temperature=0, max_tokens=20))
    text = TOK.decode(plain[2][0].token_ids[4:7])  # a stop string that appears mid-way in prompt 2's answer
    params = SamplingParams(temperature=0, max_tokens=20, stop=(text,))
    ref = HFEngine(model, TOK).generate(prompts, params)
    for ahead in (False, True):  # the check reads each row's new tokens before the step queued ahead of it runs
        got = FastEngine(model, TOK, sync_every=3, look_ahead=ahead).generate(prompts, params)
        assert [o[0].token_ids for o in got] == [o[0].token_ids for o in ref]
        assert got[2][0].finish_reason == "stop" and TOK.decode(got[2][0].token_ids).endswith(text)


def test_sees_weight_updates_in_place():
    model = randomized(load("tiny-random-micro", seed=2)[0])
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=2, temperature=0, max_tokens=8)
    eng = FastEngine(model, TOK, batch_size=4)  # 3 prompts x 2 samples in 4 rows
    before = eng.generate(prompts, params)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)  # in place, like an optimizer step
    after = eng.generate(prompts, params)
    ref = HFEngine(model, TOK).generate(prompts, params)
    assert [[c.token_ids for c in o] for o in after] == [[c.token_ids for c in o] for o in ref]
    assert after != before


@pytest.mark.parametrize("name,model", [m for m in models() if m[0] in ("llama", "qwen3_moe", "phi3", "olmo2", "smollm3", "mixtral",
                                                                "ministral3")],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_logprobs_match_a_fresh_forward_pass(name, model):
    """Sampled tokens' log-probs against the HF forward over prompt + completion: every layer's arithmetic counts
    (greedy tokens of a small random model can survive a missing norm)."""
    prompts = encode(PROMPTS[:3])
    for temperature in (1.0, 0.7):
        outs = FastEngine(model, TOK).generate(prompts, SamplingParams(n=3, temperature=temperature, max_tokens=10, logprobs=True, seed=5))
        for p, group in zip(prompts, outs):
            for c in group:
                assert len(c.logprobs) == len(c.token_ids) > 0
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1]
                ref = (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
                torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("in_order", [True, False], ids=["rows-in-order", "pool"])
def test_an_fp8_kv_cache_gives_the_logprobs_of_a_forward_over_rounded_keys_and_values(in_order, monkeypatch):
    """kv_dtype fp8: K/V are rounded to e4m3 as they are written. The prompt's prefill attends to its K/V before
    rounding (so the first token's log-prob is the plain forward's); every decode step reads the cache (rounded),
    the prompt's slots included. Both engine layouts on the CPU (rows' K/V in order, or read through the pool's
    block tables as on CUDA); a cache of a quarter the bytes (float32)."""
    if not in_order:
        monkeypatch.setattr(fast_model, "ROW_KV_BYTES", 0)
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    twin = fp8_kv_forward(model)
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, logprobs=True, seed=5)
    eng = FastEngine(model, TOK, kv_dtype="fp8", sync_every=3, min_bucket=1, block_size=4)
    outs = eng.generate(prompts, params)
    assert eng.fwd.kv.dtype == torch.float8_e4m3fn and (eng.fwd.row_kv is not None) == in_order
    plain = FastEngine(model, TOK, sync_every=3, min_bucket=1, block_size=4)
    plain.generate(prompts, params)
    assert eng.cache_bytes() * 4 == plain.cache_bytes()
    off = 0.0
    for p, group in zip(prompts, outs):
        for c in group:
            ids, n = torch.tensor([p + c.token_ids]), len(p)
            with torch.no_grad():
                want = twin(ids, n, eng.fwd.kv_scale)[n - 1 : -1].log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
                exact = model(input_ids=ids).logits[0, n - 1 : -1].log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)
            off = max(off, (torch.tensor(c.logprobs) - exact).abs().max().item())
    assert off > 1e-3  # the rounding shows: the plain forward is not what the engine computed


@pytest.mark.parametrize("in_order", [True, False])
def test_fp8_matrices_give_the_logprobs_of_a_forward_through_fp8_products(in_order, monkeypatch):
    """weight_dtype fp8: q|k|v, o, gate|up and down from e4m3 matrices (a scale per output row) and e4m3 input rows (a
    scale per row), in prefill and decode; the head and the rest as they are. Log-probs of a transformers forward
    whose products compute so, both cache layouts; not those of the plain forward."""
    if not in_order:
        monkeypatch.setattr(fast_model, "ROW_KV_BYTES", 0)
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    twin = fp8_weights_model(model)
    prompts = encode(PROMPTS[:3])
    eng = FastEngine(model, TOK, weight_dtype="fp8", sync_every=3, min_bucket=1, block_size=4)
    outs = eng.generate(prompts, SamplingParams(n=3, temperature=1.0, max_tokens=10, logprobs=True, seed=5))
    assert len(eng.fwd.fp8) == 4 * SMALL["num_hidden_layers"] and eng.rounded == ["weight_dtype=fp8"]
    offs = []
    for p, group in zip(prompts, outs):
        for c in group:
            ids, n = torch.tensor([p + c.token_ids]), len(p)
            with torch.no_grad():
                want = twin(input_ids=ids).logits[0, n - 1 : -1].log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
                exact = model(input_ids=ids).logits[0, n - 1 : -1].log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)
            offs += (torch.tensor(c.logprobs) - exact).abs().tolist()
    assert 1e-3 < sum(offs) / len(offs) < 0.3, offs  # the rounding shows, and stays rounding


def test_an_fp8_product_is_the_plain_product_within_e4m3s_precision():
    """fp8_linear against F.linear itself (not through the same helpers): Gaussian rows and matrices lose about
    3.7% (e4m3 keeps 3 mantissa bits), bf16 0.3%; a scale off by 1.5x would be 50% off. The matrix made in chunks
    of rows, into given storage, is the one made at once."""
    from ponder.kernels.fp8_linear import fp8_linear, fp8_matrix

    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn((96, 320), generator=g) * 0.02, torch.randn(96, generator=g), torch.randn((2, 7, 320), generator=g)
    x[0, 3] = 0.0  # a row of zeros
    got, want = fp8_linear(x, *fp8_matrix(w), b), F.linear(x, w, b)
    err = ((got - want).norm() / (want - b).norm()).item()
    assert 0.01 < err < 0.06, err
    torch.testing.assert_close(got[0, 3], b)
    w8, s = fp8_matrix(w)
    into = (torch.empty_like(w8), torch.empty_like(s))
    fp8_matrix(w, into, chunk=10)
    assert torch.equal(into[0].view(torch.uint8), w8.view(torch.uint8)) and torch.equal(into[1], s)
    assert torch.allclose(w8.float() * s.t(), w, rtol=2**-4, atol=0)  # each entry within e4m3's half step


def test_fp8_matrices_cover_separate_layers_and_name_what_stays_in_bf16(capsys):
    """join_weights off: q, k, v, gate and up are products of their own, each from its e4m3 copy, which gives what
    the joined products give (a row's scales are the same). Qwen3-MoE's expert block stays as it is, and one notice
    says so."""
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, logprobs=True, seed=2)
    build = lambda: seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))  # noqa: E731
    apart = FastEngine(build(), TOK, weight_dtype="fp8", join_weights=False)
    got = apart.generate(prompts, params)
    joined = FastEngine(build(), TOK, weight_dtype="fp8").generate(prompts, params)
    assert len(apart.fwd.fp8) == 7 * SMALL["num_hidden_layers"] and apart.fwd.fp8_left == []
    for a, b in zip(got, joined):
        for ca, cb in zip(a, b):
            assert ca.token_ids == cb.token_ids
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=1e-5)
    assert "weight_dtype fp8" not in capsys.readouterr().err
    eng = FastEngine(seeded(0, moe), TOK, weight_dtype="fp8")
    eng.generate(prompts, params)
    eng.generate(prompts, params)
    err = capsys.readouterr().err
    assert err.count("fast engine: weight_dtype fp8: these products stay in float32: the MLPs (expert blocks, or not "
                     "SwiGLU) (wrapped layers") == 1, err


def test_only_matrices_large_enough_to_pay_go_through_e4m3(monkeypatch, capsys):
    """On CUDA small products lost to e4m3 (FP8_MIN_PARAMS): with the floor between these matrices' sizes (q|k|v
    8,192 parameters, o 4,096, gate|up 20,480, down 10,240), gate|up and down alone get copies; no notice (the rest
    stays by design). The KV pool's size is chosen leaving room for those copies alone (on CUDA the rest was
    counted too: 360 MB kept from the 0.5B model's pool for copies it never makes)."""
    monkeypatch.setitem(fast_model.FP8_MIN_PARAMS, "cpu", 10_000)
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    eng = FastEngine(model, TOK, weight_dtype="fp8")
    room = []
    cap = eng.pool_cap
    monkeypatch.setattr(eng, "pool_cap", lambda per_block, device, less=0: room.append(less) or cap(per_block, device, less))
    eng.generate(encode(PROMPTS[:2]), SamplingParams(n=2, temperature=1.0, max_tokens=4, seed=1))
    assert sorted(w.numel() for w, _, _ in eng.fwd.fp8.values()) == [10_240, 10_240, 20_480, 20_480]
    assert room[0] == sum(w8.numel() * w8.element_size() + s.numel() * 4 for _, w8, s in eng.fwd.fp8.values()) == 64_512
    assert "weight_dtype fp8" not in capsys.readouterr().err


def test_fp8_matrices_follow_the_weights_after_they_change():
    """The e4m3 copies are made again at each call: after an in-place change of the weights (an optimizer step),
    the engine samples what a fresh engine over the new weights does."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, logprobs=True, seed=3)
    eng = FastEngine(model, TOK, weight_dtype="fp8")
    before = eng.generate(prompts, params)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.mul_(1.3)
    after = eng.generate(prompts, params)
    fresh = FastEngine(model, TOK, weight_dtype="fp8").generate(prompts, params)
    got = lambda outs: [[(c.token_ids, c.logprobs) for c in g] for g in outs]  # noqa: E731
    assert got(after) == got(fresh) and got(after) != got(before)


def test_with_an_fp8_cache_a_sequence_that_gives_way_samples_what_it_would_have():
    """A sequence that gives way is prefilled again from its prompt and tokens; those tokens were decoded reading
    the rounded cache, so their positions must attend to rounded K/V again (they attended to K/V as computed, and
    later tokens and log-probs moved). A pool that holds few sequences against one that holds all: the same tokens,
    and log-probs of the forward over rounded K/V."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    twin = fp8_kv_forward(model)
    prompts = encode(LONGER)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, logprobs=True, seed=3)
    runs = {}
    for pool in (None, 24):
        eng = FastEngine(model, TOK, batch_size=4, sync_every=2, min_bucket=1, block_size=4, kv_blocks=pool,
                         start_tokens=2, kv_dtype="fp8")
        runs[pool] = eng.generate(prompts, params)
        assert (eng.stats["gave_way"] > 0) == (pool is not None)
    tokens = {pool: [[c.token_ids for c in g] for g in outs] for pool, outs in runs.items()}
    assert tokens[24] == tokens[None]
    for p, group in zip(prompts, runs[24]):
        for c in group:
            ids, n = torch.tensor([p + c.token_ids]), len(p)
            with torch.no_grad():
                want = twin(ids, n, eng.fwd.kv_scale)[n - 1 : -1].log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def odd_token_model(weight: float):
    """A model in which one token (not in PROMPTS[:3]) alone has keys along one direction, of about `weight` x 8 in
    layer 0 (its embedding normed to 8 there, k_proj's column `weight`); the others' keys are of order 1."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    odd = next(t for t in range(3, len(TOK)) if all(t not in p for p in encode(PROMPTS[:3])))
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 0.0  # the direction only this token takes
        model.model.embed_tokens.weight[odd] = 0.0
        model.model.embed_tokens.weight[odd, 5] = 50.0
        model.model.layers[0].self_attn.k_proj.weight[:, 5] = weight
    return model, odd


def test_keys_past_what_the_fp8_scales_leave_room_for_are_noticed_once(capsys):
    """A call's first prefill sets the fp8 cache's scales with room for 4x its largest keys and values; a prompt
    prefilled later (the shortest, by itself) whose keys pass that is clamped: one notice, however many calls.
    Measured against the scales, not e4m3's 448: keys of about 40 here, where the first prompts' are about 2. (One
    token each: no decode step, which would write the odd token's keys too where it is sampled, as this model often
    does.)"""
    model, odd = odd_token_model(5.0)
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=2, temperature=1.0, max_tokens=1, seed=1)
    FastEngine(model, TOK, kv_dtype="fp8", prefill_tokens=1).generate(prompts, params)
    assert "kv_dtype fp8" not in capsys.readouterr().err
    loud = FastEngine(model, TOK, kv_dtype="fp8", prefill_tokens=1)
    for _ in range(2):
        loud.generate(prompts + [[odd]], params)
    err = capsys.readouterr().err
    assert err.count("fast engine: kv_dtype fp8: keys or values up to") == 1, err
    assert "the largest of a call's first prompts passed the cache's range (4x" in err
    assert "were clamped; this model's rollouts need kv_dtype auto" in err


def test_keys_of_generated_tokens_past_the_fp8_range_are_noticed(capsys):
    """The decode step's writes are watched too: prompts without the odd token set small scales, then every step
    generates it (greedy; only its logit is not zero) and its keys, about 20x the prompts' largest, are clamped."""
    model, odd = odd_token_model(5.0)
    with torch.no_grad():  # the last norm keeps dimension 5 alone, where only the odd token's embedding is not zero,
        model.model.norm.weight.zero_()[5] = 1.0  # and layer 1's attention writes 100 there for every token (v bias)
        attn = model.model.layers[1].self_attn
        attn.v_proj.bias.fill_(1.0)
        attn.o_proj.weight[5] = 100.0 / attn.o_proj.weight.shape[1]
    outs = FastEngine(model, TOK, kv_dtype="fp8").generate(encode(PROMPTS[:3]), SamplingParams(temperature=0, max_tokens=3))
    assert all(c.token_ids == [odd] * 3 for g in outs for c in g)
    assert "fast engine: kv_dtype fp8: keys or values up to" in capsys.readouterr().err


def test_keys_past_448_in_every_prompt_are_scaled_not_clamped(capsys):
    """Keys of about 8,000 in every prompt (a k_proj bias): the scales take them in; no notice, and the log-probs of
    a forward reading K/V through the scaled cache."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.bias[3] = 8000.0
    twin = fp8_kv_forward(model)
    prompts = encode(PROMPTS[:3])
    eng = FastEngine(model, TOK, kv_dtype="fp8")
    outs = eng.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=6, logprobs=True, seed=2))
    assert "kv_dtype fp8" not in capsys.readouterr().err
    assert eng.fwd.kv_scale[1, 0] > 8000 / 112 * 0.99
    for p, group in zip(prompts, outs):
        for c in group:
            ids, n = torch.tensor([p + c.token_ids]), len(p)
            with torch.no_grad():
                want = twin(ids, n, eng.fwd.kv_scale)[n - 1 : -1].log_softmax(-1).gather(-1, ids[0, n:, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)


def test_each_call_sets_its_own_fp8_scales():
    """A call's scales come from its own first prompts, not the engine's first call's: after a call whose keys were
    large, the same engine generates what a fresh one does."""
    model, odd = odd_token_model(100.0)
    params = SamplingParams(n=2, temperature=1.0, max_tokens=8, logprobs=True, seed=4)
    prompts = encode(PROMPTS[:3])
    eng = FastEngine(model, TOK, kv_dtype="fp8")
    eng.generate(prompts + [[odd]], params)
    large = eng.fwd.kv_scale.clone()
    again = eng.generate(prompts, params)
    fresh = FastEngine(model, TOK, kv_dtype="fp8")
    want = fresh.generate(prompts, params)
    assert large[0, 0] > 10 * fresh.fwd.kv_scale[0, 0]
    assert torch.equal(eng.fwd.kv_scale, fresh.fwd.kv_scale)
    assert [[(c.token_ids, c.logprobs) for c in g] for g in again] == [[(c.token_ids, c.logprobs) for c in g] for g in want]


def test_an_unknown_kv_dtype_is_named():
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    with pytest.raises(UserError, match="fast engine: kv_dtype must be one of auto, fp8, got 'int4'"):
        FastEngine(model, TOK, kv_dtype="int4")
    with pytest.raises(UserError, match="fast engine: weight_dtype must be one of auto, fp8, got 'bf16'"):
        FastEngine(model, TOK, weight_dtype="bf16")


def test_an_fp8_cache_on_a_gpu_without_e4m3_kernels_is_refused(monkeypatch):
    """Triton compiles e4m3 only from compute capability 8.9 (an A100 is 8.0): one line before the first step fails."""
    from ponder.rollout.fast import check_fp8

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (8, 0))
    with pytest.raises(UserError, match=r"kv_dtype fp8 needs a GPU of compute capability 8.9 or later .* "
                                        r"NVIDIA A100-SXM4-80GB is 8.0: use rollout.engine_options.kv_dtype=auto"):
        check_fp8("cuda")
    with pytest.raises(UserError, match=r"fast engine: weight_dtype fp8 needs a GPU of compute capability 8.9 .* "
                                        r"use rollout.engine_options.weight_dtype=auto"):
        check_fp8("cuda", "weight_dtype")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    check_fp8("cuda")  # an H100
    check_fp8("cuda", "weight_dtype")
    check_fp8("cuda", "kv_dtype", torch.float16)  # the cache follows any compute dtype
    with pytest.raises(UserError, match=r"^fast engine: weight_dtype fp8 computes its products in bf16 on CUDA, and this "
                                        r"rollout runs in torch.float16: use rollout.engine_options.dtype=auto or bf16, "
                                        r"or weight_dtype=auto$"):
        check_fp8("cuda", "weight_dtype", torch.float16)
    check_fp8("cpu")
    check_fp8("cpu", "weight_dtype", torch.float32)  # the CPU's products cast e4m3 back to any dtype


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (0.7, 0.8), (0, 1.0)])
def test_entropies_match_a_fresh_forward_pass(temperature, top_p):
    """Each token's entropy, asked of the engine, is that of the HF forward's distribution at the temperature (1 when
    greedy) over the whole vocabulary, whatever top-p keeps: what the trainer logs, taken from the rollout. Not
    asked, none is returned."""
    model = load("tiny-random", seed=2)[0]
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, max_tokens=10, seed=5, entropies=True)
    outs = FastEngine(model, TOK).generate(prompts, params)
    for p, group in zip(prompts, outs):
        for c in group:
            assert c.logprobs is None and len(c.entropies) == len(c.token_ids) > 0
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1]
            logp = (logits / (temperature or 1.0)).log_softmax(-1)
            torch.testing.assert_close(torch.tensor(c.entropies), -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=1e-4)
    assert FastEngine(model, TOK).generate(prompts[:1], SamplingParams(max_tokens=4))[0][0].entropies is None


def test_seed_fixes_samples():
    model = load("tiny-random", seed=1)[0]
    eng = FastEngine(model, TOK)
    prompts = encode(PROMPTS[:2])
    a = eng.generate(prompts, SamplingParams(n=3, max_tokens=6, seed=11))
    b = eng.generate(prompts, SamplingParams(n=3, max_tokens=6, seed=11))
    c = eng.generate(prompts, SamplingParams(n=3, max_tokens=6, seed=12))
    assert a == b and a != c
    # runs split by batch_size draw fresh noise: the same prompt in two runs gets different samples
    split = FastEngine(model, TOK, batch_size=3).generate([prompts[0]] * 2, SamplingParams(n=3, max_tokens=12, seed=11))
    assert [c.token_ids for c in split[0]] != [c.token_ids for c in split[1]]


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test over the categories with positive expected count."""
    n = counts.sum()
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a token the distribution excludes"
    exp = probs[keep] * n
    stat = ((counts[keep] - exp) ** 2 / exp).sum()
    df = keep.sum() - 1
    return torch.special.gammaincc(df / 2, stat / 2).item()


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0), (0.6, 0, 1.0, 0), (0.7, 6, 1.0, 0), (1.3, 0, 0.8, 0),
                                                          (0.9, 8, 0.9, 0), (1.0, 0, 1.0, 0.3), (1.2, 9, 0.95, 0.2)])
def test_samples_follow_the_processed_distribution(temperature, top_k, top_p, min_p):
    cfg = dict(SMALL, vocab_size=12, initializer_range=0.15)
    model = seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False)))
    model.generation_config.eos_token_id = 99  # outside the vocabulary: every sample has 2 tokens
    prompt = [3, 5, 7]
    n = 3000
    params = SamplingParams(n=n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, max_tokens=2, seed=1)
    (outs,) = FastEngine(model, TOK).generate([prompt], params)
    first = torch.tensor([c.token_ids[0] for c in outs])

    def expected(prefix):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prefix])).logits[0, -1]
        x = (logits / temperature).double()
        if top_k:
            x[x < x.topk(top_k).values[-1]] = float("-inf")
        if top_p < 1:  # by hand: keep the most likely tokens until their mass reaches top_p
            p = x.softmax(-1)
            order = p.argsort(descending=True)
            mass = p[order].cumsum(0)
            keep = torch.zeros_like(p, dtype=torch.bool)
            keep[order[: int((mass < top_p).sum()) + 1]] = True
            x[~keep] = float("-inf")
        if min_p:  # by hand: drop what is less likely than min_p x the most likely token
            p = x.softmax(-1)
            x[p < min_p * p.max()] = float("-inf")
        return x.softmax(-1)

    probs = expected(prompt)
    assert (probs > 0.05).sum() >= 3, "the test needs a spread-out distribution"
    assert chi2_pvalue(torch.bincount(first, minlength=12).double(), probs) > 1e-3
    # power: the same samples are rejected against the unprocessed distribution when it differs
    if temperature != 1.0 or top_k or top_p < 1 or min_p:
        with torch.no_grad():
            raw = model(input_ids=torch.tensor([prompt])).logits[0, -1].double().softmax(-1)
        counts = torch.bincount(first, minlength=12).double()
        stat = ((counts - raw * n) ** 2 / (raw * n)).sum()
        assert torch.special.gammaincc(torch.tensor(11 / 2), stat / 2).item() < 1e-6
    # the second token, drawn in a decode step, given the most frequent first token
    t0 = int(torch.bincount(first).argmax())
    second = torch.tensor([c.token_ids[1] for c in outs if c.token_ids[0] == t0])
    assert chi2_pvalue(torch.bincount(second, minlength=12).double(), expected(prompt + [t0])) > 1e-3


def test_cdf_sampler_follows_the_distribution_and_never_draws_excluded_tokens():
    """cdf_pick (the reference of CUDA's sampler): 6,000 rows of one distribution with excluded tokens
    (-inf, one of them last), each row its own key; frequencies by chi-square, log-probs and entropy by hand."""
    x = torch.tensor([1.0, float("-inf"), 0.2, 2.0, -0.5, 1.5, float("-inf")])
    n = 6000
    keys = row_keys(torch.tensor(7), torch.tensor(2), torch.arange(n))
    tok, lp, ent = cdf_pick(x.expand(n, -1), keys, 0.8)
    probs = (x.double() * 0.8).softmax(-1)
    h = -sum(p * p.log() for p in probs if p > 0).item()  # the excluded tokens add nothing (not NaN)
    torch.testing.assert_close(ent.double(), torch.full((n,), h, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    assert chi2_pvalue(torch.bincount(tok, minlength=7).double(), probs) > 1e-3
    torch.testing.assert_close(lp.double(), probs[tok].log(), atol=1e-5, rtol=1e-5)
    assert cdf_agrees(x.expand(n, -1), keys, 0.8, tok, lp, ent, tol=1e-6)  # each draw where the CDF crosses its uniform


def test_process_logits_matches_transformers_warpers():
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = TopPLogitsWarper(0.85)(None, TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.8)(None, x.clone())))
    torch.testing.assert_close(process_logits(x, 0.8, 20, 0.85), ref)
    for min_p in (0.05, 0.3):  # after top-k and top-p, in transformers' order; and alone
        torch.testing.assert_close(process_logits(x, 0.8, 20, 0.85, min_p), MinPLogitsWarper(min_p)(None, ref.clone()))
        alone = MinPLogitsWarper(min_p)(None, TemperatureLogitsWarper(1.3)(None, x.clone()))
        torch.testing.assert_close(process_logits(x, 1.3, 0, 1.0, min_p), alone)
        assert 1 < int(alone[0].isfinite().sum()) < 50  # the cut drops some tokens and keeps more than one


@pytest.mark.parametrize("kind", ["gpt2", "phi3-partial-rotary", "phi3-longrope"])
def test_other_architectures_fall_back_to_hf_with_a_notice(capsys, kind):
    """Another architecture, or a known family with rotary embedding over part of each head (Phi-4-mini's
    partial_rotary_factor) or with frequencies that follow the sequence's length (LongRoPE), goes to
    transformers' generate, with the reason printed once."""
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(TOK), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
        why = "architecture 'gpt2'"
    elif kind == "phi3-partial-rotary":
        model = seeded(0, lambda: Phi3ForCausalLM(Phi3Config(**SMALL, sliding_window=None, partial_rotary_factor=0.5)))
        why = "rotary embedding over 8 of the head's 16 dimensions (partial_rotary_factor) is not supported"
    else:  # Phi-3.5-mini's scaling: short factors up to the original length, long ones past it
        scaling = dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8)
        model = seeded(0, lambda: Phi3ForCausalLM(Phi3Config(**SMALL, sliding_window=None, rope_scaling=scaling,
                                                             original_max_position_embeddings=64)))
        why = "rotary scaling 'longrope' changes with the sequence's length"
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    eng = make_engine("fast", model, TOK)
    assert why in capsys.readouterr().err
    prompts = encode(PROMPTS[:2])
    params = SamplingParams(temperature=0, max_tokens=5)
    assert eng.generate(prompts, params) == HFEngine(model, TOK).generate(prompts, params)
    make_engine("fast", model, TOK, kv_dtype="fp8", weight_dtype="fp8")  # asked for: the notice says they do not apply
    err = capsys.readouterr().err
    assert why in err and "; using the hf engine; not applied there: kv_dtype=fp8, weight_dtype=fp8" in err


def test_the_fallback_to_transformers_keeps_the_cap_on_rows_decoded_at_once(monkeypatch):
    """rollout.generation_batch (`ponder sample`'s batch_size) bounds the sequences the fast engine decodes at once; its
    fallback to transformers was built with the default 256, so that bound went where memory is shortest."""
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(TOK), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    calls = []
    real = HFEngine._batch
    monkeypatch.setattr(HFEngine, "_batch", lambda self, prompts, params: calls.append(len(prompts)) or real(self, prompts, params))
    make_engine("fast", model, TOK, batch_size=3).generate(encode(PROMPTS[:2]), SamplingParams(n=4, max_tokens=2, seed=0))
    assert calls == [3, 3, 2]


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_lora_wrapped_policy_generates_like_transformers(family):
    """Phi-3: the default targets' names map to its fused qkv_proj and gate_up_proj (ponder.models.lora_targets),
    each one LoRA layer the engine calls as it is."""
    peft = pytest.importorskip("peft")
    from ponder.models import lora_targets

    base = seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)) if family == "llama"
                  else Phi3ForCausalLM(Phi3Config(**SMALL, sliding_window=None, tie_word_embeddings=False)))
    targets = lora_targets(base, ["q_proj", "v_proj", "up_proj"])
    assert targets == (["q_proj", "v_proj", "up_proj"] if family == "llama" else ["qkv_proj", "gate_up_proj"])
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.eval()
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=2, temperature=0, max_tokens=10)
    got = make_engine("fast", model, TOK).generate(prompts, params)
    assert got == HFEngine(model, TOK).generate(prompts, params)
    with model.disable_adapter():  # the adapters matter: without them the answers differ
        assert HFEngine(model, TOK).generate(prompts, params) != got


def test_lora_rollout_copy_merges_adapters_into_plain_matrices():
    """The bf16 rollout copy of a LoRA model has no adapter layers: each adapted matrix is base + scaling * B @ A,
    so it generates what the merged model's own bf16 copy generates, and follows the adapters when they move."""
    import copy

    peft = pytest.importorskip("peft")
    base = seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(0, 0.3)
    model.eval()
    prompts, params = encode(PROMPTS[:3]), SamplingParams(n=2, temperature=0, max_tokens=10)

    def merged_answers():
        plain = copy.deepcopy(model).merge_and_unload()
        return FastEngine(plain, TOK, dtype="bf16").generate(prompts, params)

    eng = FastEngine(model, TOK, dtype="bf16")
    got = eng.generate(prompts, params)
    assert not any(hasattr(m, "lora_A") for m in eng.copy.shadow.modules())  # plain products only
    assert len(eng.copy.merges) == 2 * 3  # q, v and up of both layers
    assert got == merged_answers()
    with torch.no_grad():  # as an optimizer step moves the adapters (an in-place write: the copy sees it)
        for p in lora_b:
            p.mul_(-1.0)
    again = eng.generate(prompts, params)
    assert again == merged_answers() and again != got


def test_lora_rollout_copy_follows_adapters_switched_off_and_on():
    """peft's disable_adapter and merge_adapter write no adapter tensor, yet change what the model computes: a
    reused engine's copy follows them (before, it kept sampling with the adapters merged in while they were off,
    and a copy first made with them off never took them back)."""
    import copy

    peft = pytest.importorskip("peft")
    base = seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.eval()
    prompts, params = encode(PROMPTS[:3]), SamplingParams(n=2, temperature=0, max_tokens=10)
    on = FastEngine(copy.deepcopy(model).merge_and_unload(), TOK, dtype="bf16").generate(prompts, params)
    off = FastEngine(copy.deepcopy(model).unload(), TOK, dtype="bf16").generate(prompts, params)
    assert on != off

    eng = FastEngine(model, TOK, dtype="bf16")
    assert eng.generate(prompts, params) == on
    with model.disable_adapter():
        assert eng.generate(prompts, params) == off
    assert eng.generate(prompts, params) == on

    late = FastEngine(model, TOK, dtype="bf16")  # its copy made while the adapters are off
    with model.disable_adapter():
        assert late.generate(prompts, params) == off
    assert late.generate(prompts, params) == on

    model.merge_adapter()  # the base now holds the adapters: added once, not twice
    assert eng.generate(prompts, params) == on
    with model.disable_adapter():
        assert eng.generate(prompts, params) == off


def test_lora_on_the_embedding_is_merged_into_a_table_of_the_copys_own():
    """An adapted embed_tokens (untied model): the copy looks up rows of base + B @ A in the master's dtype, as
    merge_and_unload's model does; before, peft's embedding layer ran in the copy under autocast and the rollout
    drifted from the trainer's scores (up to 0.12 in log-prob). The master's table is left alone."""
    import copy

    peft = pytest.importorskip("peft")
    base = seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_embedding_A" in n or "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    table = model.get_input_embeddings().base_layer.weight.clone()
    prompts, params = encode(PROMPTS[:3]), SamplingParams(n=2, temperature=0, max_tokens=10)
    eng = FastEngine(model, TOK, dtype="bf16")
    got = eng.generate(prompts, params)
    assert not any(hasattr(m, "lora_A") for m in eng.copy.shadow.modules())
    merged = FastEngine(copy.deepcopy(model).merge_and_unload(), TOK, dtype="bf16")
    assert got == merged.generate(prompts, params)
    assert eng.copy.shadow.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(model.get_input_embeddings().base_layer.weight, table)


def test_lora_rollout_copy_of_a_bf16_base_leaves_the_base_alone():
    """A base already in the rollout dtype (LoRA over bf16 weights; the sharded trainer's bf16 rollout copy): the
    merged matrices are the copy's own, not the base's storage, so refreshes do not add the adapters to the frozen
    base again and again (they did: the copy shared the base's bf16 matrix and merged into it)."""
    from ponder.rollout.fast import RolloutCopy

    peft = pytest.importorskip("peft")
    base = seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False))).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:  # float32 adapters over the bf16 base, as peft trains them
                p.data = p.data.float()
            if "lora_B" in n:
                p.normal_(0, 0.3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    copy = RolloutCopy(model, torch.bfloat16)
    for _ in range(2):  # as after two optimizer steps
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(1.5)
        assert copy.refresh()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if "lora_" not in n)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    want = (layer.base_layer.weight.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    assert torch.equal(copy.shadow.get_base_model().model.layers[0].self_attn.q_proj.weight, want)


def test_rollout_copy_refreshed_with_gradients_on_stays_out_of_autograd():
    """A refresh called where gradients are recorded (the trainer's update asks for the copies) copies the masters in
    and leaves the copy a set of plain tensors: no gradient wanted, no graph back to the masters."""
    from ponder.rollout.fast import RolloutCopy

    model = seeded(0, lambda: LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=False)))
    copy = RolloutCopy(model, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # in place, as an optimizer step
    with torch.enable_grad():
        assert copy.refresh()
    for master, mine in copy.pairs:
        assert torch.equal(mine, master.detach().to(torch.bfloat16))
        assert not mine.requires_grad and mine.grad_fn is None


WINDOWED = {  # families whose every layer attends within config.sliding_window whenever it is set
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=12)),
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, head_dim=24, moe_intermediate_size=48, num_experts=4,
                                                          num_experts_per_tok=2, use_sliding_window=True, sliding_window=12)),
    "ministral3": lambda: AutoModelForCausalLM.from_config(Ministral3Config(**SMALL, head_dim=16, sliding_window=12)),
}


@pytest.mark.parametrize("family", WINDOWED)
def test_calls_past_a_sliding_window_go_to_hf(capsys, family):
    model = seeded(0, WINDOWED[family])
    assert describe(model)[0].window == 12
    model.generation_config.eos_token_id = len(TOK) + 5
    eng = FastEngine(model, TOK)
    prompts = encode(PROMPTS[:2])
    short = SamplingParams(temperature=0, max_tokens=3)  # 8 + 3 positions: within the window
    assert eng.generate(prompts, short) == HFEngine(model, TOK).generate(prompts, short)
    assert capsys.readouterr().err == ""
    long = SamplingParams(temperature=0, max_tokens=10)
    assert eng.generate(prompts, long) == HFEngine(model, TOK).generate(prompts, long)
    assert "exceed the sliding window (12); using the hf engine" in capsys.readouterr().err


def test_user_mistakes_are_named():
    model = load("tiny-random", seed=1)[0]
    with pytest.raises(UserError, match="prompt is empty"):
        FastEngine(model, TOK).generate([[]], SamplingParams())
    with pytest.raises(UserError, match="attention must be"):
        FastEngine(model, TOK, attention="flash")


def test_int32_hash_gives_the_bits_of_lowbias32():
    from ponder.kernels.sampler import hash32, to_i32

    def lowbias32(x):  # Wellons' mixer on Python ints
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9, 123456789] + torch.randint(0, 2**32, (200,)).tolist()
    got = hash32(to_i32(torch.tensor(xs)))
    assert got.dtype == torch.int32
    assert [v & 0xFFFFFFFF for v in got.tolist()] == [lowbias32(x) for x in xs]

    # the CPU's keys and uniforms (numpy on uint32) against the same mixer on Python ints, from the documented
    # recipe: key = h(h(seed + step * 0x9E3779B9) ^ seq * 0x85EBCA6B), uniform = (h(h(key + id) ^ key) >> 8 + 0.5) / 2**24
    from ponder.kernels.sampler import _uniforms, row_keys

    M = 0xFFFFFFFF
    seed, steps, seqs = 0xDEADBEEF12, torch.tensor([0, 1, 7, 4095]), torch.tensor([0, 5, 2**20, 3])
    keys = row_keys(torch.tensor(seed), steps, seqs)
    want = [lowbias32(lowbias32((seed + t * 0x9E3779B9) & M) ^ ((s * 0x85EBCA6B) & M)) for t, s in zip(steps.tolist(), seqs.tolist())]
    assert keys.dtype == torch.int32 and [k & M for k in keys.tolist()] == want
    u = _uniforms(keys, 70, torch.device("cpu"))
    ref = [[((lowbias32(lowbias32((k + i) & M) ^ k) >> 8) + 0.5) / 2**24 for i in range(70)] for k in want]
    assert u.dtype == torch.float32 and torch.equal(u, torch.tensor(ref, dtype=torch.float32))


def test_triton_attention_option_generates_like_transformers():
    """attention='triton' (on CPU: the kernel's torch reference) through the whole engine, GQA, mixed lengths."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    prompts = encode(PROMPTS)
    set_eos_mid_generation(model, prompts)
    params = SamplingParams(n=2, temperature=0, max_tokens=14)
    eng = FastEngine(model, TOK, sync_every=2, min_bucket=1, attention="triton")
    got = eng.generate(prompts, params)
    assert eng.fwd.attention == "triton"
    assert got == HFEngine(model, TOK).generate(prompts, params)


TRITON_CHILD = """
import sys, torch
from ponder.kernels.rope_store import triton_rope_store
from ponder.kernels.sampler import triton_cdf_pick
inp = torch.load(sys.argv[1])
picks = [triton_cdf_pick(inp["logits"], inp["keys"], t, splits=3, block=256) for t in (1.0, 1 / 0.7)]
q, k, v, cos, sin, pos, cache, table = inp["rope"]
cache8 = cache.to(torch.float8_e4m3fn)  # kv_dtype fp8: the write divides by the scales and rounds to e4m3
peaks = torch.tensor([0.5, 1000.0])  # the largest |value| stored is watched: raised past 0.5, 1000 kept
for peak in peaks:
    triton_rope_store(q, k, v, cos, sin, pos, cache8[1], table, torch.tensor([0.5, 4.0]), peak)
q = triton_rope_store(q, k, v, cos, sin, pos, cache[1], table)
torch.save(dict(picks=picks, q=q, cache=cache, cache8=cache8, peaks=peaks), sys.argv[2])
"""


def sampler_case():
    logits = torch.randn(6, 1500, generator=torch.Generator().manual_seed(0)) * 3
    return logits, row_keys(torch.tensor(3), torch.tensor(4), torch.arange(6))


def rope_case():
    """Qwen3-like odd head dim (24), 14 query heads over 2 kv heads, q rows strided, mixed positions; a paged
    cache of 9 blocks of 8 slots, rows' tables scattered over it."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn((3, 14 * 24 + 5), generator=g)[:, : 14 * 24].view(3, 14, 24)
    k, v = torch.randn((3, 2, 24), generator=g), torch.randn((3, 2, 24), generator=g)
    ang = torch.rand((40, 12), generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    table = torch.tensor([[3, 0, 0, 0, 0], [1, 2, 4, 5, 6], [7, 0, 8, 0, 0]])  # slot 39 of row 1: block 6; 17 of row 2: 8
    return q, k, v, cos, sin, torch.tensor([0, 39, 17]), torch.zeros((2, 2, 9, 2, 8, 24)), table


def test_triton_sampler_and_rotary_cache_write_match_the_torch_pieces(tmp_path, triton_interpreter):
    """The Triton sampler and rotary + cache write (CUDA's defaults when they pass their trials), run by
    Triton's interpreter in a child process (the interpreter must be on before Triton is imported)."""
    from ponder.kernels.rope import rope_kv

    logits, keys = sampler_case()
    inp, out = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(dict(logits=logits, keys=keys, rope=rope_case()), inp)
    done = triton_interpreter(["-c", TRITON_CHILD, str(inp), str(out)], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(out)
    for (tok, lp, ent), t in zip(got["picks"], (1.0, 1 / 0.7)):
        ref_tok, ref_lp, ref_ent = cdf_pick(logits, keys, t)
        assert torch.equal(tok, ref_tok)
        assert cdf_agrees(logits, keys, t, tok, lp, ent, tol=1e-6)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lp, (logits * t).log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1), atol=1e-5, rtol=1e-5)
    q, k, v, cos, sin, pos, cache, table = rope_case()
    ref_q, kv = rope_kv(q, k, v, cos[pos][:, None], sin[pos][:, None])
    cache[1][:, table[torch.arange(3), pos // 8], :, pos % 8] = kv
    torch.testing.assert_close(got["q"], ref_q)
    torch.testing.assert_close(got["cache"], cache)  # the right slots written, nothing else touched
    # into an fp8 cache: the same values rounded to nearest e4m3 (as torch rounds them), nothing else touched.
    # Except where rounding carries into the exponent (a mantissa past 1.9375) and among subnormals (below 2^-6):
    # Triton 3.9's interpreter rounds those wrong (1.97 -> 1.0, 0.0029 -> 0.00195; the GPU's conversion does
    # not), so those slots are left to tests/test_cuda_paths.py
    assert got["cache8"].dtype == torch.float8_e4m3fn
    scaled = cache / torch.tensor([0.5, 4.0]).view(1, 2, 1, 1, 1, 1)  # K / 0.5, V / 4
    mantissa = scaled.abs() / 2 ** scaled.abs().log2().floor()
    sure = (scaled == 0) | ((mantissa <= 1.9375) & (scaled.abs() >= 2**-6))
    assert sure.float().mean() > 0.5 and (scaled != 0).any()
    want = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(got["cache8"].view(torch.uint8)[sure], want[sure])
    assert scaled.abs().max() > 0.5
    torch.testing.assert_close(got["peaks"], torch.stack([scaled.abs().max(), torch.tensor(1000.0)]))


def test_idle_cache_lent_out_and_scribbled_over_changes_no_output():
    """The trainer writes its logits into the engine's cache between rollouts (idle_memory); the next call
    must generate exactly what it would have, even after bytes that read as NaN."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    eng = FastEngine(model, TOK, sync_every=2, min_bucket=1)
    assert eng.idle_memory() is None  # nothing allocated before the first call
    params = SamplingParams(n=2, temperature=0.8, max_tokens=12, seed=3, logprobs=True)
    first = eng.generate(encode(PROMPTS), params)
    idle = eng.idle_memory()
    assert idle.numel() == eng.fwd.kv.numel() * eng.fwd.kv.element_size()
    idle.fill_(255)  # all bits set: NaN as float32
    again = eng.generate(encode(PROMPTS), params)
    assert [[c.token_ids for c in o] for o in again] == [[c.token_ids for c in o] for o in first]
    assert [[c.logprobs for c in o] for o in again] == [[c.logprobs for c in o] for o in first]


def test_a_piece_the_compiler_fails_on_runs_eagerly_with_one_notice(capsys):
    from ponder.kernels.trials import compile_each

    def broken(x):
        raise RuntimeError("not compilable here")

    got = compile_each({"broken": broken}, {"broken": (torch.ones(3, requires_grad=True),)}, "probe", backward=True)
    assert got["broken"] is broken
    assert "ponder: probe: torch.compile failed for broken (" in capsys.readouterr().err


def test_trials_chosen_inside_a_no_grad_pass_still_check_gradients(monkeypatch, capsys):
    """The packed pass picks its pieces at its first call. With beta > 0 or mu > 1 that call scores without
    gradients (the reference model, old log-probs), and every trial's backward failed there: on one H100 the whole
    run then went unfused, with padded attention ("element 0 of tensors does not require grad")."""
    from ponder.kernels import trials
    from ponder.kernels.norm import rms

    def needs_grad():
        a = torch.ones(3, requires_grad=True)
        (a * 2).sum().backward()
        return bool(a.grad.eq(2).all())

    monkeypatch.setattr(trials, "triton", object())  # as if installed, so the trial runs
    with torch.no_grad():
        x, w = torch.randn(4, 8, requires_grad=True), torch.rand(8, requires_grad=True)
        got = trials.compile_each({"rms": rms}, {"rms": (x, w, 1e-6)}, "probe", backward=True)
        assert trials.trial(needs_grad, "failed", "probe")
    assert capsys.readouterr().err == ""
    assert torch.allclose(got["rms"](x, w, 1e-6), rms(x, w, 1e-6))


def test_a_compiled_piece_past_the_recompile_limit_goes_eager_with_one_notice(capsys):
    """Each new dtype a compiled piece meets is a new graph; past torch's recompile limit, fullgraph=True raised
    (on one H100: FailOnRecompileLimitHit in the packed pass of the sixth model family checked in one process)."""
    import torch._dynamo
    from ponder.kernels.norm import rms
    from ponder.kernels.trials import compile_each

    torch._dynamo.reset()
    x, w = torch.randn(4, 8), torch.rand(8)
    with torch._dynamo.config.patch(recompile_limit=1):
        piece = compile_each({"rms": rms}, {"rms": (x, w, 1e-6)}, "probe")["rms"]
        assert capsys.readouterr().err == ""
        for _ in range(2):  # float64: a second graph, past the limit of one
            out = piece(x.double(), w.double(), 1e-6)
            assert out.dtype == torch.float64 and torch.equal(out, rms(x.double(), w.double(), 1e-6))
        assert torch.equal(piece(x, w, 1e-6), rms(x, w, 1e-6))  # eager now for every call
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "ponder: probe: the compiled rms failed on a new kind of call (FailOnRecompileLimitHit); it runs unfused" in err
    torch._dynamo.reset()


def test_a_checkpointed_layer_ending_in_a_compiled_piece_recomputes_it_in_backward(capsys):
    """Non-reentrant checkpointing stops a layer's recomputation by raising from the hook that saves its last tensor,
    inside the layer's last piece (the packed pass: the next layer's add + norm). That is not the piece failing: taken
    for one, the piece ran again eagerly in the stopped recomputation, and the 7B update on an H100 (whose plan
    checkpoints the layers) ended in torch's "Unexpected state: target_frame.early_stop is set"."""
    from torch.utils.checkpoint import checkpoint

    from ponder.kernels.norm import add_rms
    from ponder.kernels.trials import eager_after_failure

    piece = eager_after_failure(lambda *a: add_rms(*a), add_rms, "add_rms", "probe")  # a callable of its own, as compiled

    def layer(x, r, w):
        return piece((x * w).tanh(), r, w, 1e-6)[1]  # the layer's last tensors are saved inside the piece

    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(shape, generator=g, requires_grad=True) for shape in ((4, 8), (4, 8), (8,)))
    checkpoint(layer, x, r, w, use_reentrant=False).square().sum().backward()
    got = [t.grad.clone() for t in (x, r, w)]
    for t in (x, r, w):
        t.grad = None
    layer(x, r, w).square().sum().backward()
    for a, b in zip(got, (x.grad, r.grad, w.grad)):
        torch.testing.assert_close(a, b)
    assert capsys.readouterr().err == ""  # no "failed on a new kind of call": the piece stays compiled


def test_each_compiled_piece_has_graphs_of_its_own(capsys):
    """The engine's rms and the packed pass's compile one function: with a shared code object they shared one
    recompile budget, and a float64 call of one was the second graph of both."""
    import torch._dynamo
    from ponder.kernels.norm import rms
    from ponder.kernels.trials import compile_each

    torch._dynamo.reset()
    x, w = torch.randn(4, 8), torch.rand(8)
    with torch._dynamo.config.patch(recompile_limit=1):
        engine = compile_each({"rms": rms}, {"rms": (x, w, 1e-6)}, "engine")["rms"]
        update = compile_each({"rms": rms}, {"rms": (x.double(), w.double(), 1e-6)}, "update")["rms"]
        engine(x, w, 1e-6)
        update(x.double(), w.double(), 1e-6)
    assert capsys.readouterr().err == ""
    torch._dynamo.reset()


# -- continuous batching over the paged cache ---------------------------------------------------------

LONGER = PROMPTS + ["Q: 31+24=", "zz", "The quick brown fox jumps over the lazy dog again", "1 2 3"]


@pytest.mark.parametrize("rows,block,pool,start", [(3, 4, None, None), (5, 3, None, 2), (4, 4, 24, 2)],
                         ids=["3 rows", "5 rows, blocks of 3, a pool that grows", "4 rows, pool of 24 blocks: sequences give way"])
@pytest.mark.parametrize("in_order", [True, False], ids=["rows' K/V in order", "K/V gathered from the pool"])
@pytest.mark.parametrize("ahead", [False, True], ids=["checks in step", "a step queued ahead of each check"])
def test_more_samples_than_rows_generate_like_transformers(rows, block, pool, start, in_order, ahead, monkeypatch):
    """9 prompts x 3 samples through a few rows: sequences finish at different steps (EOS), waiting ones take
    their rows and reuse the blocks they freed (stale K/V from another sequence sits in them), prompts of
    mixed lengths share their full blocks and copy their last partial one. With a small pool, running
    sequences give way and are recomputed when readmitted. Greedy tokens must equal transformers' generate,
    whether the CPU step reads its rows' in-order K/V copy or (past its size cap, as on CUDA) the pool, and
    whether each host check runs after the GPU's last step or beside a step queued ahead of it (CUDA's way)."""
    if not in_order:
        monkeypatch.setattr(fast_model, "ROW_KV_BYTES", 0)
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    prompts = encode(LONGER)
    set_eos_mid_generation(model, prompts, steps=20)
    params = SamplingParams(n=3, temperature=0, max_tokens=20, logprobs=True)
    ref = HFEngine(model, TOK).generate(prompts, params)
    params = SamplingParams(n=3, temperature=0, max_tokens=20, logprobs=True, entropies=True)
    eng = FastEngine(model, TOK, batch_size=rows, sync_every=2, min_bucket=1, block_size=block, kv_blocks=pool,
                     start_tokens=start, look_ahead=ahead)
    got = eng.generate(prompts, params)
    assert (eng.fwd.row_kv is not None) == in_order
    if start is not None and pool is None:  # it started with room for 2 new tokens a row and grew
        worst = rows * -(-(max(map(len, prompts)) + 20 + 2 + 1) // block) + sum(-(-len(p) // block) for p in prompts) + 1
        assert eng.stats["kv_blocks_peak"] < eng.stats["kv_blocks"] < worst
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in ref]
    assert [[c.finish_reason for c in o] for o in got] == [[c.finish_reason for c in o] for o in ref]
    assert eng.stats["kv_blocks_peak"] <= eng.stats["kv_blocks"] - 1
    if pool is not None:
        assert eng.stats["gave_way"] > 0  # the case this parametrisation is for
    # log-probs of each sampled token and each token's entropy agree with a fresh forward over prompt + completion
    # (a sequence that gave way keeps the entropies of its tokens from before)
    for p, outs in zip(prompts, got):
        for c in outs:
            ids = torch.tensor([p + c.token_ids])
            logp = model(ids).logits[0, len(p) - 1 : -1].log_softmax(-1)
            fresh = logp.gather(-1, ids[0, len(p):, None]).squeeze(-1)
            torch.testing.assert_close(torch.tensor(c.logprobs), fresh, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(torch.tensor(c.entropies), -(logp.exp() * logp).sum(-1).detach(), atol=1e-4, rtol=1e-4)


def test_the_step_queued_ahead_of_a_check_writes_only_where_blocks_are(monkeypatch):
    """With look_ahead, a decode step is queued before each check decides: (1) a check every step (sync_every=1),
    where rows all reach their limit at once and waiting samples take their rows: the step after that check must
    not be followed by a second one before the blocks for it are handed out (it wrote into the sink block and later
    tokens went wrong); (2) a row whose last token comes from the step queued ahead is done at that check, not given
    blocks for another window (with a pool that holds one sequence, that made the call fail). Decode reads the pool,
    as on CUDA."""
    monkeypatch.setattr(fast_model, "ROW_KV_BYTES", 0)
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    model.generation_config.eos_token_id = len(TOK) + 5  # never sampled: only the limits end samples
    prompts = encode(["ab", "cd"])
    params = SamplingParams(n=2, temperature=0, max_tokens=6)
    ref = HFEngine(model, TOK).generate(prompts, params)
    got = FastEngine(model, TOK, batch_size=2, sync_every=1, min_bucket=1, block_size=1, look_ahead=True).generate(prompts, params)
    assert [[c.token_ids for c in o] for o in got] == [[c.token_ids for c in o] for o in ref]
    model = randomized(load("tiny-random-micro", seed=2)[0])
    model.generation_config.eos_token_id = len(TOK) + 5
    for ahead in (False, True):
        eng = FastEngine(model, TOK, batch_size=1, sync_every=3, min_bucket=2, block_size=3, kv_blocks=6, look_ahead=ahead)
        out = eng.generate(encode(["Q: 12+7="]), SamplingParams(n=3, temperature=1.0, max_tokens=5, seed=0), limits=[4, 1, 3])
        assert [len(c.token_ids) for c in out[0]] == [4, 1, 3] and eng.stats["gave_way"] == 0


def test_samples_do_not_depend_on_rows_or_blocks():
    """A sample's random draws are keyed by (seed, sequence, token index): the same seed gives the same
    tokens whether all samples run at once or a few at a time, with any block size."""
    model = randomized(load("tiny-random-micro", seed=2)[0])
    prompts = encode(LONGER)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=24, seed=11, logprobs=True)
    wide = FastEngine(model, TOK).generate(prompts, params)
    narrow = FastEngine(model, TOK, batch_size=5, sync_every=3, min_bucket=1, block_size=5).generate(prompts, params)
    assert [[c.token_ids for c in o] for o in narrow] == [[c.token_ids for c in o] for o in wide]
    # a step queued ahead of each check, with top-p (sampled outside the step) and a stop string
    params_p = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_tokens=24, seed=11, logprobs=True, stop=("e ",))
    outs = [FastEngine(model, TOK, batch_size=5, sync_every=3, min_bucket=1, block_size=5, look_ahead=ahead).generate(
        prompts, params_p) for ahead in (False, True)]
    assert [[(c.token_ids, c.finish_reason) for c in o] for o in outs[0]] == [[(c.token_ids, c.finish_reason) for c in o] for o in outs[1]]
    assert any(c.finish_reason == "stop" for o in outs[0] for c in o)
    for a, b in zip(*outs):  # rows are compacted at other steps: products over other batch sizes round differently
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=1e-5)
    lens = {len(c.token_ids) for o in wide for c in o}
    assert len(lens) > 3  # uneven lengths: rows were freed and reused
    for a, b in zip(wide, narrow):
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=1e-5)


def test_limits_force_each_samples_length_and_memory_follows_the_live_tokens():
    """Benchmarks force uneven lengths with `limits`; the pool's blocks in use peak near the tokens that
    exist at once, far below rows x the longest sequence."""
    model = randomized(load("tiny-random-micro", seed=2)[0])
    model.generation_config.eos_token_id = len(TOK) + 5  # never sampled: only the limits end samples
    prompts = encode(["ab"] * 8)
    limits = [60 if i == 0 else 4 for i in range(16)]  # one long sample, fifteen short ones
    eng = FastEngine(model, TOK, batch_size=4, sync_every=2, min_bucket=1, block_size=4)
    out = eng.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=60, seed=0), limits=limits)
    assert [len(c.token_ids) for o in out for c in o] == limits
    assert all(c.finish_reason == "length" for o in out for c in o)
    per_row = -(-(2 + 60 + 2 + 1) // 4)  # blocks for a row at full length
    assert eng.stats["kv_blocks_peak"] < 4 * per_row // 2
    with pytest.raises(UserError, match="3 limits for 16 samples"):
        eng.generate(prompts, SamplingParams(n=2, max_tokens=8), limits=[1, 2, 3])


@pytest.mark.parametrize("tied", [True, False])
def test_rollout_weights_in_bf16_run_as_they_are_like_the_engines_own_copy(tied):
    """ponder.sharding.RolloutWeights with bfloat16 matrices (what the sharded trainer makes on CUDA): 2 bytes a
    matrix entry (and bias), embeddings and norms float32, the head a matrix of its own when tied. The fast engine takes it
    as it is (no second copy), under autocast: the tokens and log-probs of its own bf16 copy of the float32
    model; the hf engine runs it under autocast too; a refresh from changed weights is seen."""
    from ponder.rollout import shadow_dtype
    from ponder.sharding import RolloutWeights

    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=tied)))
    rw = RolloutWeights(model, torch.bfloat16)
    copy = rw.model
    assert shadow_dtype(copy) == torch.bfloat16 and shadow_dtype(model) is None
    assert copy.get_output_embeddings().weight.dtype == torch.bfloat16
    assert copy.get_input_embeddings().weight.dtype == torch.float32 and copy.model.norm.weight.dtype == torch.float32
    assert copy.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16  # as autocast casts them
    assert all(m.weight.dtype == torch.bfloat16 for m in copy.modules() if isinstance(m, torch.nn.Linear))
    prompts = encode(PROMPTS[:3])
    params = SamplingParams(n=2, temperature=0, max_tokens=10, logprobs=True)
    ours = FastEngine(copy, TOK)
    got = ours.generate(prompts, params)
    assert ours.copy is None and ours.fwd.autocast  # the copy as it is
    assert got == FastEngine(model, TOK, dtype="bf16").generate(prompts, params)
    sampled = SamplingParams(n=2, temperature=1.0, max_tokens=10, seed=3)
    assert ours.generate(prompts, sampled) == FastEngine(model, TOK, dtype="bf16").generate(prompts, sampled)
    greedy = SamplingParams(n=1, temperature=0, max_tokens=10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = HFEngine(model, TOK).generate(prompts, greedy)
    assert HFEngine(copy, TOK).generate(prompts, greedy) == want
    with torch.no_grad():  # an update, then the refresh the trainer makes (by name; the tied head follows)
        for p in model.parameters():
            p.mul_(1.3)
    rw.refresh(model, torch.device("cpu"))
    assert torch.equal(copy.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))
    assert ours.generate(prompts, params) == FastEngine(model, TOK, dtype="bf16").generate(prompts, params)


def test_bf16_copy_rounds_norms_and_biases_where_autocast_would(monkeypatch):
    """The rollout copy's products take the norms' outputs already rounded to bf16 (in the norm's own kernel) and
    bf16 biases: the tokens and log-probs of autocast casting the float32 norms' outputs and biases at each
    product, bit for bit (Qwen2: biased q/k/v; random norms and biases)."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    prompts = encode(PROMPTS[:4])
    params = SamplingParams(n=2, temperature=1.0, max_tokens=12, logprobs=True, seed=5)
    narrow = FastEngine(model, TOK, dtype="bf16")
    got = narrow.generate(prompts, params)
    assert narrow.fwd.narrow == torch.bfloat16
    assert narrow.copy.shadow.model.layers[0].self_attn.q_proj.bias.dtype == torch.bfloat16
    wide = FastEngine(model, TOK, dtype="bf16")
    wide._weights()  # the copy, then its biases put back as the master's float32 ones: autocast casts them
    for name, m in wide.copy.shadow.named_modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias = model.get_submodule(name).bias
    real = fast_model.Forward.__init__

    def cast_at_each_product(self, *a, **k):
        real(self, *a, **k)
        self.narrow = None

    monkeypatch.setattr(fast_model.Forward, "__init__", cast_at_each_product)
    want = wide.generate(prompts, params)
    assert wide.fwd.narrow is None
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    assert [[c.logprobs for c in g] for g in got] == [[c.logprobs for c in g] for g in want]


def test_triton_attention_on_the_cpu_says_what_runs_and_decodes_as_auto(capsys):
    """`attention: triton` is a CUDA kernel: on the CPU its torch reference runs, with a notice (it had run silently,
    slower than auto), and greedy tokens equal auto's."""
    from ponder.models import load
    from ponder.rollout import SamplingParams
    from ponder.rollout.fast import FastEngine

    model, tok = load("tiny-random", seed=1)
    params = SamplingParams(n=2, temperature=0, max_tokens=6)
    prompts = [tok.encode("12+3="), tok.encode("7*8=")]
    auto = FastEngine(model, tok).generate(prompts, params)
    capsys.readouterr()
    triton = FastEngine(model, tok, attention="triton").generate(prompts, params)
    assert "attention 'triton' is a CUDA kernel; here its torch reference runs" in capsys.readouterr().err
    assert [[c.token_ids for c in o] for o in triton] == [[c.token_ids for c in o] for o in auto]


def test_decode_texts_equals_decoding_each_list():
    """ponder.rollout.decode_texts (the trainer's, sampler's and evaluator's decoding of completions) gives what
    tokenizer.decode gives list by list: through the Rust tokenizer's batch decode where decoding is that alone,
    and list by list where the tokenizer cleans up spaces (transformers' own step after the Rust decode)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ponder.rollout import decode_texts

    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|end|>", special=True)])
    bpe = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>")
    g = random.Random(0)
    for tok in (TOK, bpe):
        lists = [tok.encode(t) for t in ("12 + 7 = 19 .", "a , b !", "", "don't  stop\n", "é ü 中")]
        lists += [[g.randrange(len(tok)) for _ in range(g.randrange(40))] for _ in range(20)]  # special tokens too
        calls = []
        real = tok._tokenizer.decode_batch
        tok._tokenizer = type("Spy", (), {"__getattr__": lambda _, k: getattr(real.__self__, k),
                                          "decode_batch": lambda _, *a, **k: calls.append(1) or real(*a, **k)})()
        try:
            want = [tok.decode(t, skip_special_tokens=True) for t in lists]
            assert decode_texts(tok, lists) == want and calls == [1]
            tok.clean_up_tokenization_spaces = True  # "a , b !" -> "a, b!" where transformers applies it
            want = [tok.decode(t, skip_special_tokens=True) for t in lists]
            assert decode_texts(tok, lists) == want and calls == [1]  # list by list: the batch call is not used
        finally:
            tok._tokenizer = real.__self__
            tok.clean_up_tokenization_spaces = False


def test_a_pool_too_small_for_one_sequence_names_the_setting_that_sized_it():
    """kv_blocks set: raising kv_fraction would change nothing, so the message names kv_blocks."""
    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    eng = FastEngine(model, TOK, batch_size=2, block_size=2, kv_blocks=3)
    with pytest.raises(UserError, match=r"shorten max_tokens or raise rollout\.engine_options\.kv_blocks$"):
        eng.generate(encode(["Q: 12+7="]), SamplingParams(n=2, temperature=0, max_tokens=8))


def _micro():
    model = randomized(load("tiny-random-micro", seed=2)[0])
    return model, char_tokenizer()


def test_a_stop_string_ends_the_hf_engines_rows_without_the_padding_after_it():
    """A tokenizer without a pad token pads with EOS (ponder.models sets pad = EOS, as for Llama 3 or Mistral): the hf
    engine cut a row that ended on a stop string at the EOS of its padding, one token the model never sampled (its
    log-prob often -inf) kept and trained on. Both engines now give the same completions."""
    model, tok = _micro()
    tok.pad_token = tok.eos_token
    model.generation_config.eos_token_id = tok.eos_token_id
    prompts = [tok.encode(p) for p in PROMPTS]
    plain = HFEngine(model, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=20))
    stop = tok.decode(plain[2][0].token_ids[4:7])  # met by sample 2 only, the others going on
    params = SamplingParams(temperature=0, max_tokens=20, stop=(stop,), logprobs=True)
    hf, fast = HFEngine(model, tok).generate(prompts, params), FastEngine(model, tok).generate(prompts, params)
    c = hf[2][0]
    assert c.finish_reason == "stop" and tok.decode(c.token_ids).endswith(stop) and tok.eos_token_id not in c.token_ids
    assert [o[0].token_ids for o in hf] == [o[0].token_ids for o in fast]
    assert [o[0].finish_reason for o in hf] == [o[0].finish_reason for o in fast]
    sampled = SamplingParams(n=4, temperature=1.0, top_p=0.5, max_tokens=20, stop=("e", "7", "q"), logprobs=True, seed=1)
    for out in HFEngine(model, tok).generate(prompts, sampled):
        for c in out:
            assert tok.eos_token_id not in c.token_ids[:-1] and all(x > -1e30 for x in c.logprobs)
            if c.finish_reason == "stop" and c.token_ids[-1] == tok.eos_token_id:  # an EOS sampled: no stop string before
                assert not any(s in tok.decode(c.token_ids, skip_special_tokens=True) for s in sampled.stop)


def test_a_stop_string_is_searched_in_the_completion_not_across_the_prompts_end():
    """transformers' stop_strings match the end of the whole sequence: a prompt ending in `=` and a first token `=`
    met `==`, and the hf engine returned 1 token, 11 pads and "length". Both engines search the completion only."""
    model, tok = _micro()
    model.generation_config.eos_token_id = len(tok) + 5  # none: whole outputs
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    first = HFEngine(model, tok).generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1))[0][0].token_ids[0]
    stop = PROMPTS[0][-1] + tok.decode([first])  # the prompt's last character and the first one generated
    params = SamplingParams(temperature=0, max_tokens=12, stop=(stop,))
    hf, fast = HFEngine(model, tok).generate(prompts, params), FastEngine(model, tok).generate(prompts, params)
    assert [(o[0].token_ids, o[0].finish_reason) for o in hf] == [(o[0].token_ids, o[0].finish_reason) for o in fast]
    c = hf[0][0]
    assert tok.pad_token_id not in c.token_ids
    text = tok.decode(c.token_ids)
    assert (c.finish_reason == "stop") == (stop in text) and (c.finish_reason == "length") == (len(c.token_ids) == 12)


def test_a_stop_string_that_is_a_special_token_ends_the_completion_in_both_engines():
    """`rollout.stop: ["<|im_end|>"]`, a chat model's end of turn where the checkpoint's EOS is another token (Qwen2.5
    base): decoded texts leave special tokens out, so the fast engine never stopped and the hf engine stopped but
    said "length" and kept its padding. It now ends a completion as EOS does, the token kept."""
    from tokenizers import Regex, Tokenizer, decoders, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ponder.models.tiny import CHARS, SPECIAL_TOKENS

    model, plain = _micro()
    model.generation_config.eos_token_id = len(plain) + 5  # never sampled
    prompts = [plain.encode(p) for p in PROMPTS[:2]]
    greedy = HFEngine(model, plain).generate(prompts, SamplingParams(temperature=0, max_tokens=16))
    ids = greedy[1][0].token_ids
    end = ids[3]  # a character met part-way
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    vocab["<|im_end|>"] = vocab.pop(plain.convert_ids_to_tokens(end))  # that character's id is now the end of turn
    core = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False,
                                  additional_special_tokens=["<|im_end|>"])
    params = SamplingParams(temperature=0, max_tokens=16, stop=("<|im_end|>",))
    for engine in (HFEngine(model, tok), FastEngine(model, tok)):
        c = engine.generate(prompts, params)[1][0]
        assert (c.token_ids, c.finish_reason) == (ids[: ids.index(end) + 1], "stop"), type(engine).__name__


def test_the_hf_engine_takes_an_eos_id_of_0_as_the_models(monkeypatch):
    """`generation_config.eos_token_id or tokenizer.eos_token_id` took the id 0 for none: the hf engine ran past the
    model's EOS to the limit where the fast engine stopped."""
    model = load("tiny-random-micro", seed=2)[0]
    model.generation_config.eos_token_id = 0
    seen = {}

    def spy(**kw):
        seen.update(kw)
        raise StopIteration

    monkeypatch.setattr(model, "generate", spy)
    with pytest.raises(StopIteration):
        HFEngine(model, TOK).generate(encode(["ab"]), SamplingParams(max_tokens=4))
    assert seen["eos_token_id"] == [0]
    assert FastEngine(model, TOK).eos_ids() == {0}


def test_on_cpu_the_pool_is_capped_by_the_hosts_free_memory(monkeypatch):
    """On CPU, as on CUDA, the pool grows to at most kv_fraction of the memory free, its own counted (the host's
    available memory, here made up: what is left of 80 blocks' bytes once the pool holds its share); past that, rows
    wait or give way, and each sample's tokens are those of a pool without the cap (the draw is a hash of the seed,
    the sequence and the token's index). Memory that others take while a pool exists is no error: the pool stops
    growing. A request for more tokens than fit gets one line before any allocation (max_new_tokens=1e8 was an
    allocator traceback for 6.5 TB of cache)."""
    from ponder.rollout import fast

    model = randomized(load("tiny-random-micro", seed=2)[0])
    model.generation_config.eos_token_id = len(TOK) + 5  # never sampled: the limits end the samples
    prompts, limits = encode(["ab"] * 8), [60, 4, 30, 45] * 4
    params = SamplingParams(n=2, temperature=1.0, max_tokens=60, seed=0)
    free = FastEngine(model, TOK, batch_size=4, sync_every=2, min_bucket=1, block_size=4, start_tokens=2)
    want = [[c.token_ids for c in o] for o in free.generate(prompts, params, limits=limits)]
    per_block = free.fwd.kv[:, :, 0].numel() * free.fwd.kv.element_size()
    # one sequence: 2 + 60 + 2 + 2 slots in 17 blocks, the 8 prompts' blocks and one; every row: 4 x 17 + 9
    assert (free.least, free.worst, free.fwd.blocks) == (26, 77, 52)  # 13 blocks, grown twice

    eng = FastEngine(model, TOK, batch_size=4, sync_every=2, min_bucket=1, block_size=4, start_tokens=2)
    held = lambda: 0 if eng.fwd is None else eng.fwd.kv.numel() * eng.fwd.kv.element_size()  # noqa: E731
    monkeypatch.setattr(fast, "host_available", lambda: 80 * per_block - held())
    got = eng.generate(prompts, params, limits=limits)
    assert eng.fwd.blocks == 40 and eng.stats["kv_blocks_peak"] <= 40 and eng.stats["gave_way"] > 0
    assert [[c.token_ids for c in o] for o in got] == want

    eng = FastEngine(model, TOK, batch_size=4, sync_every=2, min_bucket=1, block_size=4, start_tokens=20)
    monkeypatch.setattr(fast, "host_available", lambda: 80 * per_block if eng.fwd is None else 0)
    got = eng.generate(prompts, params, limits=limits)
    assert eng.fwd.blocks == 4 * 6 + 9  # room for 20 new tokens a row, then no more
    assert [[c.token_ids for c in o] for o in got] == want

    monkeypatch.setattr(fast, "host_available", lambda: 40 * per_block)
    eng = FastEngine(model, TOK, batch_size=4, block_size=4)
    with pytest.raises(UserError) as e:  # one sequence: 26 blocks of 2 KiB (sync_every 16: 2 + 60 + 16 + 2 slots)
        eng.generate(prompts, params, limits=limits)
    need = (-(-(2 + 60 + 16 + 2) // 4) + 9) * per_block
    assert str(e.value) == (f"fast engine: the KV cache needs {need / 2**20:.1f} MiB for one sequence and 50% of free "
                            f"memory gives {20 * per_block / 2**20:.1f} MiB; raise rollout.engine_options.kv_fraction (to "
                            f"{need / (40 * per_block):.2f} at least) or shorten max_tokens")
    with pytest.raises(UserError) as e:  # more than all the memory free: kv_fraction is not named
        eng.generate(prompts, SamplingParams(n=2, max_tokens=250))
    need = (-(-(2 + 250 + 16 + 2) // 4) + 9) * per_block / 2**20
    assert str(e.value) == (f"fast engine: the KV cache needs {need:.1f} MiB for one sequence and 50% of free memory "
                            f"gives {20 * per_block / 2**20:.1f} MiB; shorten max_tokens")


def test_on_cpu_the_pool_starts_with_at_most_4096_positions_a_row():
    """The CPU pool starts with every row at full length only up to CPU_START positions past the prompt, then grows
    as rows reach further: a run allowing a million new tokens does not allocate them before its first token."""
    from ponder.rollout.fast import CPU_START

    model = seeded(0, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)))
    prompts = encode(LONGER)  # 37 blocks of 4 slots, the longest 49 tokens
    eng = FastEngine(model, TOK, batch_size=4, sync_every=2, min_bucket=1, block_size=4)
    out = eng.generate(prompts, SamplingParams(n=3, temperature=0, max_tokens=5000), limits=[6] * 27)
    assert [len(c.token_ids) for o in out for c in o] == [6] * 27
    assert CPU_START == 4096
    assert eng.fwd.blocks == 4 * -(-(49 + 4096) // 4) + 37 + 1 < eng.worst == 4 * -(-(49 + 5000 + 2 + 2) // 4) + 37 + 1
    eng.generate(prompts, SamplingParams(n=3, temperature=0, max_tokens=200), limits=[6] * 27)
    assert eng.fwd.blocks == 4 * -(-(49 + 4096) // 4) + 37 + 1  # the same pool serves shorter calls


def test_a_containers_memory_limit_bounds_the_cpu_pool(tmp_path):
    """psutil reads the host's memory; a container's own limit (cgroup v2 or v1) is what it may still allocate."""
    from ponder.rollout.fast import cgroup_free

    assert cgroup_free(str(tmp_path)) == float("inf")  # no control group files: no limit
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert cgroup_free(str(tmp_path)) == float("inf")  # v2 without a limit
    (tmp_path / "memory.max").write_text("17179869184\n")
    assert cgroup_free(str(tmp_path)) == 17179869184 - 1000
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    (v1 / "memory.usage_in_bytes").write_text("5\n")
    assert cgroup_free(str(tmp_path / "v1")) == float("inf")
    (v1 / "memory.limit_in_bytes").write_text("4096\n")
    assert cgroup_free(str(tmp_path / "v1")) == 4091


def test_processes_of_one_machine_share_its_memory_for_their_cpu_pools(monkeypatch):
    """torchrun --nproc-per-node N on CPU: each process's pool takes its share of the host's free memory, the least
    of the host's and the container's; on its own, all of it."""
    from ponder.rollout import fast

    monkeypatch.setattr(fast, "host_available", lambda: 8000)
    monkeypatch.setattr(fast, "cgroup_free", lambda: float("inf"))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert fast.free_memory("cpu") == 8000
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert fast.free_memory("cpu") == 2000
    monkeypatch.setattr(fast, "cgroup_free", lambda: 400.0)
    assert fast.free_memory("cpu") == 100


@pytest.mark.parametrize("options, line", [
    ("{kv_fraction: 1e-3}", None),  # YAML 1.1 reads 1e-3 as text: taken as the number
    ("{block_size: 2.5}", "ponder: error: rollout.engine_options.block_size must be an integer; got 2.5"),
    ("{kv_blocks: 2.5}", "ponder: error: rollout.engine_options.kv_blocks must be an integer or null; got 2.5"),
    ("{keep_cache: maybe}", "ponder: error: rollout.engine_options.keep_cache must be true or false; got 'maybe'"),
    ("{kv_fraction: lots}", "ponder: error: rollout.engine_options.kv_fraction must be a number; got 'lots'"),
    ("{block_size: 1000000}", "ponder: error: fast engine: block_size must be from 1 to 1024 and kv_fraction in (0, 1] "
                              "(got 1000000, 0.5)"),
    ("{kv_blocks: 0}", "ponder: error: fast engine: kv_blocks must be at least 2, or null (sized from free memory); got 0"),
])
def test_engine_options_of_the_wrong_type_or_size_are_one_line(tmp_path, error_line, capsys, options, line):
    """They failed deep in the engine (torch.zeros got 2.5 blocks; '<' between an int and the text '1e-3'), or a block
    of a million slots took gigabytes a prompt without a word."""
    from ponder.cli import main

    argv = ["train", "recipes/smoke-first-digit.yaml", f"output_dir={tmp_path}", "train.steps=1", "train.log_to=[]",
            "rollout.prompts_per_step=2", f"rollout.engine_options={options}"]
    if line is None:
        assert main(argv) == 0
    else:
        assert error_line(*argv) == line


def test_more_samples_than_memory_holds_is_one_line_before_any_table(monkeypatch):
    """The output tables hold a token, its log-prob and its entropy for every slot of every sample: eval --k 2**40
    asked the allocator for 228 TB."""
    from ponder.rollout import fast

    model = randomized(load("tiny-random-micro", seed=2)[0])
    eng = FastEngine(model, TOK, batch_size=4, block_size=4)
    monkeypatch.setattr(fast, "host_available", lambda: 2**18)
    with pytest.raises(UserError) as e:  # 16 samples + the sink row, 1,000 + 16 + 2 slots each, 16 bytes a slot
        eng.generate(encode(["ab"] * 8), SamplingParams(n=2, max_tokens=1000))
    assert str(e.value) == (f"fast engine: 16 samples of up to 1,000 tokens need {17 * 1018 * 16 / 2**20:.1f} MiB for "
                            "their tokens and log-probs, and 0.2 MiB are free; ask for fewer samples (k, group_size, n) "
                            "or shorten max_tokens")
    assert eng.fwd is None  # nothing was allocated
