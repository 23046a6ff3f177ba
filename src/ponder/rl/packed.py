"""The policy pass of the Llama family for training: one packed stream, each prompt run once per micro-batch.

GRPO scores G completions of every prompt. The Hugging Face forward runs prompt + completion for each
row, right-padded to the longest row. Here a micro-batch is one stream of tokens with no padding: each
distinct prompt once, then each completion without its last token (which is only a target). Norms,
projections and MLPs run on the stream. Attention gives a completion its prompt's keys and values
(gathered, so the gradients of the G rows sum into the one prompt) followed by its own, causally:
- "varlen": torch's variable-length flash attention over the segments (CUDA; chosen after a trial);
- "padded": the segments padded and masked for scaled_dot_product_attention (anywhere; the reference), run in
  groups of segments of like lengths (bucketed_attention: elsewhere, and where varlen is missing).
Modules are the model's own, so in-place updates are seen; LoRA layers run through ponder.rl.lora_linears. The norms,
rotary and SwiGLU are ponder.kernels.training_step's pieces (compiled or Triton on CUDA, each after a trial);
the head is ponder.kernels.head_logprobs; the model's layout is read through ponder.kernels.arch.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ponder.kernels.arch import (
    describe, gate_up_projections, norm_args, own_mlp, qk_norms, qkv_projections, rotary, swiglu,
)
from ponder.kernels.head_logprobs import head_logprobs as fused_head_logprobs
from ponder.kernels.training_step import pieces
from ponder.kernels.trials import why
from ponder.rl.batching import Sample
from ponder.rl.copy_linear import copies_for, linear_from_copy
from ponder.rl.lora_linears import adapter, with_adapters
from ponder.rl.logprobs import head_logprobs as chunked_head_logprobs
from ponder.runtime import to_device


def packed_micro_batches(samples: list[Sample], token_budget: int) -> list[list[Sample]]:
    """Rows that share a prompt together (its tokens are then run once), at most `token_budget` stream tokens
    a micro-batch, as few micro-batches as that allows and of about equal size, groups of similar length
    side by side. A group too big for the budget is split: each part brings its own copy of the prompt."""
    groups: dict[tuple, list[Sample]] = {}
    for s in samples:
        groups.setdefault(tuple(s.prompt_ids), []).append(s)
    parts: list[tuple[int, list[Sample]]] = []  # (stream tokens, rows)
    for key, rows in groups.items():
        size, part = len(key), []
        for r in rows:
            n = max(len(r.completion_ids) - 1, 0)
            if part and size + n > token_budget:
                parts.append((size, part))
                size, part = len(key), []
            size, part = size + n, part + [r]
        parts.append((size, part))
    total = sum(size for size, _ in parts)
    # equal shares, not full ones and a small rest. (32 groups of 8 x 512 tokens make 6,6,6,6,6,2 groups at the
    # 0.5B step's budget. Two cuts that left no small last one were slower or held more, on an H100: shares of what
    # is left, 6,7,6,7,6 groups, update 1.10 -> 1.15 s and 44 -> 59 GiB reserved; the same six micro-batches of 5
    # or 6 groups, the same update time and 44 -> 52 GiB reserved, past the 45 the issue allows.)
    fill = total / max(-(-total // token_budget), 1)
    out, cur, used = [], [], 0
    for size, rows in sorted(parts, key=lambda p: max(r.length for r in p[1])):
        if cur and (used + size > token_budget or used + size / 2 > fill):
            out.append(cur)
            cur, used = [], 0
        cur += rows
        used += size
    if cur:
        out.append(cur)
    return out


@dataclass
class Packed:
    ids: torch.Tensor  # [N] each distinct prompt's tokens, then each row's completion input
    pos: torch.Tensor  # [N] position of each token in its sequence
    cu_q: torch.Tensor  # [S + 1] int32 query segments over the stream: the prompts, then rows with input
    cu_k: torch.Tensor  # [S + 1] int32 key segments over key_idx
    key_idx: torch.Tensor  # [K] stream index of each key: a row's prompt tokens, then its own
    max_q: int
    max_k: int
    src: torch.Tensor  # [M] stream index of the hidden state that predicts each scored token
    targets: torch.Tensor  # [M] the scored (completion) tokens
    row: torch.Tensor  # [M] where each scored token goes in the [B, T] output
    col: torch.Tensor
    mask: torch.Tensor  # [B, T] float, 1 on completion tokens


def bounds(lens: torch.Tensor) -> torch.Tensor:
    """Segment lengths -> int32 boundaries [0, l0, l0 + l1, ...] (flash attention's cu_seqlens)."""
    return F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)


