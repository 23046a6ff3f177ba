"""The decoder forward of the Llama family over a Hugging Face model's own modules, with a paged KV cache.

Projections and MLPs are the model's modules, or one product over parameters that fused_weights joined;
norms use the modules' own weights. So LoRA layers and weight updates are seen. Attention, rotary
embedding and the cache are done here; prefill and decode share the per-layer pieces. Cache layout:
[layers, 2 (k, v), blocks, kv heads, block, head dim]; a row's block table lists the blocks that hold its
positions in order, so a sequence's token at position p sits in slot p % block of its (p // block)-th block,
prompts need no padding in the cache, and samples of one prompt can share the blocks of their prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.nn.modules.module as _hooks

from ponder.kernels import decode_attention as attention_kernel
from ponder.kernels.arch import Arch, gate_up_projections, norm_args, own_mlp, qk_norms, qkv_projections, rotary, swiglu
from ponder.kernels.decode_step import CPU, EAGER, kernels
from ponder.kernels.fp8_linear import fits, fp8_linear, fp8_matrix, rows_cast
from ponder.kernels.norm import const
from ponder.kernels.rope import rope_signed, signed_sin
from ponder.kernels.sampler import row_keys
from ponder.rollout.fast_sampling import sample
from ponder.rollout.fused_weights import joined
from ponder.runtime import to_device

EOS_SLOTS = 8  # end-of-sequence ids the captured step checks
ROW_KV_BYTES = 1 << 30  # CPU: the most the in-order copy of rows' K/V may take (Forward.row_kv)


def raw(t: torch.Tensor) -> torch.Tensor:
    """An fp8 cache (or K/V already rounded to it) as bytes, for index writes and copies: torch's CPU index_copy_
    takes no float8; the bytes move the same either way."""
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t


# where an fp8 cache's scales put the largest |K| and |V| of a call's first prompts (or 1, if that is smaller): e4m3
# holds up to 448, so values up to 4x those fit; a float's relative precision does not depend on the scale (below
# 2^-6 x scale, subnormals)
FP8_ROOM = 112.0

# weight_dtype fp8: the fewest parameters of a matrix whose product goes through e4m3, by device type. On one H100
# (bench/decode_products.py --fp8, with the rows' cast) e4m3 lost below this (0.5B's products, 1.5B's q|k|v, o and
# down: 5.5 -> 11.2 us, 10.3 -> 18.1, ...) and won above (1.5B's gate|up 27.5M: 24.5 -> 20.9 us; 7B's gate|up 98.7
# -> 63.4, down 65.5 -> 57.3). The CPU has no FP8 units: every matrix, to check the numbers.
FP8_MIN_PARAMS = {"cuda": 20_000_000}


def plain(m) -> bool:
    """Whether m is an nn.Linear without hooks: its forward is F.linear over its weight and bias, nothing else."""
    hooked = (m._forward_hooks or m._forward_pre_hooks or getattr(_hooks, "_global_forward_hooks", True)
              or getattr(_hooks, "_global_forward_pre_hooks", True))  # (torch's private registries; missing: called)
    return type(m) is torch.nn.Linear and not hooked


def _linear(m, x):
    """m(x) for a linear layer: a plain nn.Linear as F.linear (its forward) without the module call, a few
    microseconds each of the decode step's products on CPU; anything else (LoRA, hooks) called."""
    return F.linear(x, m.weight, m.bias) if plain(m) else m(x)


def queued(data, device) -> torch.Tensor:
    """torch.tensor(data) on `device`, its copy queued behind the GPU's work (ponder.runtime.to_device): a host
    check that waited for the GPU would end its overlap with the decode step queued ahead of it."""
    return to_device(torch.tensor(data), device)


