"""In-process rollouts at close to the GPU's limit, with the policy's own weights.

- Continuous batching over a paged KV cache (ponder.rollout.schedule): all samples of a call queue up; at
  most `batch_size` run at once (default: all), and when one finishes, a waiting one takes its row. K/V
  lives in blocks of `block_size` slots handed out as rows reach them, so memory follows the tokens that
  exist; a prompt's full blocks are shared by its `n` samples. The pool starts with room for `start_tokens`
  new tokens a row (default: 1,024 on CUDA; on CPU all of them, up to 4,096 positions) and doubles when rows need
  more, up to every row at full length or `kv_fraction` of the free memory (the device's, or the host's on CPU; or
  `kv_blocks`); past that, rows wait or give way.
- Prefill: each distinct prompt runs once, packed (no padding work outside attention), when its first
  sample is admitted, in chunks of about `prefill_tokens` between decode steps.
- Decode: one step for all rows, captured as a CUDA graph per (batch bucket, temperature) (and attention
  length bucket, where attention is not the Triton kernel), sampling and bookkeeping included: the host
  only replays it. The random draw is a hash of (seed, sequence, token index) (and of the token, for the
  Gumbel draw on CPU), so it needs no RNG state in the graph and a sample's tokens do not depend on when
  or where it ran. With top-k/top-p the graph stops at the logits and sampling follows eagerly. Every
  `sync_every` steps the host looks once: stop strings, finished rows out, waiting ones in, blocks for the
  next steps, and, with nothing waiting, the live rows to the front of a smaller batch bucket. On CUDA
  (`look_ahead`) the check's reads go to pinned memory, one more step is queued behind them, and the host
  decides while the GPU runs it (its copies to the GPU queued from pinned memory too, so none waits).
- The cache and graphs stay allocated between calls (keep_cache=False frees them after each call, at
  the price of capturing again).
- q/k/v and gate/up each run as one matrix product: their parameters are moved once into one buffer each
  and become views of it (ponder.rollout.fused_weights); nothing is copied or kept in sync.
- Weights: the model's own, or a copy in the rollout dtype (`dtype`; auto: bfloat16 on CUDA when the
  model holds float32 master weights). Casting float32 weights to bfloat16 on every use cost the decode
  step a read of 4 and a write of 2 bytes a parameter; the copy costs 2 bytes a parameter of the linear
  layers (embeddings and norms are shared) and is refreshed in place at the next call after any optimizer
  step or in-place write to the master weights (a checkpoint load), so each rollout samples from the
  current policy.
- A model that already holds its matrices in the rollout dtype beside float32 embeddings and norms (the sharded
  trainer's rollout copy, ponder.sharding.RolloutWeights) is run as it is, under autocast as the copy is.
- Graphs read the weights at their addresses, so in-place updates (and the copy's refresh) are seen; if a
  parameter is replaced (new storage), the graphs are dropped and captured again.
On CPU the same code runs eagerly; decode attention is two matrix products over each row's K/V, which is also
kept in order beside the pool (copied when a sequence takes a row; decode steps write only there), so no step
gathers blocks. Architectures other than those of ponder.kernels.arch.FAMILIES (Llama, Qwen2, Qwen3, Qwen3-MoE,
Mistral, Ministral, Ministral 3, Mixtral, Arcee, Seed-OSS, Phi-3/Phi-4, OLMo 2, SmolLM3, InternLM3), and calls that
would outrun a sliding window, go to the Hugging Face engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ponder.errors import UserError
from ponder.runtime import free_cuda_memory, local_processes
from ponder.rollout import (
    Completion, RolloutEngine, SamplingParams, decode_texts, register, shadow_dtype, special_stop_ids, truncate_at_stop,
)
from ponder.kernels.arch import capturable, describe, gate_up_projections, qkv_projections, swiglu
from ponder.kernels.sampler import row_keys
from ponder.rollout.fast_model import EOS_SLOTS, FP8_MIN_PARAMS, FP8_ROOM, Forward, fp8_products
from ponder.rollout.fast_sampling import cuts, sample
from ponder.rollout.fused_weights import join
from ponder.rollout.schedule import Schedule
from ponder.rollout.hf import HFEngine


def notice(msg: str) -> None:
    print(f"ponder: {msg}", file=sys.stderr)


DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the KV cache's dtype: auto, the weights' compute dtype; fp8, e4m3 with a scale per layer for K and for V, set by each
# call's first prefill (ponder.rollout.fast_model.FP8_ROOM)
KV_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn}
MAX_BLOCK = 1024  # slots a KV block, at most (vLLM's blocks hold 16; ponder's default 32)
GROW_ROOM = 0.9  # of the free memory, the most a grown pool may take while the old one is still held
CPU_START = 4096  # positions a row the CPU pool starts with, at most (CUDA's: 1,024 new tokens)
WEIGHT_DTYPES = ("auto", "fp8")  # fp8: the layers' products from e4m3 copies of their matrices (ponder.kernels.fp8_linear)
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def free_memory(device) -> float:
    """Bytes the KV pool may take its share of: on CUDA the device's free memory and what torch's cache holds unused
    (ours too); elsewhere the host's available memory, within the container's limit, shared by this machine's
    processes (torchrun --nproc-per-node N on CPU: each one's pool grows at the same time)."""
    if torch.device(device).type == "cuda":
        return free_cuda_memory(device)
    return min(host_available(), cgroup_free()) / max(1, local_processes())


def size(n: float) -> str:
    """Bytes as a user reads them: GiB, or MiB below one."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def host_available() -> float:
    return float(psutil.virtual_memory().available)


def cgroup_free(root: str = "/sys/fs/cgroup") -> float:
    """What this process's control group (a Docker or Kubernetes memory limit) lets it allocate still; inf without
    one. /proc/meminfo, which psutil reads, tells the host's memory: a 16 GB container on a 512 GB host would size
    its pool for the host's and be killed."""
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        try:
            cap = Path(root, limit).read_text().strip()
            if cap != "max" and int(cap) < 2**60:  # (v1 writes a huge number for none)
                return float(int(cap) - int(Path(root, usage).read_text()))
        except (OSError, ValueError):
            continue
    return float("inf")


def check_fp8(device, option: str = "kv_dtype", dtype: torch.dtype = torch.bfloat16) -> None:
    """e4m3 kernels (Triton's, and the FP8 tensor cores of torch._scaled_mm) run only on GPUs of compute capability
    8.9 or later; `dtype`: the rollout's compute dtype, which torch._scaled_mm's rowwise scales give only in bf16."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise UserError(f"fast engine: {option} fp8 needs a GPU of compute capability 8.9 or later (Ada, Hopper and "
                        f"newer) for its e4m3 kernels; {torch.cuda.get_device_name(device)} is {major}.{minor}: "
                        f"use rollout.engine_options.{option}=auto")
    if option == "weight_dtype" and dtype != torch.bfloat16:
        raise UserError(f"fast engine: weight_dtype fp8 computes its products in bf16 on CUDA, and this rollout runs in "
                        f"{dtype}: use rollout.engine_options.dtype=auto or bf16, or weight_dtype=auto")


_optimizer_steps = [0]  # every optimizer step in the process (a fused AdamW step bumps no version counter)


def _count_step(*_):
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_step)


class RolloutCopy:
    """The matrices and biases of the model's linear layers (the output head included, untied from the embedding)
    in the rollout dtype, for generation only; every other parameter (embeddings, norms) and buffer is the
    master's own tensor, shared. Run under autocast, this computes what autocast over the float32 model did
    (the same bf16 matrices, a float32 residual stream) without casting a matrix at each use. Refreshed in
    place from the master weights when they may have changed: after any optimizer step, or when a matrix's
    version counter (bumped by in-place writes such as load_state_dict) or storage moved. No caller has to
    say when.

    LoRA: each adapted layer becomes one plain matrix, base + scaling * B @ A, merged at each refresh (as a
    serving engine loads merged weights). Decode then runs the base model's products only: no adapter
    products, no dropout or scaling kernels a layer and step (the 7B workload's rollout took 19.2 s through
    the adapters against 6.8 s for plain bf16 weights)."""

    def __init__(self, model, dtype: torch.dtype):
        import copy

        self.model, self.dtype = model, dtype
        # every LoRA layer, switched on or off: which adapters count is read at each merge (_merge)
        self.adapted = [m for m in model.modules() if lora_layer(m)]
        adapter_parts = {id(p) for m in self.adapted for p in m.parameters() if p is not m.base_layer.weight}
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        # the linear layers' biases too: autocast would cast each at every product, one more kernel a layer and step
        matrices = {id(p): p for m in linear for p in (m.weight, m.bias)
                    if p is not None and p.is_floating_point() and id(p) not in adapter_parts}
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # shared as they are
        merged = {id(m.base_layer.weight) for m in self.adapted}
        # a matrix already in `dtype` is shared, except where the merge writes: that one gets storage of its own,
        # or the merge would overwrite the frozen base (a bf16 base, or the sharded trainer's bf16 rollout copy)
        memo.update({k: torch.nn.Parameter(w.detach().to(dtype, copy=k in merged), requires_grad=False)
                     for k, w in matrices.items()})
        for m in self.adapted:  # an adapted embedding: a table of its own for the merge, in the master's dtype as
            w = m.base_layer.weight  # every embedding's rows are (a float32 residual stream starts there)
            if id(w) not in matrices:
                memo[id(w)] = torch.nn.Parameter(w.detach().clone(), requires_grad=False)
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        if tied:  # the embedding stays the master's (float32 rows are looked up); the head gets its own matrix
            memo[id(head.weight)] = head.weight
        self.shadow = copy.deepcopy(model, memo)
        self.pairs = [(w, memo[k]) for k, w in matrices.items() if memo[k].data_ptr() != w.data_ptr() and k not in merged]
        self.merges = [(m, memo[id(m.base_layer.weight)]) for m in self.adapted]
        _unwrap_adapters(self.shadow)
        if tied:
            own = torch.nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
            self.shadow.get_output_embeddings().weight = own
            self.pairs.append((head.weight, own))
        self.by_master = {id(w): c for w, c in self.pairs}  # what the update may compute with (ponder.rl.copy_linear)
        self.arch, _ = describe(self.shadow)
        self._merge()
        self.seen = self._versions()

    def _versions(self):
        watched = [p for p, _ in self.pairs] + [p for m, _ in self.merges for p in m.parameters()]
        # switching adapters off or on (peft's disable_adapter, set_adapter) writes no tensor: watched by itself
        switches = [(m.disable_adapters, tuple(m.active_adapters), tuple(m.merged_adapters)) for m, _ in self.merges]
        return _optimizer_steps[0], [(p._version, p.data_ptr()) for p in watched], switches

    @torch.no_grad()
    def _merge(self) -> None:
        """Each adapted matrix as peft's forward computes with it: the base alone while adapters are off, else the
        base plus the active adapters that are not already merged into it (merge_adapter writes them in)."""
        for m, out in self.merges:
            w = m.base_layer.weight.float()
            merged = list(m.merged_adapters)
            if m.disable_adapters:  # peft's forward unmerges first
                add, sub = [], merged
            else:
                add, sub = [n for n in m.active_adapters if n not in merged], []
            for sign, names in ((1.0, add), (-1.0, sub)):
                for name in names:
                    if name in m.lora_A or name in getattr(m, "lora_embedding_A", {}):
                        w = w + sign * m.get_delta_weight(name).float()
            out.copy_(w)

    def current(self) -> dict:
        """by_master, refreshed first: the copies as the master weights are now (what the update computes with)."""
        self.refresh()
        return self.by_master

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copy the master weights in if they changed since the last refresh; True if they did."""
        now = self._versions()
        if now == self.seen:
            return False
        if self.pairs:  # none where every plain matrix is shared (already in the rollout dtype)
            torch._foreach_copy_([s for _, s in self.pairs], [p for p, _ in self.pairs])
        self._merge()
        self.seen = now
        return True


def lora_layer(module) -> bool:
    """A peft LoRA linear or embedding layer whose adapters fold into its weight: plain LoRA (no adapter of it
    DoRA), whether its adapters are switched on or not."""
    if not (hasattr(module, "base_layer") and hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")):
        return False
    if not isinstance(module.base_layer, (torch.nn.Linear, torch.nn.Embedding)):
        return False
    return not any(getattr(module, "use_dora", {}).values())


def has_adapters(model) -> bool:
    return any(lora_layer(m) for m in model.modules())


def _unwrap_adapters(model) -> None:
    """Each LoRA layer of the copy replaced by its base layer (whose weight then holds the merge)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if lora_layer(child):
                setattr(parent, name, child.base_layer)


@register("fast")
class FastEngine(RolloutEngine):
    def __init__(
        self, model, tokenizer, *, batch_size: int | None = None, cuda_graphs: bool = True, sync_every: int = 16, min_bucket: int = 8,
        length_bucket: int = 128, prefill_tokens: int = 4096, keep_cache: bool = True, attention: str = "auto",
        fused: bool = True, join_weights: bool = True, dtype: str = "auto", block_size: int = 32, kv_fraction: float = 0.5,
        kv_blocks: int | None = None, start_tokens: int | None = None, look_ahead: bool | None = None,
        kv_dtype: str = "auto", weight_dtype: str = "auto",
    ):
        super().__init__(model, tokenizer)
        if attention not in ("auto", "triton", "sdpa", "matmul"):
            raise UserError(f"fast engine: attention must be 'auto', 'triton', 'sdpa' or 'matmul', got '{attention}'")
        self.cuda_graphs, self.sync_every, self.min_bucket = cuda_graphs, max(1, sync_every), max(1, min_bucket)
        self.length_bucket, self.prefill_tokens, self.keep_cache = length_bucket, prefill_tokens, keep_cache
        if dtype not in DTYPES:
            raise UserError(f"fast engine: dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        if kv_dtype not in KV_DTYPES:
            raise UserError(f"fast engine: kv_dtype must be one of {', '.join(KV_DTYPES)}, got '{kv_dtype}'")
        self.kv_dtype = KV_DTYPES[kv_dtype]
        if weight_dtype not in WEIGHT_DTYPES:
            raise UserError(f"fast engine: weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got '{weight_dtype}'")
        self.fp8_weights = weight_dtype == "fp8"
        self.attention, self.batch_size, self.fused, self.join_weights = attention, batch_size, fused, join_weights
        # (a block of a million slots: every prompt's own block of gigabytes, within kv_fraction of the memory)
        if not 1 <= block_size <= MAX_BLOCK or not 0 < kv_fraction <= 1:
            raise UserError(f"fast engine: block_size must be from 1 to {MAX_BLOCK} and kv_fraction in (0, 1] (got "
                            f"{block_size}, {kv_fraction})")
        if kv_blocks is not None and kv_blocks < 2:
            raise UserError(f"fast engine: kv_blocks must be at least 2, or null (sized from free memory); got {kv_blocks}")
        self.dtype, self.block_size, self.kv_fraction, self.kv_blocks = dtype, block_size, kv_fraction, kv_blocks
        self.start_tokens = start_tokens
        self.look_ahead = look_ahead  # None: on CUDA (where the host's check can overlap the GPU's step), off on CPU
        self.stats: dict = {}  # of the last call: KV blocks held at most, sequences that gave way
        self.arch, why = describe(model)
        self.copy: RolloutCopy | None = None
        self.hf = HFEngine(model, tokenizer, batch_size or 256)  # the same cap on rows decoded at once
        # the options that round what the sampler computes with (the update computes without them)
        self.rounded = [f"{k}=fp8" for k, on in (("kv_dtype", self.kv_dtype is not None), ("weight_dtype", self.fp8_weights)) if on]
        if self.arch is None:
            fp8 = f"; not applied there: {', '.join(self.rounded)}" if self.rounded else ""
            notice(f"fast engine: {why}; using the hf engine{fp8}")
            self.rounded = []
        self.fwd: Forward | None = None
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.pool = None
        self.weights_sig = None
        self.lent = False  # idle_memory() was handed out since the last call
        self.side_stream = None
        self.eager_notice = False
        self.saturation_notice = False
        self.fp8_notice = False

    def idle_memory(self):
        """The KV cache between calls (the next call zeroes it first: masked slots must hold finite numbers)."""
        if self.fwd is None:
            return None
        self.lent = True
        return self.fwd.kv.view(-1).view(torch.uint8)

    def cache_bytes(self) -> int:
        return 0 if self.fwd is None else self.fwd.kv.numel() * self.fwd.kv.element_size()

    def rollout_matrices(self) -> dict | None:
        return None if self.copy is None else self.copy.current()

    def release(self) -> None:
        """Free the cache and the captured graphs (they come back on the next call)."""
        self.fwd, self.graphs, self.pool = None, {}, None

    def _weights(self):
        """The Arch to run: the model's own modules, or those of the rollout copy (made once, refreshed
        whenever the master weights changed since the last refresh). A model already in the copy's layout
        (narrow matrices beside float32 embeddings and norms: shadow_dtype) runs as it is, under autocast."""
        weight = self.arch.head.weight
        want = DTYPES[self.dtype]
        adapters = weight.device.type == "cuda" and has_adapters(self.model)
        if want is None:  # auto; LoRA on CUDA: a merged copy, whatever the base's dtype
            want = torch.bfloat16 if weight.device.type == "cuda" and (weight.dtype == torch.float32 or adapters) else weight.dtype
        if want == weight.dtype and not (adapters and self.dtype == "auto"):
            self.copy = None
            return self.arch
        if want == torch.float32:  # the copy holds matrices beside the model's own norms: only narrower
            raise UserError(f"fast engine: dtype fp32 is wider than the model's {weight.dtype} weights; "
                            "use dtype: auto to run them as they are")
        if self.copy is None or self.copy.dtype != want:
            self.release()
            self.copy = RolloutCopy(self.model, want)
        else:
            self.copy.refresh()
        return self.copy.arch

    @torch.no_grad()
    def generate(self, prompts, params: SamplingParams, limits: list[int] | None = None):
        """`limits` (benchmarks): a cap on each sample's tokens, prompt-major, to force uneven lengths."""
        if self.arch is None:
            return self.hf.generate(prompts, params)
        if params.n < 1 or params.max_tokens < 0:
            raise UserError(f"sampling: n must be >= 1 and max_tokens >= 0 (got n={params.n}, max_tokens={params.max_tokens})")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise UserError("fast engine: a prompt is empty; give each prompt at least one token")
        if limits is not None and len(limits) != len(prompts) * params.n:
            raise UserError(f"fast engine: {len(limits)} limits for {len(prompts) * params.n} samples")
        need = max(len(p) for p in prompts) + params.max_tokens
        if self.arch.window is not None and need > self.arch.window:
            notice(f"fast engine: {need} positions exceed the sliding window ({self.arch.window}); using the hf engine")
            return self.hf.generate(prompts, params)
        if params.max_tokens == 0:
            return [[Completion([], "length", [] if params.logprobs else None, [] if params.entropies else None)
                     for _ in range(params.n)] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
            tokens, per_token = self._run(prompts, params, seed ^ (seed >> 32), limits)
        finally:
            self.model.train(was_training)
            if not self.keep_cache:
                self.release()
        return self._completions(tokens, per_token, len(prompts), params)

    # -- setup --------------------------------------------------------------------------------------

    def _prepare(self, rows: int, positions: int, prompt_blocks: int, start: int):
        """The Forward to run (made, or grown to cover this call), and whether to capture graphs. Its pool
        starts with the blocks for `start` positions a row (grown during the call as rows reach further)."""
        arch = self._weights()
        weight = arch.head.weight
        # a model in the copy's layout runs in its matrices' dtype (a LoRA base narrowed under a float32 tied head)
        device, dtype = weight.device, (shadow_dtype(self.model) if self.copy is None else None) or weight.dtype
        use_graphs = self.cuda_graphs and device.type == "cuda"
        if use_graphs:
            use_graphs, why = capturable(arch)
            if not use_graphs and not self.eager_notice:
                notice(f"fast engine: {why}; decoding without graphs (slower)")
                self.eager_notice = True
        if self.join_weights:  # before the signature: joining moves the parameters once
            for layer in arch.backbone.layers:
                join(qkv_projections(layer.self_attn))
                if swiglu(arch, layer.mlp):
                    join(gate_up_projections(layer.mlp))
        kv_dtype = self.kv_dtype or dtype
        if kv_dtype.itemsize == 1:
            check_fp8(device)
        fp8_bytes = 0
        if self.fp8_weights:
            check_fp8(device, "weight_dtype", dtype)
            # the e4m3 copies, made with the Forward, after the pool's size is chosen: counted here (a byte a parameter
            # and a float32 scale a row, of the matrices past the device's floor)
            least = FP8_MIN_PARAMS.get(torch.device(device).type, 0)
            fp8_bytes = sum(w.numel() + 4 * w.shape[0] for w in fp8_products(arch, least)[0])
        sig = (device, dtype, tuple(p.data_ptr() for p in arch.backbone.parameters()), weight.data_ptr())
        f = self.fwd
        if f is not None and sig == self.weights_sig:  # grow to cover both calls' needs
            rows, positions = max(rows, f.rows), max(positions, f.positions)
        per_block = len(arch.backbone.layers) * 2 * arch.n_kv * self.block_size * arch.head_dim * kv_dtype.itemsize
        self.worst = rows * -(-positions // self.block_size) + prompt_blocks + 1  # every row at full length
        self.least = -(-positions // self.block_size) + prompt_blocks + 1  # one sequence at full length
        blocks = min(self.worst, rows * -(-min(start, positions) // self.block_size) + prompt_blocks + 1)
        if f is None or sig != self.weights_sig or f.rows < rows or f.positions < positions:
            self.release()
            f = None  # the old pool is freed before the new one is sized and made
            # auto: the split-KV Triton kernel on CUDA (reads only live slots); on CPU two matrix products and a
            # softmax (the kernel would run as its torch reference; CPU flash attention took 3.5x as long for
            # decode shapes, and its per-call buffers cost page faults)
            attention = self.attention if self.attention != "auto" else "triton" if device.type == "cuda" else "matmul"
            narrow = self.copy is not None or shadow_dtype(self.model) is not None  # matrices narrower than the norms
            f = self.fwd = Forward(arch, rows, min(blocks, self.pool_cap(per_block, device, fp8_bytes)), self.block_size, positions,
                                   dtype, device, attention, self.fused, autocast=narrow, kv_dtype=kv_dtype,
                                   fp8_weights=self.fp8_weights)
            if f.fp8_left and not self.fp8_notice:
                notice(f"fast engine: weight_dtype fp8: these products stay in {str(dtype).removeprefix('torch.')}: "
                       f"{', '.join(f.fp8_left)} (wrapped layers such as LoRA's without a merged copy, expert blocks, "
                       "or a dimension not a multiple of 16)")
                self.fp8_notice = True
            if self.attention == "triton" and device.type != "cuda":
                notice("fast engine: attention 'triton' is a CUDA kernel; here its torch reference runs (slower than "
                       "attention auto, two matrix products)")
            self.weights_sig = sig
        elif f.blocks < blocks:
            self.grow_pool(f, blocks - f.blocks)
        f.refresh_rope()
        return f, use_graphs

    def pool_cap(self, per_block: int, device, less: int = 0) -> int:
        """The most blocks a new pool may hold: every row at full length, within `kv_blocks` if set, else within
        `kv_fraction` of the memory free now (the device's; the host's on CPU), less `less` bytes about to be taken;
        one line where that cannot hold one sequence."""
        cap = self.worst if self.kv_blocks is None else max(2, min(self.worst, self.kv_blocks))
        if self.kv_blocks is None:
            free = free_memory(device) - less
            fits = int(self.kv_fraction * free / per_block)
            if fits < self.least:
                need = self.least * per_block
                more = (f"raise rollout.engine_options.kv_fraction (to {need / free:.2f} at least) or "
                        if need <= free else "")
                raise UserError(f"fast engine: the KV cache needs {size(need)} for one sequence and {self.kv_fraction:.0%} of "
                                f"free memory gives {size(fits * per_block)}; {more}shorten max_tokens")
            cap = min(cap, fits)
        return cap

    def grow_pool(self, f: Forward, want: int) -> int:
        """At least `want` more blocks (doubling, up to kv_fraction of the free memory counting the pool's own, or
        kv_blocks) so that memory follows the live tokens; returns how many were added (0: at the cap: rows wait or
        give way; memory others took since the pool was made is no error here). The new pool is made before the old
        one goes: it must fit beside it. The graphs read the old pool: they are captured again."""
        per_block = f.kv[:, :, 0].numel() * f.kv.element_size()
        new = max(2 * f.blocks, f.blocks + want)
        if self.kv_blocks is not None:
            new = min(new, max(2, min(self.worst, self.kv_blocks)))
        else:
            free = free_memory(f.device)
            held = f.kv.numel() * f.kv.element_size()
            new = min(new, self.worst, int(self.kv_fraction * (free + held) / per_block), int(GROW_ROOM * free / per_block))
        if new <= f.blocks:
            return 0
        added = new - f.blocks
        f.grow(new)
        self.graphs = {}
        return added

    def _step(self, f: Forward, batch: int, length: int, use_graphs: bool, temperature: float | None):
        if not use_graphs:
            if torch.device(f.device).type == "cpu":  # no autograd bookkeeping on each of the step's ~200 small ops:
                with torch.inference_mode():  # 6% of a CPU generate (the tensors it keeps are made outside)
                    return f.step(batch, length, temperature)
            return f.step(batch, length, temperature)
        key = (batch, length, temperature)
        if key not in self.graphs:
            # warm-up and capture on a stream other than the default one, as capture requires; then undo what
            # the warm-up changed. Each stream that runs a matrix product gets its own cuBLAS workspace (32 MiB),
            # which the graphs keep: so they share the caller's stream where it is not the default one (the
            # trainer runs on one such stream), else one side stream of their own
            saved = f.snapshot(batch)
            side = torch.cuda.current_stream()
            if side == torch.cuda.default_stream():  # the default stream cannot be captured
                if self.side_stream is None:
                    self.side_stream = torch.cuda.Stream()
                side = self.side_stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                f.step(batch, length, temperature)
            torch.cuda.current_stream().wait_stream(side)
            f.restore(batch, saved)
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=side):
                out = f.step(batch, length, temperature)
            self.graphs[key] = (graph, out)
        graph, out = self.graphs[key]
        graph.replay()
        return out

    def device_type(self) -> str:
        return self.arch.head.weight.device.type

    def _bucket(self, live: int, total: int) -> int:
        b = self.min_bucket
        while b < live:
            b *= 2
        return min(b, total)

    # -- generation ---------------------------------------------------------------------------------

    def _run(self, prompts, params: SamplingParams, seed: int, limits):
        n_seq, max_new = len(prompts) * params.n, params.max_tokens
        # rows run on past their end until the next host check (and the step queued ahead of it): room for those
        cols = max_new + self.sync_every + 2
        longest = max(len(p) for p in prompts)
        start = self.start_tokens
        if start is None:  # CPU: every row at full length from the start (small there; growing costs time), up to
            # CPU_START: a run asking for a million new tokens should not allocate them all before its first token
            start = 1024 if self.device_type() == "cuda" else min(cols, CPU_START)
        start += longest
        tables, free = (n_seq + 1) * cols * 16, free_memory(self.arch.head.weight.device)  # a token, its log-prob, entropy
        if tables > free:  # (eval --k 2**40 asked the allocator for 228 TB)
            raise UserError(f"fast engine: {n_seq:,} samples of up to {max_new:,} tokens need {size(tables)} for their "
                            f"tokens and log-probs, and {size(free)} are free; ask for fewer samples (k, group_size, n) "
                            "or shorten max_tokens")
        f, use_graphs = self._prepare(min(n_seq, self.batch_size or n_seq), longest + cols,
                                      sum(-(-len(p) // self.block_size) for p in prompts), start)
        if not f.fits(n_seq, cols):
            f.outputs(max(n_seq, f.out_tok.shape[0] - 1), max(cols, f.out_tok.shape[1]))
            self.graphs = {}  # they wrote into the old tables
        if self.lent:
            f.kv.zero_()
            self.lent = False
        f.quantize(_optimizer_steps[0])  # weight_dtype fp8: the e4m3 copies made again if the matrices changed
        if f.kv_scale is not None:  # fp8: this call's first prefill sets the cache's scales
            f.calibrate = True
            f.kv_peak.zero_()
        f.seed.fill_(seed & 0xFFFFFFFF)
        eos = sorted(e for e in self.eos_ids(params.stop) if e is not None)[: len(f.eos)]
        f.eos.fill_(-1)
        f.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long, device=f.device)
        limits = [max_new] * n_seq if limits is None else [max(1, min(max_new, int(x))) for x in limits]
        run = Schedule(self, f, prompts, params, limits)
        filtered = cuts(params.top_k, params.top_p, params.min_p)
        in_graph = None if filtered else params.temperature  # None: the graph returns logits, sampling here
        ahead = int(self.look_ahead if self.look_ahead is not None else f.device.type == "cuda")
        run.sync(run.look())  # the first admissions: prefill, first tokens
        while run.batch:
            # a check once sync_every steps were queued since the last (the blocks it handed out cover that many
            # positions, no more), or when every row may be done
            if run.since + ahead >= self.sync_every or run.steps_left <= 0:
                # the check's reads are queued first; with `ahead`, the check's last step is queued behind them, so
                # the GPU runs it while the host waits for the reads and decides (0.5B, 256 rows: the GPU waited
                # about 0.85 ms at each of a rollout's 32 checks). Rows then run one step longer past their end.
                seen = run.look()
                if ahead and run.steps_left > 0:
                    self._decode(f, run, use_graphs, in_graph, params)
                    run.sync(seen, ahead=1)
                else:
                    run.sync(seen)
                continue  # the count starts again here (a step queued now would run past sync_every=1's one block)
            self._decode(f, run, use_graphs, in_graph, params)
        if f.kv_peak is not None and not self.saturation_notice and f.kv_peak.item() > FP8_MAX:
            notice(f"fast engine: kv_dtype fp8: keys or values up to {f.kv_peak.item() / FP8_ROOM:.1f}x the largest of "
                   f"a call's first prompts passed the cache's range ({FP8_MAX / FP8_ROOM:g}x, where the scales set then "
                   "put e4m3's largest) and were clamped; this model's rollouts need kv_dtype auto")
            self.saturation_notice = True
        self.stats = dict(kv_blocks=f.blocks, kv_blocks_peak=run.peak, block_size=f.block, gave_way=run.gave_way,
                          kv_gib_peak=run.peak * f.kv[:, :, 0].numel() * f.kv.element_size() / 2**30)
        out = f.out_tok[:n_seq, :max_new]
        # each sequence's first EOS found here, on the device: the host then cuts lists instead of scanning them
        hit = (out[:, :, None] == f.eos[None, None, :]).any(-1)
        ends = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, max_new)
        ends = torch.minimum(ends, torch.tensor(limits, device=f.device))
        tokens = [row[:end] for row, end in zip(out.tolist(), ends.tolist())]
        per_token = {}
        if params.logprobs:
            per_token["logprobs"] = f.out_lp[:n_seq, :max_new].tolist()
        if params.entropies:
            per_token["entropies"] = f.out_ent[:n_seq, :max_new].tolist()
        return tokens, per_token

    def _decode(self, f: Forward, run: Schedule, use_graphs: bool, in_graph: float | None, params: SamplingParams):
        """One decode step of the running rows (queued: nothing here waits for the GPU)."""
        length = run.top + 1  # slots 0 .. the highest position fed at this step
        if use_graphs and f.attention == "triton":
            # the kernel reads each row's own live slots; the length only sets how rows are split across
            # programs, so buckets double (a few graphs a batch bucket, even at 32k positions)
            length = min(max(self.length_bucket, 1 << (length - 1).bit_length()), f.positions)
        elif use_graphs:
            length = min(-(-length // self.length_bucket) * self.length_bucket, f.positions)
        logits = self._step(f, run.batch, length, use_graphs, in_graph)
        run.stepped()
        if in_graph is None:
            keys = row_keys(f.seed, f.n_out[: run.batch], f.row_seq[: run.batch])
            f.record(run.batch, *sample(logits, params.temperature, params.top_k, params.top_p, keys, True, f.k,
                                        params.min_p))

    def eos_ids(self, stop: tuple[str, ...] = ()) -> set[int]:
        """The ids that end a completion: the model's EOS, and the stop strings that are one special token's text."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) | special_stop_ids(self.tokenizer, stop)

    def _completions(self, tokens, per_token: dict, n_prompts, params):
        """Completions cut at their EOS or stop string, with their per-token lists (`per_token`: logprobs and
        entropies, where asked) cut alike."""
        eos_ids = self.eos_ids(params.stop)
        out = []
        # rows run on past their end until the next host check: cut at whichever comes first, EOS or a stop
        # string (searched only before the EOS)
        if len(eos_ids) <= EOS_SLOTS:  # _run cut each row after its first EOS already
            ends = [len(seq) - 1 if seq and seq[-1] in eos_ids else None for seq in tokens]
        else:
            ends = [next((j for j, t in enumerate(seq) if t in eos_ids), None) for seq in tokens]
        # the texts the stop strings are searched in, all in one call
        texts = [None] * len(tokens)
        if params.stop:
            texts = decode_texts(self.tokenizer, [seq[:end] for seq, end in zip(tokens, ends)])
        for i, (seq, end, text) in enumerate(zip(tokens, ends, texts)):
            kept, reason = truncate_at_stop(seq[:end], self.tokenizer, params.stop, set(), text)
            if reason is None and end is not None:
                kept, reason = seq[: end + 1], "stop"
            lists = {k: v[i][: len(kept)] for k, v in per_token.items()}
            out.append(Completion(kept, reason or "length", **lists))
        return [out[i * params.n : (i + 1) * params.n] for i in range(n_prompts)]