def seg_arange(starts: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """cat(arange(s, s + n) for s, n in zip(starts, lens)), without a Python loop over the segments."""
    offsets = lens.cumsum(0) - lens
    return torch.repeat_interleave(starts - offsets, lens) + torch.arange(int(lens.sum()), device=lens.device)


def longs(lists: list[list[int]]) -> torch.Tensor:
    """The lists' ints end to end, as a long tensor. Through numpy: torch.tensor reads a list of 29k Python ints
    in 3.5 ms, numpy in 0.4 (the packing of a 0.5B micro-batch, which the GPU waits for before the first one)."""
    return torch.from_numpy(np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64))


def pack(batch: list[Sample], device) -> Packed:
    """The micro-batch as one stream and its index tensors (built on the host, copied without a wait)."""
    first: dict[tuple, int] = {}  # prompt -> its index among the distinct prompts
    distinct: list[list[int]] = []
    which = []
    for s in batch:
        key = tuple(s.prompt_ids)
        if key not in first:
            first[key] = len(distinct)
            distinct.append(s.prompt_ids)
        which.append(first[key])
    long = dict(dtype=torch.long)
    p_len = torch.tensor([len(p) for p in distinct], **long)
    p_start = p_len.cumsum(0) - p_len
    n_prompt = int(p_len.sum())
    c_len = torch.tensor([len(s.completion_ids) for s in batch], **long)
    c_in = (c_len - 1).clamp(min=0)  # the last token is a target only
    c_start = n_prompt + c_in.cumsum(0) - c_in
    which = torch.tensor(which, **long)
    rp_len, rp_start = p_len[which], p_start[which]

    ids = longs(distinct + [s.completion_ids[:-1] for s in batch])
    pos = torch.cat([seg_arange(torch.zeros_like(p_len), p_len), seg_arange(rp_len, c_in)])
    has = c_in > 0  # rows with no completion input need no attention (their one token is scored from the prompt)
    # keys: each prompt over itself, then for each row its prompt's tokens followed by its own
    starts = torch.cat([p_start, torch.stack([rp_start[has], c_start[has]], 1).reshape(-1)])
    lens = torch.cat([p_len, torch.stack([rp_len[has], c_in[has]], 1).reshape(-1)])
    key_idx = seg_arange(starts, lens)
    q_len = torch.cat([p_len, c_in[has]])
    k_len = torch.cat([p_len, (rp_len + c_in)[has]])
    # the hidden state that predicts completion token j: the prompt's last for j = 0, else input token j - 1
    one = torch.ones_like(c_len)
    src = seg_arange(torch.stack([rp_start + rp_len - 1, c_start], 1).reshape(-1),
                     torch.stack([torch.minimum(c_len, one), c_in], 1).reshape(-1))
    targets = longs([s.completion_ids for s in batch])
    row = torch.repeat_interleave(torch.arange(len(batch)), c_len)
    col = seg_arange(torch.zeros_like(c_len), c_len)
    mask = torch.zeros((len(batch), max(int(c_len.max()), 1)))
    mask[row, col] = 1.0
    to = lambda t: to_device(t, device)  # noqa: E731  (queued behind the GPU's work: packing overlaps backward)
    return Packed(to(ids), to(pos), to(bounds(q_len)), to(bounds(k_len)), to(key_idx), int(q_len.max()), int(k_len.max()),
                  to(src), to(targets), to(row), to(col), to(mask))