def fp8_products(arch: Arch, least: int, qkv=None, gate_up=None) -> tuple[list[torch.Tensor], list[str]]:
    """The matrices weight_dtype fp8 gives e4m3 copies: each layer's q|k|v, o, gate|up and down (joined where their
    rows share a buffer: a Forward passes its own views, qkv and gate_up, which its products look up by id) of at
    least `least` parameters; and the kinds of product left in the compute dtype for another reason (wrapped
    layers, expert blocks, a dimension torch._scaled_mm does not take)."""
    mats, left = [], set()
    for li, layer in enumerate(arch.backbone.layers):
        j = qkv[li] if qkv else joined(qkv_projections(layer.self_attn))
        places = {"q|k|v": [j[0]] if j else list(qkv_projections(layer.self_attn)), "o": [layer.self_attn.o_proj]}
        if swiglu(arch, layer.mlp):
            j = gate_up[li] if gate_up else joined(gate_up_projections(layer.mlp))
            places["gate|up"] = [j[0]] if j else list(gate_up_projections(layer.mlp))
            places["down"] = [layer.mlp.down_proj]
        else:
            left.add("the MLPs (expert blocks, or not SwiGLU)")
        for kind, parts in places.items():
            for p in parts:
                w = p if isinstance(p, torch.Tensor) else p.weight if plain(p) else None
                if w is None or not fits(w):
                    left.add(kind)
                elif w.numel() >= least:
                    mats.append(w)
    return mats, sorted(left)


