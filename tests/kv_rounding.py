"""A reference for the fast engine's fp8 KV cache (rollout.engine_options.kv_dtype: fp8): transformers' forward
with the keys and values that decode steps read rounded to e4m3."""

import copy

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


def fp8_kv_forward(model):
    """forward(ids, n): the model's forward over ids whose queries from position n on read every attention's keys
    and values (after rotary) rounded to e4m3, as decode steps read an fp8 cache; the first n (the prompt,
    prefilled) attend to them as they are. A copy of the model, its attention function registered with transformers."""
    at = {}

    def rounded(module, q, k, v, mask, **kw):
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)  # [B, L, heads, D]
        k, v = (t.to(torch.float8_e4m3fn).to(t.dtype) for t in (k, v))
        late, _ = sdpa_attention_forward(module, q, k, v, mask, **kw)
        return torch.cat([out[:, : at["n"]], late[:, at["n"] :]], 1), None

    AttentionInterface.register("ponder_test_fp8_kv", rounded)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("ponder_test_fp8_kv")

    def forward(ids, n):
        at["n"] = n
        return twin(input_ids=ids).logits[0]

    return forward