# ----------------------------------------------------------------------------------------------- attention
def padded_attention(q, k, v, pk: Packed, scale: float):
    """The reference: each segment padded to [S, heads, max, D], a mask that is causal from the bottom
    right (a row's queries are its last tokens) and hides padding, then SDPA. q [N, H, D], k/v [K, Hkv, D]."""
    q_len, k_len = (pk.cu_q[1:] - pk.cu_q[:-1]).long(), (pk.cu_k[1:] - pk.cu_k[:-1]).long()
    s = len(q_len)
    dev = q.device
    q_seg = torch.repeat_interleave(torch.arange(s, device=dev), q_len)
    k_seg = torch.repeat_interleave(torch.arange(s, device=dev), k_len)
    # each token's slot in its segment's padded rows, flat: index_copy and index_select move whole rows, where
    # index_put over (segment, offset) took 0.8 ms a call in backward on cpu_step's workload (two cores)
    q_at = torch.arange(q.shape[0], device=dev) - pk.cu_q[:-1].long()[q_seg] + q_seg * pk.max_q
    k_at = torch.arange(k.shape[0], device=dev) - pk.cu_k[:-1].long()[k_seg] + k_seg * pk.max_k

    def padded(t, at, n):
        return t.new_zeros((s * n,) + t.shape[1:]).index_copy(0, at, t).view((s, n) + t.shape[1:]).transpose(1, 2)

    qp, kp, vp = padded(q, q_at, pk.max_q), padded(k, k_at, pk.max_k), padded(v, k_at, pk.max_k)
    i = torch.arange(pk.max_q, device=dev)[None, :, None]
    j = torch.arange(pk.max_k, device=dev)[None, None, :]
    # key 0 is always visible, so padding queries never see an empty row (that would be NaN in backward)
    mask = ((j < k_len[:, None, None]) & (j <= i + (k_len - q_len)[:, None, None])) | (j == 0)
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:, None], scale=scale,
                                       enable_gqa=kp.shape[1] != qp.shape[1])
    return o.transpose(1, 2).reshape((s * pk.max_q,) + q.shape[1:]).index_select(0, q_at)


def length_buckets(q_len: list[int], k_len: list[int], slack: float = 1.3, waste: int = 1 << 16) -> list[list[int]]:
    """Segments in groups of like lengths (sorted by keys, then queries). A group's padding (segments x longest
    queries x longest keys, less the query-key pairs its segments hold) stays within `slack` of what they hold
    or within `waste` pairs: a group costs a dozen more operations each way, worth it only past that."""
    out, cur, area, mq, mk = [], [], 0, 0, 0
    for s in sorted(range(len(q_len)), key=lambda s: (k_len[s], q_len[s])):
        a, nq, nk = q_len[s] * k_len[s], max(mq, q_len[s]), max(mk, k_len[s])
        padding = (len(cur) + 1) * nq * nk - (area + a)
        if cur and padding > max((slack - 1) * (area + a), waste):
            out.append(cur)
            cur, area, nq, nk = [], 0, q_len[s], k_len[s]
        cur, area, mq, mk = cur + [s], area + a, nq, nk
    return out + [cur] if cur else out


def bucketed_attention(q, k, v, pk: Packed, scale: float):
    """padded_attention over groups of segments of like lengths (length_buckets). All at once, every segment is
    padded to the longest queries and the longest keys of the micro-batch: with R1-Zero's template on the
    miniature world (prompts of ~500 tokens, answers of 20-250) that was 26.8M query-key pairs a head where the
    segments hold 4.6M, and attention took three quarters of the CPU update."""
    q_len, k_len = (pk.cu_q[1:] - pk.cu_q[:-1]).tolist(), (pk.cu_k[1:] - pk.cu_k[:-1]).tolist()
    groups = length_buckets(q_len, k_len)
    if len(groups) == 1:
        return padded_attention(q, k, v, pk, scale)
    long = dict(dtype=torch.long, device=q.device)
    segs = [s for g in groups for s in g]
    ql, kl = torch.tensor([q_len[s] for s in segs], **long), torch.tensor([k_len[s] for s in segs], **long)
    qi = seg_arange(pk.cu_q[:-1].long()[segs], ql)
    ki = seg_arange(pk.cu_k[:-1].long()[segs], kl)
    # one gather in group order, then views by group: in backward one scatter, where a gather a group gave every
    # group a zeroed gradient of the whole K and V to add up (a third of the demo's update)
    tokens = lambda lens: [sum(lens[s] for s in g) for g in groups]  # noqa: E731
    qs = q.index_select(0, qi).split(tokens(q_len))
    ks, vs = (t.index_select(0, ki).split(tokens(k_len)) for t in (k, v))
    counts = [len(g) for g in groups]
    outs = []
    for qg, kg, vg, gq, gk in zip(qs, ks, vs, ql.split(counts), kl.split(counts)):
        part = replace(pk, cu_q=bounds(gq), cu_k=bounds(gk), max_q=int(gq.max()), max_k=int(gk.max()))
        outs.append(padded_attention(qg, kg, vg, part, scale))
    # each stream token is a query of one segment: the groups' outputs back in stream order
    return torch.cat(outs).index_select(0, torch.argsort(qi))


