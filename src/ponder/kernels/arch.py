"""What the fast engine and the packed training pass read of a model: one description per model family.

Both run a model's own modules in their own order (the decode step and the packed stream), so each must
know where a family keeps its embeddings, norms, projections, rotary module and head, and what its
attention looks like (heads, head dim, scaling, sliding window). `describe(model)` gives that as an Arch,
or says why the model is not one of FAMILIES; a family with the same layout is one more entry there.

Every family below has the Llama layout: model.embed_tokens, model.layers[i] with input_layernorm,
self_attn.{q,k,v,o}_proj, post_attention_layernorm and mlp.{gate,up,down}_proj, then model.norm,
model.rotary_emb and the output embeddings as head. The variations, each read from the modules themselves:
- q_norm and k_norm over each head (Qwen3) or over the whole projection (OLMo 2): `qk_norms`;
- one qkv_proj and one gate_up_proj (Phi-3, Phi-4): `qkv_projections`, `gate_up_projections`;
- an MLP the passes do not run as SwiGLU products (Arcee: up, ReLU squared, down; a mixture-of-experts block:
  router and experts) is called as the model's own module (`own_mlp`), layer by layer: Qwen3-MoE mixes dense
  and sparse layers;
- layers without rotary embedding (SmolLM3's NoPE layers, every fourth: attention's use_rope): `rotary`;
- queries scaled by position past a length (Ministral 3's llama_4_scaling_beta): Arch.query_scales;
- norms after attention and the MLP, none on a layer's input (OLMo 2: Family.post_norm). OLMo 2's norms scale,
  then round to the input dtype, the passes' norms (HF Llama's) round, then scale: the same in float32, a
  last-bit difference under bf16 autocast.
Refused (the Hugging Face engine and the padded forward run such models): rotary embedding over part of each
head (Phi-4-mini's partial_rotary_factor), and frequencies that follow the sequence's length ('dynamic' and
'longrope' scaling: Phi-3.5-mini, Phi-3-*-128k), which the engine's cache and the packed update would compute
for different lengths.
Dropout is not run by either pass (Seed-OSS's attention and residual dropout, 0.1 each in its config, apply in
HF's forward in training mode): rollouts and updates score one deterministic policy, as RL trainers run them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    """One model family (a config's model_type). `always_sliding`: every layer attends within
    config.sliding_window (Mistral); otherwise only the layers config.layer_types marks "sliding_attention"
    (Qwen2 and Qwen3 when use_sliding_window is set), and the window is then the model's as a whole."""

    always_sliding: bool = False
    # norms after attention and after the MLP, each on its output before the residual add, and none on a
    # layer's input (OLMo 2: post_attention_layernorm, post_feedforward_layernorm); q_norm and k_norm then
    # normalise the whole projection, not each head
    post_norm: bool = False


FAMILIES = {
    "llama": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "mistral": Family(always_sliding=True),
    "arcee": Family(),  # Arcee AFM: the Llama layout with a gateless ReLU-squared MLP
    "seed_oss": Family(),  # ByteDance Seed-OSS: the Llama layout, biases on q/k/v (optionally on o and the MLP)
    # Qwen3's attention; each sparse layer's MLP a mixture-of-experts block (router, top-k experts), run as the
    # model's own module with transformers' experts implementation; no router auxiliary loss in the update.
    # Unlike Qwen3's, its forward applies config.sliding_window to every layer (None unless use_sliding_window)
    "qwen3_moe": Family(always_sliding=True),
    # Phi-3 and Phi-4 (Phi3ForCausalLM): fused qkv_proj and gate_up_proj; Phi-3-mini's config sets a window
    "phi3": Family(always_sliding=True),
    "olmo2": Family(post_norm=True),  # AI2's OLMo 2: the Llama layout's modules with norms after each block
    "smollm3": Family(),  # Hugging Face's SmolLM3: the Llama layout, some layers without rotary embedding (NoPE)
    "ministral": Family(),  # Ministral 8B: Mistral's layout, the window on the layers layer_types names
    "mixtral": Family(always_sliding=True),  # Mixtral: Mistral's attention, every MLP a mixture-of-experts block
    "internlm3": Family(),  # InternLM3: the Llama layout
    # Ministral 3: Mistral's layout (a window on every layer where the config sets one), queries scaled by
    # position past original_max_position_embeddings (query_scale)
    "ministral3": Family(always_sliding=True),
}
SUPPORTED = tuple(FAMILIES)


@dataclass
class Arch:
    backbone: torch.nn.Module
    head: torch.nn.Module
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    window: int | None  # sliding-window size, if any layer uses one
    post_norm: bool = False  # Family.post_norm
    # Ministral 3 (Llama 4's attention scale): queries times 1 + beta * log(1 + floor(position / length)) after
    # rotary embedding; (beta, length), or None
    query_scale: tuple[float, int] | None = None

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """The widths of q, k and v in one q|k|v product's output."""
        return self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim

    def query_scales(self, pos: torch.Tensor, positions: int) -> torch.Tensor | None:
        """The queries' scale at positions `pos` (float32, [len(pos), 1, 1]) of a call whose positions are all
        below `positions`; None where there is none, or where every position is below the length it starts
        at (there it is 1)."""
        if self.query_scale is None or positions <= self.query_scale[1]:
            return None
        beta, length = self.query_scale
        return (1 + beta * torch.log(1 + torch.floor(pos / length)))[:, None, None]  # as transformers computes it


def describe(model) -> tuple[Arch | None, str]:
    """The pieces the fast forward and the packed pass need, or (None, why not). A PEFT model is described
    by its base model (its LoRA layers are the modules found there)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config
    family = FAMILIES.get(cfg.model_type)
    if family is None:
        return None, f"architecture '{cfg.model_type}' is not one of {', '.join(SUPPORTED)}"
    backbone = getattr(inner, "model", None)
    head = inner.get_output_embeddings()
    try:
        attn = backbone.layers[0].self_attn
        needed = (backbone.embed_tokens, backbone.norm, backbone.rotary_emb, *qkv_projections(attn), attn.o_proj,
                  backbone.layers[0].mlp)
    except AttributeError as e:
        return None, f"unexpected module layout ({e})"
    if head is None or any(m is None for m in needed):
        return None, "unexpected module layout"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
    if kind in ("dynamic", "longrope"):  # frequencies chosen by the longest position in the call
        return None, (f"rotary scaling '{kind}' changes with the sequence's length (the engine's cache and the "
                      "packed update would see different frequencies)")
    inv_freq = getattr(backbone.rotary_emb, "inv_freq", None)
    if inv_freq is not None and 2 * inv_freq.numel() != attn.head_dim:
        return None, (f"rotary embedding over {2 * inv_freq.numel()} of the head's {attn.head_dim} dimensions "
                      "(partial_rotary_factor) is not supported")
    window = None
    if family.always_sliding or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        window = getattr(cfg, "sliding_window", None)
    beta = rope.get("llama_4_scaling_beta") if isinstance(rope, dict) else None
    scale = (float(beta), int(rope["original_max_position_embeddings"])) if beta else None
    return Arch(
        backbone, head, cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, attn.scaling, window,
        family.post_norm, scale,
    ), ""


def qkv_projections(attn) -> tuple:
    """The linear layers that make q, k and v: q_proj, k_proj, v_proj, or one qkv_proj whose output rows are
    q's, then k's, then v's (Phi-3)."""
    fused = getattr(attn, "qkv_proj", None)
    return (fused,) if fused is not None else (attn.q_proj, attn.k_proj, attn.v_proj)


def _fused_gate_up(mlp):
    """Phi-3's one gate_up_proj layer, or None (expert blocks hold a gate_up_proj parameter, not a layer)."""
    fused = getattr(mlp, "gate_up_proj", None)
    return fused if isinstance(fused, torch.nn.Module) else None


def gate_up_projections(mlp) -> tuple:
    """gate_proj, up_proj, or one gate_up_proj whose output is gate's half, then up's (Phi-3)."""
    fused = _fused_gate_up(mlp)
    return (fused,) if fused is not None else (mlp.gate_proj, mlp.up_proj)


def swiglu(arch: Arch, mlp) -> bool:
    """Whether both passes run this layer's MLP as their own products: SiLU-gated gate and up projections, then
    down_proj. Otherwise the model's own module runs (own_mlp)."""
    gated = hasattr(mlp, "gate_proj") or _fused_gate_up(mlp) is not None
    return getattr(arch.backbone.config, "hidden_act", None) == "silu" and gated


def own_mlp(mlp, h: torch.Tensor) -> torch.Tensor:
    """The model's MLP module on h [N, d], given a leading batch dimension: a mixture-of-experts block reads
    [batch, sequence, d]. Where it returns several outputs (router logits too, older transformers), the first."""
    out = mlp(h[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


def capturable(arch: Arch) -> tuple[bool, str]:
    """Whether a decode step over these modules can be captured as a CUDA graph, or why not. transformers'
    expert blocks (Qwen3-MoE's grouped_mm path) copy a host tensor inside the step: capture failed on an H200
    (transformers 5.17, "Cannot copy between CPU and CUDA tensors during CUDA graph capture")."""
    if any(hasattr(layer.mlp, "experts") for layer in arch.backbone.layers):
        return False, "its mixture-of-experts blocks cannot be captured as a CUDA graph"
    return True, ""


def rotary(attn) -> bool:
    """Whether the layer rotates q and k by position: not SmolLM3's NoPE layers (use_rope 0)."""
    return bool(getattr(attn, "use_rope", True))


def qk_norms(attn, q, k, norm):
    """Qwen3's q_norm/k_norm over each head (q [N, heads, D]) or OLMo 2's over the whole projection; `norm(x,
    weight, eps)` is the pass's RMSNorm. Unchanged where the layer has none."""
    if getattr(attn, "q_norm", None) is None:
        return q, k
    if attn.q_norm.weight.numel() == q.shape[-1]:
        return norm(q, *norm_args(attn.q_norm)), norm(k, *norm_args(attn.k_norm))
    flat = lambda t, w: norm(t.flatten(-2), *norm_args(w)).view(t.shape)  # noqa: E731
    return flat(q, attn.q_norm), flat(k, attn.k_norm)


def norm_args(norm):
    """(weight, eps) of an HF RMSNorm module."""
    return norm.weight, getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
