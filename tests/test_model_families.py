"""Families beyond the Llama layout as a user brings them: a local Hugging Face directory trained by `ponder train`
(fast engine rollouts, the packed update) on the smoke task: Qwen3-MoE (expert blocks), Phi-3 (fused qkv_proj and
gate_up_proj; LoRA with the Llama names too), OLMo 2 (norms after each block) and SmolLM3 (layers without rotary
embedding). CPU, float32."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, Olmo2Config, Olmo2ForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM,
    SmolLM3Config, SmolLM3ForCausalLM,
)

from ponder import models
from ponder.config import load_config
from ponder.models.tiny import char_tokenizer


def directory(family: str, tok, path):
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if family == "qwen3_moe":  # layer 0 four experts (two a token), layer 1 dense
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=48, num_experts=4,
                                                   num_experts_per_tok=2, mlp_only_layers=[1]))
    elif family == "olmo2":
        model = Olmo2ForCausalLM(Olmo2Config(**common))
    elif family == "smollm3":  # layer 1 without rotary embedding
        model = SmolLM3ForCausalLM(SmolLM3Config(**common, no_rope_layers=[1, 0]))
    else:
        model = Phi3ForCausalLM(Phi3Config(**common, sliding_window=None))
    models.save(model, tok, path)
    return model


# (family, overrides, whether it must learn the task in 30 steps, parameters that must have moved)
RUNS = [
    ("qwen3_moe", [], True, ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight",
                             "model.layers.1.mlp.down_proj.weight"]),
    ("phi3", [], True, ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"]),
    ("olmo2", [], True, ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"]),
    ("smollm3", [], True, ["model.layers.1.self_attn.q_proj.weight"]),
    # LoRA with the Llama layout's names: q/k/v_proj become qkv_proj, gate/up_proj gate_up_proj, merged into the
    # checkpoint. Adapters without the head do not learn this task on a random model in 30 steps (a Llama neither)
    ("phi3-lora", ["model.lora={r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, gate_proj, up_proj]}"], False,
     ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"]),
]


@pytest.mark.parametrize("family,extra,learns,moved", RUNS, ids=[r[0] for r in RUNS])
def test_a_local_directory_of_the_family_trains(tmp_path, family, extra, learns, moved):
    tok = char_tokenizer()
    start = directory(family.split("-")[0], tok, tmp_path / family)
    from ponder.train import train

    trainer = train(load_config("recipes/smoke-first-digit.yaml", [
        f"output_dir={tmp_path}", "name=run", f"model.path={tmp_path / family}", "rollout.engine=fast", "train.steps=30",
        "train.save_every=30", *extra]))
    rewards = [json.loads(l)["reward"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if learns:
        assert sum(rewards[:3]) / 3 < 0.1 < 0.5 < sum(rewards[-3:]) / 3, rewards
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-30")
    assert type(saved) is type(start)
    before, after = start.state_dict(), saved.state_dict()
    for name in moved:
        assert (after[name] - before[name]).abs().max() > 1e-3, name
    assert trainer.engine.__class__.__name__ == "FastEngine" and trainer.engine.arch is not None


def test_expert_blocks_are_decoded_without_cuda_graphs():
    """transformers' expert blocks copy a host tensor inside the step, which CUDA graph capture refuses (seen on an
    H200): the engine decodes such models without graphs, and says so; dense families keep their graphs."""
    from ponder.kernels.arch import capturable, describe

    tok = char_tokenizer()
    small = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
    moe = Qwen3MoeForCausalLM(Qwen3MoeConfig(**small, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2))
    assert capturable(describe(moe)[0]) == (False, "its mixture-of-experts blocks cannot be captured as a CUDA graph")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    assert capturable(describe(Qwen3ForCausalLM(Qwen3Config(**small)))[0]) == (True, "")


@pytest.mark.parametrize("family", ["qwen3_moe", "phi3", "olmo2", "smollm3"])
def test_the_sharded_packed_pass_equals_the_plain_one(tmp_path, family):
    """FSDP2 on one process (gloo): the packed pass through each layer's sharded_call (a layer norms its own input,
    or, post-norm, none) gives the plain pass's log-probs and gradients, float32 on the CPU."""
    import copy

    import torch.distributed as dist

    from ponder import sharding
    from ponder.rl.batching import Sample
    from ponder.rl.packed import packed_logprobs

    plain = directory(family, char_tokenizer(), tmp_path / family).train()
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(4, 90, (n,), generator=g).tolist()  # noqa: E731
    prompt = rnd(6)
    batch = [Sample(prompt, rnd(9)), Sample(prompt, rnd(4)), Sample(rnd(11), rnd(7))]
    weights = torch.randn(3, 9, generator=g)
    try:
        sharding.join_single_process_group(torch.device("cpu"))
        sharded = sharding.shard(copy.deepcopy(plain), "fsdp", torch.device("cpu"))
        want = packed_logprobs(plain, batch, "cpu")[0]
        (want * weights[:, : want.shape[1]]).sum().backward()
        got = sharding.forward(sharded, lambda: packed_logprobs(sharded, batch, "cpu"))[0]
        (got * weights[:, : got.shape[1]]).sum().backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        grads = dict(sharded.named_parameters())
        for name, p in plain.named_parameters():
            torch.testing.assert_close(sharding.full_tensor(grads[name].grad), p.grad, atol=1e-5, rtol=1e-4, msg=name)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
