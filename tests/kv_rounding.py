"""A reference for the fast engine's fp8 KV cache (rollout.engine_options.kv_dtype: fp8): transformers' forward
with the keys and values that decode steps read rounded as the cache stores them."""

import copy

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def through_fp8(t, scale):
    """t as an e4m3 cache with this scale stores and gives it back."""
    return ((t / scale).to(torch.float8_e4m3fn).to(t.dtype) * scale).to(t.dtype)


def fp8_kv_forward(model):
    """forward(ids, n, scales): the model's forward over ids whose queries from position n on read every
    attention's keys and values (after rotary) through an e4m3 cache with scales [layers, 2] (K, V), as decode
    steps read it; the first n (the prompt, prefilled) attend to them as they are. A copy of the model, its
    attention function registered with transformers."""
    at = {}

    def rounded(module, q, k, v, mask, **kw):
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)  # [B, L, heads, D]
        k_scale, v_scale = (float(s) for s in at["scales"][module.layer_idx])
        late, _ = sdpa_attention_forward(module, q, through_fp8(k, k_scale), through_fp8(v, v_scale), mask, **kw)
        return torch.cat([out[:, : at["n"]], late[:, at["n"] :]], 1), None

    AttentionInterface.register("ponder_test_fp8_kv", rounded)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("ponder_test_fp8_kv")

    def forward(ids, n, scales):
        at["n"], at["scales"] = n, scales.cpu()
        return twin(input_ids=ids).logits[0]

    return forward