def _varlen_fns() -> list:
    """torch's variable-length flash attention, adapted to one calling convention: the ways to run it with
    fewer K/V heads than query heads, best first (the kernel shares them; else K/V are repeated per head,
    which costs copies of the gathered keys and values and their gradients' sums). [] if it is missing."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return []
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:  # (-1, 0): causal, no window
        causal = dict(window_size=(-1, 0))
    elif "is_causal" in params:
        causal = dict(is_causal=True)
    else:
        return []
    if "scale" not in params:
        return []
    flag = "enable_gqa" in params

    def make(repeat: bool):
        def attend(q, k, v, pk: Packed, scale: float):
            extra = {}
            if k.shape[1] != q.shape[1]:
                if repeat:
                    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
                elif flag:
                    extra = dict(enable_gqa=True)
            return varlen_attn(q, k, v, pk.cu_q, pk.cu_k, pk.max_q, pk.max_k, scale=scale, **causal, **extra)

        return attend

    # without the flag (torch before 2.12) the flash kernel may still take fewer K/V heads: the trial decides
    return [make(False), make(True)]


_chosen: dict = {}


def attention_for(device: torch.device):
    """varlen flash attention where it runs and matches the padded reference (gradients included), else padded
    attention in length buckets."""
    if device.type != "cuda":
        return bucketed_attention
    if "attend" not in _chosen:
        chosen, cause = None, "torch has none"
        for fn in _varlen_fns():
            try:
                # gradients are part of the trial, whatever grad mode the first call came in (a no-grad scoring pass)
                with torch.enable_grad():
                    if _agrees(fn, padded_attention, device):
                        chosen = fn
                        break
                cause = "it did not agree with the padded reference"
            except Exception as e:  # noqa: BLE001  (any kernel or launch failure: the next way, then the reference)
                cause = why(e)
        if chosen is None:
            print("ponder: packed forward: variable-length flash attention is missing or failed its trial; "
                  f"using padded attention ({cause})", file=sys.stderr)
        _chosen["attend"] = chosen or bucketed_attention
    return _chosen["attend"]


def _agrees(fn, ref, device) -> bool:
    g = torch.Generator().manual_seed(0)
    batch = [Sample(p, c) for p, c in (([5, 6, 7], [1, 2, 3, 4]), ([5, 6, 7], [9, 8]), ([4] * 40, list(range(70))),
                                      ([3, 3], [1]))]
    pk = pack(batch, device)
    n, kn = pk.ids.shape[0], pk.key_idx.shape[0]
    q = torch.randn((n, 8, 64), generator=g).to(device, torch.bfloat16).requires_grad_()
    k, v = (torch.randn((kn, 2, 64), generator=g).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
    outs = []
    for f in (fn, ref):
        o = f(q, k, v, pk, 0.125)
        weights = torch.linspace(-1, 1, o.numel(), device=device).view_as(o)  # a loss that weighs every output
        outs.append((o, *torch.autograd.grad((o.float() * weights).sum(), (q, k, v))))
    return all(torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2) for a, b in zip(*outs))


# ------------------------------------------------------------------------------------------------ forward
def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] along the first dimension, where idx repeats rows (a prompt's keys for each of its G rows, its last
    hidden state for each row's first token), so backward sums several gradients into one row. On CPU the
    backward of t[idx] is index_put_ with accumulate, which for float32 from 32,768 elements on adds from every
    thread with atomic adds: the order of each row's sum, and so its last bits, changes from call to call (two
    runs of one seed differed from step 2). index_select's backward (index_add_) gave one result every time, and
    was faster (0.37 against 3.8 ms for a 37,797 x 32 gather and its backward, two threads). On CUDA t[idx]
    stays: its backward sorts the indices, where index_add_ would add with atomics."""
    return t[idx] if t.is_cuda else t.index_select(0, idx)


def supports(model) -> bool:
    arch, _ = describe(model)
    return arch is not None and arch.window is None


