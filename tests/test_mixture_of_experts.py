"""A mixture-of-experts model (Qwen3-MoE) as a user brings it: a local Hugging Face directory trained by
`ponder train` (fast engine rollouts, the packed update), learning the smoke task. CPU, float32."""

import json

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from ponder import models
from ponder.config import load_config
from ponder.models.tiny import char_tokenizer


def test_a_qwen3_moe_directory_learns_the_smoke_task(tmp_path):
    tok = char_tokenizer()
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_experts=4,
                         num_experts_per_tok=2, num_hidden_layers=2, mlp_only_layers=[1], num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    start = Qwen3MoeForCausalLM(cfg)
    models.save(start, tok, tmp_path / "moe")
    from ponder.train import train

    trainer = train(load_config("recipes/smoke-first-digit.yaml", [
        f"output_dir={tmp_path}", "name=run", f"model.path={tmp_path / 'moe'}", "rollout.engine=fast", "train.steps=30",
        "train.save_every=30"]))
    rewards = [json.loads(l)["reward"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(rewards[:3]) / 3 < 0.1 < 0.5 < sum(rewards[-3:]) / 3, rewards
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-30")
    assert type(saved) is Qwen3MoeForCausalLM
    before, after = start.state_dict(), saved.state_dict()
    moved = lambda name: (after[name] - before[name]).abs().max() > 1e-3  # noqa: E731
    assert moved("model.layers.0.mlp.experts.gate_up_proj") and moved("model.layers.0.mlp.gate.weight")
    assert moved("model.layers.1.mlp.down_proj.weight")
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
