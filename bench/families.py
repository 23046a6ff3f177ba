"""The model families of ponder.kernels.arch on one GPU: small random models through the fast engine (CUDA
graphs, the bf16 rollout copy of float32 masters, or bf16 weights) beside transformers' greedy generate, and
through the packed training pass (autocast, varlen flash attention) beside the Hugging Face forward. A check,
not a benchmark: each case prints its agreement or its error and the next one runs.

  PYTHONPATH=src python3 bench/families.py [FAMILY ...]
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch._dynamo
import transformers
from transformers import AutoModelForCausalLM

from ponder.models.tiny import char_tokenizer
from ponder.rl.batching import Sample
from ponder.rl.packed import packed_logprobs
from ponder.rollout import SamplingParams
from ponder.rollout.fast import FastEngine

TOK = char_tokenizer()
COMMON = dict(vocab_size=len(TOK), hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, eos_token_id=-1, pad_token_id=0, bos_token_id=1)

def config(name: str, **extra):
    """A model of transformers' config class `name` with COMMON's sizes, from its auto class (the families that
    transformers runs with another family's classes, InternLM3's, come out right)."""
    return lambda: AutoModelForCausalLM.from_config(getattr(transformers, name)(**COMMON, **extra))


FAMILIES = {
    "llama": config("LlamaConfig"),
    "qwen2": config("Qwen2Config"),
    "qwen3": config("Qwen3Config", head_dim=32),
    "qwen3_moe": config("Qwen3MoeConfig", head_dim=32, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
                        mlp_only_layers=[1]),
    "phi3": config("Phi3Config", sliding_window=None),
    "olmo2": config("Olmo2Config"),
    "smollm3": config("SmolLM3Config"),  # every fourth layer without rotary embedding
    "ministral": config("MinistralConfig", head_dim=32),
    # queries scaled past position 8 (past 16,384 in the real models), so the scale is exercised
    "ministral3": config("Ministral3Config", head_dim=32, rope_parameters=dict(
        rope_type="default", rope_theta=1e4, llama_4_scaling_beta=0.5, original_max_position_embeddings=8)),
    "mixtral": config("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
    "internlm3": config("InternLM3Config", qkv_bias=True, bias=True),
}
PROMPTS = ["Q: 12+7=", "hello there", "abc"]


def generation(name: str, dtype: torch.dtype) -> str:
    torch.manual_seed(0)
    model = FAMILIES[name]().cuda().to(dtype).eval()
    prompts = [TOK.encode(s) for s in PROMPTS]
    eng = FastEngine(model, TOK)
    out = eng.generate(prompts, SamplingParams(n=2, temperature=0.0, max_tokens=24))
    got = [c.token_ids for g in out for c in g]
    same = []
    for i, p in enumerate(prompts):
        ref = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        ref = ref[0, len(p):].tolist()
        same += [sum(a == b for a, b in zip(got[2 * i + j], ref)) for j in range(2)]
    return f"graphs {len(eng.graphs)}; greedy tokens equal to transformers' (of 24): {same}"


def training_pass(name: str) -> str:
    torch.manual_seed(0)
    model = FAMILIES[name]().cuda().train()
    batch = [Sample([5, 6, 7, 8], [9, 10, 11]), Sample([5, 6, 7, 8], [12, 13]), Sample([20] * 30, list(range(30, 70)))]
    lp, _, _ = packed_logprobs(model, batch, "cuda", autocast=True)
    lp.sum().backward()
    with_grad = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    diff = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i, s in enumerate(batch):
            ids = torch.tensor([s.prompt_ids + s.completion_ids], device="cuda")
            ref = model(ids).logits.float()[0, len(s.prompt_ids) - 1 : -1].log_softmax(-1)
            ref = ref.gather(-1, ids[0, len(s.prompt_ids):, None])[:, 0]
            diff = max(diff, (lp[i, : len(ref)] - ref).abs().max().item())
    return f"max |log-prob - HF's| {diff:.2e}; parameters with a gradient {with_grad} of {sum(1 for _ in model.parameters())}"


def main():
    print(torch.cuda.get_device_name(), torch.__version__, "transformers", transformers.__version__)
    for name in sys.argv[1:] or FAMILIES:
        torch._dynamo.reset()  # each family compiles its pieces afresh, as in a process of its own
        cases = [(f"generate, {d}", lambda d=d: generation(name, d)) for d in (torch.float32, torch.bfloat16)]
        for what, run in cases + [("packed pass, float32 masters", lambda: training_pass(name))]:
            try:
                print(f"{name:10} {what:32} {run()}", flush=True)
            except Exception as e:  # noqa: BLE001  (a check: report and go on)
                print(f"{name:10} {what:32} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
                traceback.print_exc(limit=2)


if __name__ == "__main__":
    main()