def packed_logprobs(model, batch: list[Sample], device, *, with_entropy: bool = False, temperature: float = 1.0,
                    autocast: bool = False, scratch: torch.Tensor | None = None, copies: dict | None = None,
                    entropy_grad: bool = False):
    """Log-probs [B, T] of each row's completion tokens (0 past its end), entropies [B, T] (detached unless
    entropy_grad, or None) and the [B, T] mask of real tokens: what ponder.rl.forward.completion_logprobs gives, computed packed.
    `scratch`: idle device memory (flat bytes) the head may fill with its kept logits (see fused_head).
    `copies`: bf16 copies of the linear layers' float32 matrices, by master parameter (see linears)."""
    arch, why = describe(model)
    if arch is None:
        raise ValueError(f"packed forward: {why}")
    pk = pack(batch, device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        hidden = _hidden(arch, pk, torch.device(device), copies)
        h = rows(hidden, pk.src)
        head = arch.head
        if isinstance(head, torch.nn.Linear) and head.bias is None:
            if autocast:
                h = h.to(torch.bfloat16)
            lp, ent = fused_head_logprobs(h, head.weight, pk.targets, temperature, with_entropy, scratch=scratch,
                                          weight_copy=(copies or {}).get(id(head.weight)), entropy_grad=entropy_grad)
        else:  # a wrapped head (LoRA on the output layer): call it, chunk by chunk
            lp, ent = chunked_head_logprobs(head, h, pk.targets, temperature, 1024, with_entropy, entropy_grad=entropy_grad)
    b, t = pk.mask.shape
    out = hidden.new_zeros((b, t), dtype=torch.float32).index_put((pk.row, pk.col), lp)
    out_ent = None
    if with_entropy:
        out_ent = torch.zeros((b, t), dtype=torch.float32, device=out.device).index_put(
            (pk.row, pk.col), ent if entropy_grad else ent.detach())
    return out, out_ent, pk.mask


def linears(h, mods, join: bool = True, copies: dict | None = None):
    """The outputs of linear layers that read the same input h: plain ones as one matrix product over their
    stacked weights where `join` (q, k, v: a copy of a few MB that autograd splits back), else each by itself;
    LoRA layers through ponder.rl.lora_linears (one cast of h, the adapter added by its own product). With
    `copies` (the rollout copy's bf16 matrices by master parameter), through them (ponder.rl.copy_linear)."""
    parts = [adapter(m) for m in mods]
    if h.dim() == 2 and any(p is not None for p in parts):
        return with_adapters(h, mods, parts)
    if copies:
        groups = [tuple(mods)] if join else [(m,) for m in mods]
        found = [copies_for(g, copies) for g in groups]
        if all(f is not None for f in found):
            outs = [linear_from_copy(h, g, *f) for g, f in zip(groups, found)]
            return outs[0].split([m.out_features for m in mods], -1) if join else outs
    if (not join or len(mods) == 1 or not all(type(m) is torch.nn.Linear for m in mods)
            or len({m.bias is None for m in mods}) > 1):
        return [m(h) for m in mods]
    w = torch.cat([m.weight for m in mods])
    b = torch.cat([m.bias for m in mods]) if mods[0].bias is not None else None
    return F.linear(h, w, b).split([m.out_features for m in mods], -1)


def attention_dtype(cuda: bool, autocast: torch.dtype | None, dtype: torch.dtype) -> torch.dtype:
    """The one dtype q, k and v take for attention, given autocast's dtype (None: autocast off) and q's. On CUDA
    autocast's where it is on, as it rounds SDPA's inputs in the HF forward (Qwen3's q_norm/k_norm over float32 norm
    weights give float32 q and k beside a bf16 v; flash attention takes bf16). On CPU float32 under autocast (and
    autocast off around it): there bf16 pays in the products, while the CPU flash attention's bf16 backward took 7x
    its float32 one (cpu_step's update, two Xeon cores: 117 against 16 ms)."""
    if autocast is None:
        return dtype
    return autocast if cuda else torch.float32


def _hidden(arch, pk: Packed, device: torch.device, copies: dict | None = None) -> torch.Tensor:
    """Final-norm hidden states [N, d] of the stream. Unsharded, a layer's last residual add is fused with the
    next layer's input norm (it reads the next layer's weight). Sharded (FSDP2), each layer reads its own weights
    only, which are gathered for it: the layer runs through its `sharded_call` (ponder.sharding), between
    FSDP's pre- and post-forward hooks, norming its own input first; the final norm is the root's."""
    bb, K, attend = arch.backbone, pieces(device), attention_for(device)
    x = bb.embed_tokens(pk.ids)
    cos, sin = bb.rotary_emb(x, pk.pos[None])
    cos, sin = cos[0][:, None], sin[0][:, None]  # [N, 1, D]
    layers = bb.layers
    ckpt = bool(getattr(bb, "gradient_checkpointing", False)) and torch.is_grad_enabled()
    sharded = hasattr(layers[0], "sharded_call")
    q_scale = arch.query_scales(pk.pos, pk.max_k)  # Ministral 3; a segment's positions are below its keys

    def layer_fn(li, x, h):
        layer = layers[li]
        attn, mlp, n = layer.self_attn, layer.mlp, x.shape[0]
        if h is None:  # sharded: the layer's own input norm (post-norm: none)
            h = x if arch.post_norm else K["rms"](x, *norm_args(layer.input_layernorm))
        qkv = linears(h, qkv_projections(attn), copies=copies)
        if len(qkv) == 1:  # one fused layer (Phi-3)
            qkv = qkv[0].split(arch.qkv_sizes, -1)
        q, k, v = qkv
        q = q.view(n, arch.n_heads, arch.head_dim)
        k = k.view(n, arch.n_kv, arch.head_dim)
        v = v.view(n, arch.n_kv, arch.head_dim)
        q, k = qk_norms(attn, q, k, K["rms"])  # Qwen3, OLMo 2
        if rotary(attn):  # not SmolLM3's NoPE layers
            q, k = K["rope_qk"](q, k, cos.to(q.dtype), sin.to(q.dtype))
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        dev = x.device.type
        autocast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        dtype = attention_dtype(x.is_cuda, autocast, q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        # flash attention takes half types only: float32 (train.precision=fp32 on CUDA) goes to the padded SDPA
        fn = attend if dtype in (torch.float16, torch.bfloat16) else bucketed_attention
        with torch.autocast(dev, enabled=False) if autocast and dtype != autocast else contextlib.nullcontext():
            o = fn(q, rows(k, pk.key_idx), rows(v, pk.key_idx), pk, arch.scaling)
        o = linears(o.reshape(n, -1), (attn.o_proj,), copies=copies)[0]
        if arch.post_norm:  # OLMo 2: each block's output normed, then added; the next block reads the stream
            x = x + K["rms"](o, *norm_args(layer.post_attention_layernorm))
            h = x
        else:
            x, h = K["add_rms"](x, o, *norm_args(layer.post_attention_layernorm))
        if swiglu(arch, mlp):  # gate and up stay two products: SwiGLU's backward on halves of one output was slower (H200, measured)
            gate_up = linears(h, gate_up_projections(mlp), join=False, copies=copies)
            gate, up = gate_up if len(gate_up) == 2 else gate_up[0].chunk(2, -1)
            m = linears(K["swiglu"](gate, up), (mlp.down_proj,), copies=copies)[0]
        else:
            m = own_mlp(mlp, h)
        if arch.post_norm:
            x = x + K["rms"](m, *norm_args(layer.post_feedforward_layernorm))
            if sharded:
                return x
            return x, (K["rms"](x, *norm_args(bb.norm)) if li + 1 == len(layers) else x)
        if sharded:
            return x + m
        after = layers[li + 1].input_layernorm if li + 1 < len(layers) else bb.norm
        return K["add_rms"](x, m, *norm_args(after))

    if sharded:  # FSDP outside, checkpointing inside: the recomputation in backward finds the weights gathered
        run = (lambda li, x: checkpoint(layer_fn, li, x, None, use_reentrant=False)) if ckpt else (lambda li, x: layer_fn(li, x, None))
        for li in range(len(layers)):
            x = layers[li].sharded_call(run, li, x)
        return K["rms"](x, *norm_args(bb.norm))
    h = x if arch.post_norm else K["rms"](x, *norm_args(layers[0].input_layernorm))
    for li in range(len(layers)):
        x, h = checkpoint(layer_fn, li, x, h, use_reentrant=False) if ckpt else layer_fn(li, x, h)
    return h
