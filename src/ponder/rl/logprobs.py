"""Per-token log-probabilities without vocabulary-sized logits for the whole batch.

The backbone runs once; the output head then runs on the scored positions only, a chunk of rows at a
time, each chunk under activation checkpointing. At most one chunk's [chunk_size, vocab] logits exist
at any moment, in the forward pass and again in the backward pass, instead of [batch, length, vocab].
"""

from __future__ import annotations

import inspect

import torch
from torch.utils.checkpoint import checkpoint

from ponder.errors import UserError
from ponder.kernels.head_logprobs import softmax_entropy
from ponder.runtime import probing


def split_model(model):
    """(backbone, output head) of a causal LM, also when wrapped by peft."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, inner.base_model_prefix, None)
    head = inner.get_output_embeddings()
    if backbone is None or head is None:
        raise UserError(f"model {type(inner).__name__} has no backbone/output head pair; use a causal LM")
    return backbone, head


def logit_transform(model):
    """What the model's own forward does to the output layer's logits before they are returned (and sampled), as a
    function, or None: Gemma 2's and 3's soft cap, Granite's division by logits_scaling, Cohere's logit_scale. The
    log-probs here start from the output layer, so without it they are not the policy's (Gemma 2's cap of 30 moved
    a loss from 41 to 293)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    kind = getattr(cfg, "model_type", "") or ""
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = None
    if kind.startswith("granite") and getattr(cfg, "logits_scaling", None):
        scale = 1.0 / cfg.logits_scaling
    elif kind.startswith("cohere") and getattr(cfg, "logit_scale", None):
        scale = cfg.logit_scale
    if not cap and scale is None:
        return None

    def transform(logits):
        if scale is not None:
            logits = logits * scale
        return torch.tanh(logits / cap) * cap if cap else logits

    return transform


def check_head(model) -> None:
    """Once per model: the output layer's logits, transformed as logit_transform says, are the model's own (a 4-token
    probe, in eval mode, without gradients or random draws). A forward that changes them otherwise is refused in one
    line rather than trained on log-probs that are not the policy's."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner, "_ponder_head_checked", False):
        return
    backbone, head = split_model(model)
    transform = logit_transform(model) or (lambda t: t)
    with probing(model) as device:
        ids = torch.tensor([[1, 2, 3, 4]], device=device)
        own = model(input_ids=ids, use_cache=False).logits
        ours = transform(head(backbone(input_ids=ids, use_cache=False).last_hidden_state).float())
    tol = 1e-3 if own.dtype == torch.float32 else 3e-2  # bf16 logits (autocast, bf16 weights): the model transforms them rounded
    own = own.float()
    if not torch.allclose(own, ours, rtol=tol, atol=tol * float(own.abs().max()) + 1e-5):
        kind = getattr(inner.config, "model_type", type(inner).__name__)
        raise UserError(f"model type '{kind}': its forward changes the output layer's logits in a way ponder does not "
                        "apply, so the log-probs it trains on would not be the model's; this architecture is not "
                        "supported yet (please report it)")
    inner._ponder_head_checked = True


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left or right padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
    *,
    positions: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    shared_prefix: int = 0,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of tokens given their prefix, and the entropy of the distribution they came from.

    Which tokens: `completion_mask` [B, L] (1 where input_ids[b, t] is scored) gives outputs [B, L]
    aligned with input_ids, 0 elsewhere (and always at t = 0); or `positions` [B, T] (indices t >= 1
    into input_ids) gives outputs [B, T]; with neither, every token from t = 1 is scored.
    Logits are divided by `temperature` first. Log-probs carry gradients; entropies are detached unless
    `entropy_grad` (a loss with an entropy term). Both are float32.
    """
    if temperature <= 0:
        raise UserError(f"token_logprobs: temperature must be > 0, got {temperature}")
    if completion_mask is not None and positions is not None:
        raise UserError("token_logprobs: give completion_mask or positions, not both")
    b, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    backbone, head = split_model(model)
    check_head(model)
    transform = logit_transform(model)
    if shared_prefix:
        if positions is None:
            raise UserError("token_logprobs: shared_prefix needs positions (scored tokens after the prefix)")
        hidden = _hidden_after_shared_prefix(backbone, input_ids, attention_mask, shared_prefix)
    else:
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask), use_cache=False,
        ).last_hidden_state

    if positions is not None:
        if positions.numel() and int(positions.min()) < 1:
            raise UserError("token_logprobs: positions must be >= 1 (position 0 has no prefix to predict it)")
        rows = torch.arange(b, device=input_ids.device)[:, None].expand_as(positions)
        lp, ent = head_logprobs(
            # positions inside the shared prefix are padding slots (callers mask them): clamp, never wrap
            head, hidden[rows, (positions - 1 - shared_prefix).clamp(min=0)], input_ids[rows, positions], temperature, chunk_size,
            with_entropy, transform, entropy_grad,
        )
        return lp, ent

    if completion_mask is None:
        completion_mask = attention_mask
    sel = (completion_mask[:, 1:] != 0) & (attention_mask[:, 1:] != 0)
    lp, ent = head_logprobs(
        head, hidden[:, :-1][sel], input_ids[:, 1:][sel], temperature, chunk_size, with_entropy, transform, entropy_grad
    )
    zeros = hidden.new_zeros((b, length - 1), dtype=torch.float32)
    out_lp = torch.nn.functional.pad(zeros.masked_scatter(sel, lp), (1, 0))
    out_ent = torch.nn.functional.pad(zeros.detach().masked_scatter(sel, ent), (1, 0)) if with_entropy else None
    return out_lp, out_ent


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Tokens at the start that every row shares (right-padded rows): a prompt template's fixed text."""
    if input_ids.shape[0] < 2 or not bool(attention_mask[:, 0].all()):
        return 0
    same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else input_ids.shape[1]