class Forward:
    """Prefill and decode over a paged KV cache; holds no weights of its own.

    The cache is a pool of blocks ([layers, 2 (k, v), blocks, kv heads, block, head dim]); a row's block table
    maps its slots to blocks (slot s: block table[row, s // block], offset s % block). Block 0 is the sink: idle
    rows and table entries not yet handed out point there, so stray writes land where nothing is read."""

    def __init__(self, arch: Arch, rows: int, blocks: int, block: int, positions: int, dtype, device,
                 attention: str = "sdpa", fused: bool = True, autocast: bool = False, kv_dtype=None,
                 fp8_weights: bool = False):
        self.a, self.dtype, self.device, self.attention = arch, dtype, device, attention
        # the cache's dtype: the compute dtype, or fp8 (e4m3, kv_dtype: fp8): K/V rounded as they are written,
        # read back in `dtype`; half the bytes each decode step's attention reads
        kv_dtype = kv_dtype or dtype
        # matrices in `dtype` beside float32 embeddings and norms (the fast engine's rollout copy): products in
        # `dtype`, the residual stream in float32, as autocast over the float32 model computes it
        self.autocast = autocast
        # the norms' outputs rounded to `dtype` in their own kernel where products run in it: autocast would cast
        # them again before each product, one more small kernel (and one for each bias) a product and step
        self.narrow = dtype if autocast else None
        self.k = kernels(torch.device(device)) if fused else EAGER
        # CPU: the kernels' rotary takes the sine table signed (ponder.kernels.rope.signed_sin), kept in self.sin
        self.signed = self.k is CPU
        if attention == "triton" and torch.device(device).type == "cuda" and not attention_kernel.available(device):
            self.attention = "sdpa"  # no working kernel (one notice printed): cuDNN's attention is next best
        self.swiglu = [swiglu(arch, l.mlp) for l in arch.backbone.layers]
        layers = len(arch.backbone.layers)
        # (weight, bias) of q|k|v and of gate|up where their parameters are rows of one buffer (fused_weights, or
        # one layer of the model's own: Phi-3)
        self.qkv = [joined(qkv_projections(l.self_attn)) for l in arch.backbone.layers]
        self.gate_up = [joined(gate_up_projections(l.mlp)) if g else None for l, g in zip(arch.backbone.layers, self.swiglu)]
        self.block = block
        # weight_dtype fp8: the products of q|k|v, o, gate|up and down from e4m3 copies of their matrices, by the id
        # of the matrix each stands for: (matrix, e4m3 copy, scales); quantize() fills them in place (graphs read
        # them) when the matrices changed. What stays in `dtype` (wrapped layers, expert blocks, a dimension
        # torch._scaled_mm does not take) is named in fp8_left.
        self.fp8: dict[int, tuple] = {}
        self.fp8_left: list[str] = []
        self.fp8_stamp = None
        if fp8_weights:
            self._fp8_matrices(arch, FP8_MIN_PARAMS.get(torch.device(device).type, 0))
            self.rows_fp8 = rows_cast(torch.device(device))
        self.kv = torch.zeros((layers, 2, blocks, arch.n_kv, block, arch.head_dim), dtype=kv_dtype, device=device)
        # fp8: K and V are stored divided by a scale per layer, [layers, 2], set by each call's first prefill
        # (`calibrate`) so that its largest |K| and |V| land at FP8_ROOM; kv_peak, the largest stored |value| before
        # rounding that the call's writes have met, prefill's and decode's (past e4m3's 448 the cache saturates),
        # read once a call.
        fp8 = kv_dtype.itemsize == 1
        self.kv_scale = torch.ones((layers, 2), device=device) if fp8 else None
        self.kv_peak = torch.zeros((), device=device) if fp8 else None
        self.calibrate = False
        positions = -(-positions // block) * block
        self.table = torch.zeros((rows, positions // block), dtype=torch.long, device=device)
        self.cos = torch.empty((positions, arch.head_dim), dtype=dtype, device=device)
        self.sin = torch.empty_like(self.cos)
        # layers without rotary embedding (NoPE) run the same kernels over the identity rotation: cos 1, sin 0
        self.nope = [not rotary(l.self_attn) for l in arch.backbone.layers]
        self.still = (torch.ones_like(self.cos), torch.zeros_like(self.sin)) if any(self.nope) else None
        if self.still and self.signed:
            self.still = (self.still[0], signed_sin(self.still[1]))
        # static inputs of the decode step (CUDA graphs read them at fixed addresses)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows_idx = torch.arange(rows, device=device)
        self.slots = torch.arange(positions, device=device)
        # per-call state, updated inside the captured step so the host only replays it
        self.row_seq = torch.zeros(rows, dtype=torch.long, device=device)  # row -> sequence (sink: out_tok's last row)
        self.n_out = torch.zeros(rows, dtype=torch.long, device=device)  # tokens the row's sequence has so far
        self.limit = torch.zeros(rows, dtype=torch.long, device=device)  # the row is done at this many tokens
        self.live = torch.zeros(rows, dtype=torch.bool, device=device)
        self.out_tok = torch.zeros((1, 1), dtype=torch.long, device=device)  # [sequences + sink, tokens]
        self.out_lp = torch.zeros((1, 1), dtype=torch.float32, device=device)
        self.seed = torch.zeros((), dtype=torch.long, device=device)
        self.eos = torch.full((EOS_SLOTS,), -1, dtype=torch.long, device=device)
        # CPU (eager, no graphs): each row's K/V also laid out in order, [layers, 2, rows, kv heads, positions, D],
        # copied from the pool when a sequence takes the row (prefill writes the pool) and written instead of the
        # pool at each decode step, so that a step reads a view of it: gathering every row's blocks in every layer
        # and step took half the CPU decode step of a small model. Slots past a row's position hold finite
        # leftovers (zeros, or an earlier sequence's), masked as the pool's are. It costs rows x positions slots
        # whatever is live, so only while that is small (the miniature world's models); past ROW_KV_BYTES the step
        # gathers from the pool as on CUDA
        self.row_kv = None
        shape = (layers, 2, rows, arch.n_kv, positions, arch.head_dim)
        if (torch.device(device).type == "cpu" and attention != "triton"
                and math.prod(shape) * kv_dtype.itemsize <= ROW_KV_BYTES):
            self.row_kv = torch.zeros(shape, dtype=kv_dtype, device=device)
            # offset of (k or v, kv head) in a row's slots: [1, 2, kv heads]
            lane = torch.arange(2, device=device)[:, None] * (rows * arch.n_kv) + torch.arange(arch.n_kv, device=device)
            self._kv_lane = (lane * positions)[None]

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    @property
    def blocks(self) -> int:
        return self.kv.shape[2]

    @property
    def positions(self) -> int:
        return self.table.shape[1] * self.block

    def grow(self, blocks: int):
        """A larger pool with the same blocks at the same ids (callers drop graphs that read the old one)."""
        kv = self.kv.new_zeros(self.kv.shape[:2] + (blocks,) + self.kv.shape[3:])
        kv[:, :, : self.blocks] = self.kv
        self.kv = kv

    def load_rows(self, idx: torch.Tensor):
        """Rows `idx` took new sequences: their K/V so far (prefilled into the blocks of their tables) into row_kv."""
        if self.row_kv is not None:  # [layers, 2, rows, blocks, kv heads, block, D] -> [.., kv heads, positions, D]
            raw(self.row_kv)[:, :, idx] = raw(self.kv)[:, :, self.table[idx]].transpose(3, 4).flatten(4, 5)

    def fits(self, seqs: int, tokens: int) -> bool:
        return self.out_tok.shape[0] > seqs and self.out_tok.shape[1] >= tokens

    def outputs(self, seqs: int, tokens: int):
        """Output tables for `seqs` sequences of up to `tokens` tokens (the last row is the sink). Graphs
        write them at fixed addresses: the caller drops its graphs when this allocates new ones."""
        self.out_tok = torch.zeros((seqs + 1, tokens), dtype=torch.long, device=self.device)
        self.out_lp = torch.zeros((seqs + 1, tokens), dtype=torch.float32, device=self.device)
        self.out_ent = torch.zeros((seqs + 1, tokens), dtype=torch.float32, device=self.device)

    def refresh_rope(self):
        """Rotary tables from the model's own rotary module (any RoPE scaling it implements)."""
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.a.backbone.rotary_emb(probe, self.slots[None])
        self.cos.copy_(cos[0])
        self.sin.copy_(signed_sin(sin[0]) if self.signed else sin[0])

    def _rope(self, at):
        """[(cos, sin) of the model's rotary embedding, and of the identity rotation if a layer is NoPE], each
        table's rows picked by `at`: indexed by self.nope[layer]."""
        pairs = [(self.cos, self.sin)] + ([self.still] if self.still else [])
        return [(at(c), at(s)) for c, s in pairs]

    def _fp8_matrices(self, arch: Arch, least: int) -> None:
        """self.fp8's e4m3 copies of each layer's product matrices of at least `least` parameters, and fp8_left: the
        products left in `dtype` for another reason."""
        mats, self.fp8_left = fp8_products(arch, least, self.qkv, self.gate_up)
        for w in mats:
            self.fp8[id(w)] = (w, *fp8_matrix(w))

    @torch.no_grad()
    def quantize(self, stamp) -> None:
        """The e4m3 copies (weight_dtype fp8) made again from their matrices, in place, unless `stamp` (the optimizer
        steps so far) and the matrices' version counters are those of the last time."""
        stamp = (stamp, [w._version for w, _, _ in self.fp8.values()])
        if stamp == self.fp8_stamp:
            return
        for w, w8, scale in self.fp8.values():
            fp8_matrix(w, (w8, scale))
        self.fp8_stamp = stamp

    def _product(self, x, w, b=None):
        """F.linear(x, w, b), from w's e4m3 copy where it has one (weight_dtype fp8)."""
        e = self.fp8.get(id(w))
        return F.linear(x, w, b) if e is None else fp8_linear(x, e[1], e[2], b, self.rows_fp8, self.dtype)

    def _layer(self, m, x):
        """m(x) for a linear layer: its e4m3 copy's product where it has one, else as _linear."""
        return self._product(x, m.weight, m.bias) if id(m.weight) in self.fp8 and plain(m) else _linear(m, x)

    def _qkv(self, li: int, h):
        """q [N, heads, D], k and v [N, kv heads, D] of layer li: one product where q|k|v are joined."""
        a, attn, n = self.a, self.a.backbone.layers[li].self_attn, h.shape[0]
        if self.qkv[li] is not None:
            q, k, v = self._product(h, *self.qkv[li]).split(a.qkv_sizes, -1)
        else:  # separate or wrapped layers (LoRA, called as they are)
            outs = [self._layer(m, h) for m in qkv_projections(attn)]
            q, k, v = outs if len(outs) == 3 else outs[0].split(a.qkv_sizes, -1)
        q, k, v = q.view(n, a.n_heads, a.head_dim), k.view(n, a.n_kv, a.head_dim), v.view(n, a.n_kv, a.head_dim)
        q, k = qk_norms(attn, q, k, self.k["rms"])  # Qwen3, OLMo 2
        return q, k, v

    def _qkv_rope(self, li: int, h, cos, ssin):
        """CPU, one joined q|k|v product and no q/k norms: q [N, heads, D] and kv [N, 2, kv heads, D] as _qkv and
        the kernels' rope_kv give them, with rotary run once over q's and k's heads together (their columns
        are side by side in the product)."""
        a, n = self.a, h.shape[0]
        qk_heads = a.n_heads + a.n_kv
        y = self._product(h, *self.qkv[li])
        qk = y[:, : qk_heads * a.head_dim].view(n, qk_heads, a.head_dim)
        qk = rope_signed(qk, cos, ssin)
        v = y[:, qk_heads * a.head_dim :].view(n, a.n_kv, a.head_dim)
        return qk[:, : a.n_heads], torch.stack((qk[:, a.n_heads :], v), 1)

    def _mlp(self, li: int, h):
        mlp = self.a.backbone.layers[li].mlp
        if self.gate_up[li] is not None:
            return self._layer(mlp.down_proj, self.k["swiglu_halves"](self._product(h, *self.gate_up[li])))
        if self.swiglu[li]:  # separate or wrapped layers (LoRA, called as they are)
            outs = [self._layer(m, h) for m in gate_up_projections(mlp)]
            return self._layer(mlp.down_proj, self.k["swiglu"](*outs) if len(outs) == 2 else self.k["swiglu_halves"](outs[0]))
        return own_mlp(mlp, h)

    def _next_norm(self, li: int):
        """The norm after layer li's MLP: the next layer's input norm, or the final one."""
        layers = self.a.backbone.layers
        return norm_args(layers[li + 1].input_layernorm if li + 1 < len(layers) else self.a.backbone.norm)

    # The residual stream x and each block's input h: pre-norm (input and post-attention norms, the next layer's
    # input norm fused with the residual add), or post-norm (OLMo 2: each block's output normed, then added)
    def _enter(self, x):
        if self.a.post_norm:
            return x
        return self.k["rms"](x, *norm_args(self.a.backbone.layers[0].input_layernorm), self.narrow)

    def _after_attention(self, li: int, x, o):
        layer = self.a.backbone.layers[li]
        if self.a.post_norm:
            x = x + self.k["rms"](o, *norm_args(layer.post_attention_layernorm))
            return x, x
        return self.k["add_rms"](x, o, *norm_args(layer.post_attention_layernorm), self.narrow)

    def _after_mlp(self, li: int, x, m):
        if not self.a.post_norm:
            return self.k["add_rms"](x, m, *self._next_norm(li), self.narrow)
        x = x + self.k["rms"](m, *norm_args(self.a.backbone.layers[li].post_feedforward_layernorm))
        last = li + 1 == len(self.a.backbone.layers)
        return x, self.k["rms"](x, *norm_args(self.a.backbone.norm), self.narrow) if last else x

    def step(self, batch: int, length: int, temperature: float | None):
        """Decode, then (unless temperature is None: return the logits) sample and record the tokens."""
        logits = self.decode(batch, length)
        if temperature is None:
            return logits
        keys = row_keys(self.seed, self.n_out[:batch], self.row_seq[:batch])
        self.record(batch, *sample(logits, temperature, 0, 1.0, keys, True, self.k))
        return None

    def record(self, batch: int, tok: torch.Tensor, lp: torch.Tensor | None, ent: torch.Tensor | None = None):
        """Each row's token: written at its sequence's next index, fed at the next step. The random key of a
        token depends on (seed, sequence, index) alone, so when a sequence runs does not change its samples."""
        at = (self.row_seq[:batch], self.n_out[:batch])
        self.out_tok.index_put_(at, tok)
        if lp is not None:
            self.out_lp.index_put_(at, lp if lp.dtype == torch.float32 else lp.float())
        if ent is not None:
            self.out_ent.index_put_(at, ent)
        self.n_out[:batch] += 1
        self.live[:batch] &= ~(tok[:, None] == self.eos[None, :]).any(-1) & (self.n_out[:batch] < self.limit[:batch])
        self.tokens[:batch] = tok
        self.pos[:batch] += 1

    def snapshot(self, batch: int):
        """The state a step changes (besides slots it rewrites identically), to undo a warm-up step."""
        return [t[:batch].clone() for t in (self.tokens, self.pos, self.live, self.n_out)]

    def restore(self, batch: int, saved):
        for dst, src in zip((self.tokens, self.pos, self.live, self.n_out), saved):
            dst[:batch].copy_(src)

    def prefill(self, *args):
        with self._precision():
            return self._prefill(*args)

    def decode(self, batch: int, length: int) -> torch.Tensor:
        with self._precision():
            return self._decode(batch, length)

    def _precision(self):
        return torch.autocast(torch.device(self.device).type, dtype=self.dtype, enabled=self.autocast)

    def _prefill(self, prompts: list[list[int]], tables: torch.Tensor, decoded_from: list[int] | None = None) -> torch.Tensor:
        """Run token lists from position 0 (packed: no work on padding except inside attention), write their
        K/V into the blocks of their tables [P, blocks a row]; return the last position's logits [P, V].
        `decoded_from` (sequences that gave way, run again): where each list's decoded tokens begin. With an fp8
        cache those positions attend to rounded K/V, as the decode steps that first ran them read the cache:
        a sequence's samples must not depend on whether it gave way."""
        a, dev = self.a, self.device
        lens = queued([len(p) for p in prompts], dev)
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = queued([t for p in prompts for t in p], dev)
        total = sum(len(p) for p in prompts)  # repeat_interleave's output size, or it reads lens back (a wait)
        seq = torch.repeat_interleave(torch.arange(n, device=dev), lens, output_size=total)
        starts = (lens.cumsum(0) - lens).repeat_interleave(lens, output_size=total)
        at = torch.arange(len(ids), device=dev) - starts
        rope = self._rope(lambda t: t[at][:, None])
        q_scale = self.a.query_scales(at, self.positions)  # Ministral 3
        page, off = tables[seq, at // self.block], at % self.block
        decoded = None
        if decoded_from is not None and self.kv.dtype != self.dtype:
            decoded = (at >= queued(decoded_from, dev)[seq])[:, None, None]  # [N, 1, 1]
        # the decode step's pieces (fused norms, joined products), so a chunk costs few kernel launches
        K, layers = self.k, a.backbone.layers
        x = a.backbone.embed_tokens(ids)
        h = self._enter(x)
        for li, layer in enumerate(layers):
            q, kv = K["rope_kv"](*self._qkv(li, h), *rope[self.nope[li]])  # kv: [N, 2, kv heads, D]
            if q_scale is not None:
                q = q * q_scale.to(q.dtype)
            if self.kv_scale is not None:  # fp8: the call's first prefill sets the layer's scales; the peak is watched
                top = kv.abs().amax(dim=(0, 2, 3)).float()  # [2]: K, V
                if self.calibrate:  # (at least 1 / FP8_ROOM: a layer of zeros or non-finite values gets a usable scale)
                    self.kv_scale[li] = torch.nan_to_num(top, nan=1.0, posinf=1.0).clamp(min=1.0) / FP8_ROOM
                self._watch(top, li)
            raw(self.kv[li])[:, page, :, off] = raw(self._stored(kv, li))  # K and V of every token in one write
            # right-padded [P, heads, width, dim]: with a causal mask every real query sees only its own prompt
            qp = q.new_zeros((n, width) + q.shape[1:]).index_put_((seq, at), q).transpose(1, 2)
            kvp = kv.new_zeros((n, width) + kv.shape[1:]).index_put_((seq, at), kv).permute(2, 0, 3, 1, 4)
            attend = lambda kv: F.scaled_dot_product_attention(  # noqa: E731
                qp, kv[0], kv[1], is_causal=True, scale=a.scaling, enable_gqa=a.n_kv != a.n_heads
            ).transpose(1, 2)[seq, at]
            o = attend(kvp)
            if decoded is not None:
                o = torch.where(decoded, attend(self._through_cache(kvp, li, 0)), o)
            o = o.reshape(len(ids), -1)
            x, h = self._after_attention(li, x, self._layer(layer.self_attn.o_proj, o))
            x, h = self._after_mlp(li, x, self._mlp(li, h))
        self.calibrate = False
        return a.head(h[lens.cumsum(0) - 1])

    def _watch(self, top, li: int):
        """kv_peak raised to layer li's largest |K| and |V| about to be stored (top: [2], before the scales)."""
        torch.fmax(self.kv_peak, (top / self.kv_scale[li]).amax(), out=self.kv_peak)  # (fmax: NaN ignored)

    def _stored(self, kv, li: int, dim: int = 1):
        """K and V (stacked along `dim`) as layer li's cache stores them: in its dtype, divided by its scales (fp8)."""
        if self.kv_scale is not None:
            kv = kv / self.kv_scale[li].view((2,) + (1,) * (kv.dim() - dim - 1))
        return kv if kv.dtype == self.kv.dtype else kv.to(self.kv.dtype)

    def _through_cache(self, kv, li: int, dim: int = 1):
        """K and V (stacked along `dim`, an fp8 cache's layer li) as a decode step reads them back: stored, then
        widened to the compute dtype and times the scales; in kv's dtype."""
        scale = self.kv_scale[li].view((2,) + (1,) * (kv.dim() - dim - 1)).to(self.dtype)
        return (self._stored(kv, li, dim).to(self.dtype) * scale).to(kv.dtype)

    def _decode(self, batch: int, length: int) -> torch.Tensor:
        """One step for rows [0, batch): feed self.tokens at self.pos, attend to slots [0, length); logits [batch, V]."""
        a, K = self.a, self.k
        tok, pos, idx, table = self.tokens[:batch], self.pos[:batch], self.rows_idx[:batch], self.table[:batch]
        store = K.get("rope_store")  # one kernel: rotary and the cache write (CUDA, Triton)
        rows = self.row_kv
        # the kernel reads whole tables at each row's position; the torch pieces, this step's rows of them
        rope = self._rope(lambda t: t) if store is not None else self._rope(lambda t: t[pos][:, None])
        q_scale = self.a.query_scales(pos, self.positions)  # Ministral 3
        if store is None:
            if rows is None:
                page, off = table[idx, pos // self.block], pos % self.block
            else:  # each row's K and V slot in a layer's copy seen as [2 * rows * kv heads * positions, D]: one
                # index for every layer's write, which as index_copy_ costs a third of advanced indexing's
                at = (self._kv_lane + (idx * (a.n_kv * self.positions) + pos)[:, None, None]).view(-1)
        mask = None
        if self.attention != "triton":  # the kernel reads each row's live slots itself
            # additive mask made once per step (a boolean one would be converted again in every layer)
            hidden = self.slots[:length][None, :] > pos[:, None]
            mask = torch.zeros(hidden.shape, dtype=self.dtype, device=self.device).masked_fill_(hidden, float("-inf"))
            mask = mask[:, None, None, :]  # [B, 1, 1, L]
        # CPU: q/k/v and rotary joined where nothing sits between them (_qkv_rope)
        joined = self.signed and store is None
        scale = const(a.scaling, torch.float32) if self.signed else a.scaling
        group = a.n_heads // a.n_kv
        layers = a.backbone.layers
        x = a.backbone.embed_tokens(tok)
        h = self._enter(x)
        for li, layer in enumerate(layers):
            cache = self.kv[li]
            if joined and self.qkv[li] is not None and getattr(layer.self_attn, "q_norm", None) is None:
                q, kv = self._qkv_rope(li, h, *rope[self.nope[li]])
            else:
                q, k, v = self._qkv(li, h)
                if store is not None:
                    q = store(q, k, v, *rope[self.nope[li]], pos, cache, table,
                              *(() if self.kv_scale is None else (self.kv_scale[li], self.kv_peak)))
                else:
                    q, kv = K["rope_kv"](q, k, v, *rope[self.nope[li]])
            if store is None:
                if self.kv_scale is not None:
                    self._watch(kv.abs().amax(dim=(0, 2, 3)).float(), li)
                kv = raw(self._stored(kv, li))
                # K and V of every row in one write ([B, 2, kv heads, D]): into the rows' in-order copy, which this
                # step reads, or the pool. The pool's copy of a decoded token is never read where the copy exists:
                # a row taken up later loads only blocks that prefill wrote (its prompt's, or its recomputed ones)
                if rows is not None:
                    raw(rows[li]).view(-1, a.head_dim).index_copy_(0, at, kv.view(-1, a.head_dim))
                else:
                    raw(cache)[:, page, :, off] = kv
            if q_scale is not None:
                q = q * q_scale.to(q.dtype)
            # the query heads sharing a kv head act as that head's query rows: no repeated K/V
            q = q.view(batch, a.n_kv, group, a.head_dim)
            if self.attention == "triton":
                o = attention_kernel.decode_attention(q, cache[0], cache[1], table, pos, a.scaling, length, self.dtype,
                                                      None if self.kv_scale is None else self.kv_scale[li])
            else:
                if rows is not None:
                    kc, vc = rows[li, 0, :batch, :, :length], rows[li, 1, :batch, :, :length]
                else:
                    kc, vc = attention_kernel.gather(cache[0], table, length), attention_kernel.gather(cache[1], table, length)
                if kc.dtype != self.dtype:  # an fp8 cache, read in the compute dtype times its scales
                    k_scale, v_scale = self.kv_scale[li].to(self.dtype)
                    kc, vc = kc.to(self.dtype) * k_scale, vc.to(self.dtype) * v_scale
                if self.attention == "sdpa":
                    o = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=a.scaling)
                elif self.signed:  # CPU: the batched products torch.matmul makes of these, called as they are
                    n = batch * a.n_kv
                    s = torch.bmm(q.reshape(n, group, a.head_dim), kc.flatten(0, 1).transpose(1, 2))
                    s = (s if s.dtype == torch.float32 else s.float()).view(batch, a.n_kv, group, -1)
                    p = s.mul_(scale).add_(mask).softmax(-1)  # s is our own
                    o = torch.bmm((p if p.dtype == vc.dtype else p.to(vc.dtype)).view(n, group, -1), vc.flatten(0, 1))
                else:
                    s = torch.matmul(q, kc.transpose(-1, -2)).float() * a.scaling + mask
                    o = torch.matmul(s.softmax(-1).to(vc.dtype), vc)
            x, h = self._after_attention(li, x, self._layer(layer.self_attn.o_proj, o.reshape(batch, -1)))
            x, h = self._after_mlp(li, x, self._mlp(li, h))
        return _linear(a.head, h)

    def compact(self, keep: torch.Tensor):
        """Move rows `keep` to the front: their block tables and per-row state (the cache itself stays put)."""
        m = len(keep)
        for t in (self.table, self.tokens, self.pos, self.row_seq, self.n_out, self.limit, self.live):
            t[:m] = t[keep]
        if self.row_kv is not None:
            self.row_kv[:, :, :m] = self.row_kv[:, :, keep]
