"""References for the fast engine's fp8 options: its KV cache (rollout.engine_options.kv_dtype: fp8), transformers'
forward with the keys and values that decode steps read rounded as the cache stores them; its matrices
(weight_dtype: fp8), transformers' forward with each layer's products from e4m3 matrices and rows."""

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

    # a name of each twin's own: the registry is global, and a second twin under one name took the first's calls
    name = f"ponder_test_fp8_kv_{id(at)}"
    AttentionInterface.register(name, rounded)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(name)

    def forward(ids, n, scales):
        at["n"], at["scales"] = n, scales.cpu()
        return twin(input_ids=ids).logits[0]

    return forward


PRODUCTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def fp8_weights_model(model):
    """A copy of the model whose attention and MLP products (each of PRODUCTS, one by one: the engine joins q|k|v
    and gate|up, which changes no row's scale) compute from e4m3 matrices, a scale per output row, and e4m3 rows of
    their input, a scale per row; the output head and everything else as they are."""
    from ponder.kernels.fp8_linear import fp8_linear, fp8_matrix

    twin = copy.deepcopy(model)
    for name, m in twin.named_modules():
        if name.rsplit(".", 1)[-1] in PRODUCTS:
            # (CUDA: rowwise-scaled products give bf16, the engine's compute dtype there)
            m.forward = lambda x, m=m: fp8_linear(x, *fp8_matrix(m.weight), m.bias, out_dtype=torch.bfloat16 if x.is_cuda else None)
    return twin