def _hidden_after_shared_prefix(backbone, input_ids, attention_mask, prefix: int) -> torch.Tensor:
    """Hidden states of positions >= prefix, running the shared prefix once for the whole batch.

    GRPO batches repeat one template (and each prompt G times): with the R1-Zero template on a
    character-level model, the fixed text is most of every sequence. Its keys and values are computed
    once, with gradients, and broadcast to every row; the result equals the full forward pass.
    Rows must be right-padded (they all start at position 0).
    """
    b = input_ids.shape[0]
    # transformers renamed past_key_values to cache (5.2x); speak whichever this version speaks
    name = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    out = backbone(input_ids=input_ids[:1, :prefix], use_cache=True)
    cache = out[name]
    cache.batch_repeat_interleave(b)
    rest = input_ids.shape[1] - prefix
    positions = torch.arange(prefix, prefix + rest, device=input_ids.device)[None].expand(b, -1)
    return backbone(
        input_ids=input_ids[:, prefix:], attention_mask=attention_mask, position_ids=positions,
        use_cache=True, **{name: cache},
    ).last_hidden_state


def head_logprobs(head, hidden, targets, temperature, chunk_size, with_entropy, transform=None, entropy_grad=False):
    """Rows of hidden states [..., d] and their targets [...] -> log-probs and entropies [...] (detached unless
    entropy_grad). `transform`: what the model does to the head's logits before sampling (logit_transform), applied
    before the temperature."""
    shape = targets.shape
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)

    forward = [True]  # False once the loop is done: backward's recomputation needs no entropy

    def chunk(h, t):
        logits = head(h).float()
        if transform is not None:
            logits = transform(logits)
        if temperature != 1.0:
            logits = logits / temperature
        lse = logits.logsumexp(-1)
        lp = logits.gather(-1, t[:, None]).squeeze(-1) - lse
        if with_entropy and entropy_grad:  # in the graph: computed again, alike, on recomputation
            return lp, softmax_entropy(logits, lse)
        if not (with_entropy and forward[0]):
            return lp, None
        with torch.no_grad():  # saves nothing for backward, so skipping it on recomputation is safe
            ent = softmax_entropy(logits, lse)
        return lp, ent

    lps, ents = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for i in range(0, targets.numel(), chunk_size):
        h, t = hidden[i : i + chunk_size], targets[i : i + chunk_size]
        # checkpointing keeps only the chunk's inputs for backward; the logits are recomputed there
        lp, ent = checkpoint(chunk, h, t, use_reentrant=False) if grad else chunk(h, t)
        lps.append(lp)
        ents.append(ent)
    forward[0] = False
    if not lps:
        empty = hidden.new_zeros(shape, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    lp = torch.cat(lps).reshape(shape)
    ent = torch.cat(ents).reshape(shape) if with_entropy else None
    return lp, ent
