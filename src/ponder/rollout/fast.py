"""In-process rollouts at close to the GPU's limit, with the policy's own weights.

- Prefill: each distinct prompt runs once, packed (no padding work outside attention); its cache is
  copied to the rows of its `n` samples.
- Decode: one step for all rows, captured as a CUDA graph per (batch bucket, attention length bucket,
  temperature), sampling and bookkeeping included: the host only replays it. The random draw is a hash
  of (seed, step, sequence) (and of the token, for the Gumbel draw on CPU), so it needs no RNG state in
  the graph. With top-k/top-p the graph stops at the logits and sampling follows eagerly. Every
  `sync_every` steps the host looks once: it stops when all rows are done, checks stop strings, and
  moves the live rows to the front when they fit a smaller batch bucket (finished rows are only masked
  until then).
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
- Graphs read the weights at their addresses, so in-place updates (and the copy's refresh) are seen; if a
  parameter is replaced (new storage), the graphs are dropped and captured again.
On CPU the same code runs eagerly. Architectures other than Llama/Qwen2/Qwen3/Mistral, and calls that
would outrun a sliding window, go to the Hugging Face engine.
"""

from __future__ import annotations

import sys

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from ponder.errors import UserError
from ponder.rollout import Completion, RolloutEngine, SamplingParams, register, truncate_at_stop
from ponder.rollout.fast_model import EOS_SLOTS, Forward, describe
from ponder.rollout.fast_kernels import row_keys
from ponder.rollout.fast_sampling import sample
from ponder.rollout.fused_weights import join
from ponder.rollout.hf import HFEngine


def notice(msg: str) -> None:
    print(f"ponder: {msg}", file=sys.stderr)


DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


_optimizer_steps = [0]  # every optimizer step in the process (a fused AdamW step bumps no version counter)


def _count_step(*_):
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_step)


class RolloutCopy:
    """The matrices of the model's linear layers (the output head included, untied from the embedding) in the
    rollout dtype, for generation only; every other parameter (embeddings, norms, biases) and buffer is the
    master's own tensor, shared. Run under autocast, this computes what autocast over the float32 model did
    (the same bf16 matrices, a float32 residual stream) without casting a matrix at each use. Refreshed in
    place from the master weights when they may have changed: after any optimizer step, or when a matrix's
    version counter (bumped by in-place writes such as load_state_dict) or storage moved. No caller has to
    say when."""

    def __init__(self, model, dtype: torch.dtype):
        import copy

        self.model, self.dtype = model, dtype
        matrices = {id(m.weight): m.weight for m in model.modules()
                    if isinstance(m, torch.nn.Linear) and m.weight.is_floating_point()}
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # shared as they are
        memo.update({k: torch.nn.Parameter(w.detach().to(dtype), requires_grad=False) for k, w in matrices.items()})
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is model.get_input_embeddings().weight
        if tied:  # the embedding stays the master's (float32 rows are looked up); the head gets its own matrix
            memo[id(head.weight)] = head.weight
        self.shadow = copy.deepcopy(model, memo)
        self.pairs = [(w, memo[k]) for k, w in matrices.items() if memo[k] is not w]
        if tied:
            own = torch.nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
            self.shadow.get_output_embeddings().weight = own
            self.pairs.append((head.weight, own))
        self.arch, _ = describe(self.shadow)
        self.seen = self._versions()

    def _versions(self):
        return _optimizer_steps[0], [(p._version, p.data_ptr()) for p, _ in self.pairs]

    @torch.no_grad()
    def refresh(self) -> bool:
        """Copy the master weights in if they changed since the last refresh; True if they did."""
        now = self._versions()
        if now == self.seen:
            return False
        torch._foreach_copy_([s for _, s in self.pairs], [p for p, _ in self.pairs])
        self.seen = now
        return True


@register("fast")
class FastEngine(RolloutEngine):
    def __init__(
        self, model, tokenizer, *, batch_size: int | None = None, cuda_graphs: bool = True, sync_every: int = 16, min_bucket: int = 8,
        length_bucket: int = 128, prefill_tokens: int = 4096, keep_cache: bool = True, attention: str = "auto",
        fused: bool = True, join_weights: bool = True, dtype: str = "auto",
    ):
        super().__init__(model, tokenizer)
        if attention not in ("auto", "triton", "sdpa", "matmul"):
            raise UserError(f"fast engine: attention must be 'auto', 'triton', 'sdpa' or 'matmul', got '{attention}'")
        self.cuda_graphs, self.sync_every, self.min_bucket = cuda_graphs, max(1, sync_every), max(1, min_bucket)
        self.length_bucket, self.prefill_tokens, self.keep_cache = length_bucket, prefill_tokens, keep_cache
        if dtype not in DTYPES:
            raise UserError(f"fast engine: dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.attention, self.batch_size, self.fused, self.join_weights = attention, batch_size, fused, join_weights
        self.dtype = dtype
        self.arch, why = describe(model)
        self.copy: RolloutCopy | None = None
        self.hf = HFEngine(model, tokenizer)
        if self.arch is None:
            notice(f"fast engine: {why}; using the hf engine")
        self.fwd: Forward | None = None
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        self.pool = None
        self.weights_sig = None
        self.lent = False  # idle_memory() was handed out since the last call
        self.side_stream = None

    def idle_memory(self):
        """The KV cache between calls (the next call zeroes it first: masked slots must hold finite numbers)."""
        if self.fwd is None:
            return None
        self.lent = True
        return self.fwd.kv.view(-1).view(torch.uint8)

    def release(self) -> None:
        """Free the cache and the captured graphs (they come back on the next call)."""
        self.fwd, self.graphs, self.pool = None, {}, None

    def _weights(self):
        """The Arch to run: the model's own modules, or those of the rollout copy (made once, refreshed
        whenever the master weights changed since the last refresh)."""
        weight = self.arch.head.weight
        want = DTYPES[self.dtype]
        if want is None:  # auto
            want = torch.bfloat16 if weight.device.type == "cuda" and weight.dtype == torch.float32 else weight.dtype
        if want == weight.dtype:
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
    def generate(self, prompts, params: SamplingParams):
        if self.arch is None:
            return self.hf.generate(prompts, params)
        if params.n < 1 or params.max_tokens < 0:
            raise UserError(f"sampling: n must be >= 1 and max_tokens >= 0 (got n={params.n}, max_tokens={params.max_tokens})")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise UserError("fast engine: a prompt is empty; give each prompt at least one token")
        need = max(len(p) for p in prompts) + params.max_tokens
        if self.arch.window is not None and need > self.arch.window:
            notice(f"fast engine: {need} positions exceed the sliding window ({self.arch.window}); using the hf engine")
            return self.hf.generate(prompts, params)
        if params.max_tokens == 0:
            return [[Completion([], "length", [] if params.logprobs else None) for _ in range(params.n)] for _ in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            # whole prompt groups per run, at most batch_size sequences each (at least one group)
            per_run = max(1, (self.batch_size or len(prompts) * params.n) // params.n)
            tokens, logprobs = [], [] if params.logprobs else None
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)))
            for run_no, i in enumerate(range(0, len(prompts), per_run)):
                t, lp = self._run(prompts[i : i + per_run], params, (seed ^ (seed >> 32)) + run_no * 0x632BE5AB)
                tokens += t
                if lp is not None:
                    logprobs += lp
        finally:
            self.model.train(was_training)
            if not self.keep_cache:
                self.release()
        return self._completions(tokens, logprobs, len(prompts), params)

    # -- setup --------------------------------------------------------------------------------------

    def _prepare(self, rows: int, length: int):
        arch = self._weights()
        weight = arch.head.weight
        device, dtype = weight.device, weight.dtype
        use_graphs = self.cuda_graphs and device.type == "cuda"
        if use_graphs:
            length = -(-length // self.length_bucket) * self.length_bucket
        if self.join_weights:  # before the signature: joining moves the parameters once
            for layer in arch.backbone.layers:
                join([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                if hasattr(layer.mlp, "gate_proj"):
                    join([layer.mlp.gate_proj, layer.mlp.up_proj])
        sig = (device, dtype, tuple(p.data_ptr() for p in arch.backbone.parameters()), weight.data_ptr())
        f = self.fwd
        if f is None or f.rows < rows or f.length < length or sig != self.weights_sig:
            self.release()
            if f is not None and sig == self.weights_sig:  # grow to cover both calls' needs
                rows, length = max(rows, f.rows), max(length, f.length)
            # auto: the split-KV Triton kernel on CUDA (reads only live slots); SDPA on CPU, where the
            # kernel would run as its torch reference
            attention = self.attention if self.attention != "auto" else "triton" if device.type == "cuda" else "sdpa"
            f = self.fwd = Forward(arch, rows, length, dtype, device, attention, self.fused, autocast=self.copy is not None)
            self.weights_sig = sig
        f.refresh_rope()
        return f, use_graphs

    def _step(self, f: Forward, batch: int, length: int, use_graphs: bool, temperature: float | None):
        if not use_graphs:
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

    def _bucket(self, live: int, total: int) -> int:
        b = self.min_bucket
        while b < live:
            b *= 2
        return min(b, total)

    # -- generation ---------------------------------------------------------------------------------

    def _run(self, prompts, params: SamplingParams, seed: int):
        n_seq, max_new = len(prompts) * params.n, params.max_tokens
        max_prompt = max(len(p) for p in prompts)
        f, use_graphs = self._prepare(n_seq, max_prompt + max_new - 1)
        if self.lent:
            f.kv.zero_()
            self.lent = False
        dev = f.device
        f.seed.fill_(seed & 0xFFFFFFFF)
        eos = sorted(e for e in self.eos_ids() if e is not None)[: len(f.eos)]
        f.eos.fill_(-1)
        f.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long, device=dev)
        f.row_seq.fill_(f.rows)  # idle rows write to the sink row
        f.row_seq[:n_seq] = torch.arange(n_seq, device=dev)
        f.live.zero_()
        f.live[:n_seq] = True
        f.step_no.zero_()
        filtered = 0 < params.top_k or params.top_p < 1.0
        in_graph = None if filtered else params.temperature  # None: the graph returns logits, sampling here

        # prefill, longest prompts first in chunks of about prefill_tokens; then the first token of every sample
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        start = 0
        while start < len(order):
            end, width = start + 1, len(prompts[order[start]])
            while end < len(order) and width * (end + 1 - start) <= self.prefill_tokens:
                end += 1
            chunk = order[start:end]
            rows = torch.tensor(chunk, device=dev) * params.n
            logits = f.prefill([prompts[i] for i in chunk], rows, params.n)
            seqs = (rows[:, None] + torch.arange(params.n, device=dev)).reshape(-1)
            keys = row_keys(f.seed, f.step_no, seqs)
            tok, lp = sample(logits.repeat_interleave(params.n, 0), params.temperature, params.top_k,
                             params.top_p, keys, True, f.k)
            f.out_tok[seqs, 0] = tok
            f.out_lp[seqs, 0] = lp.float()
            f.live[seqs] &= ~(tok[:, None] == f.eos[None, :]).any(-1)
            f.tokens[seqs] = tok
            start = end
        f.pos[:n_seq] = torch.tensor([len(p) for p in prompts], device=dev).repeat_interleave(params.n)
        f.step_no.fill_(1)

        batch, checked = n_seq, 0
        for step in range(1, max_new):
            if step % self.sync_every == 0:
                batch, checked = self._sync(f, params, batch, step, checked)
                if batch == 0:
                    break
            length = max_prompt + step  # slots 0 .. the highest position fed at this step
            if use_graphs:
                length = min(-(-length // self.length_bucket) * self.length_bucket, f.length)
            logits = self._step(f, batch, length, use_graphs, in_graph)
            if in_graph is None:
                keys = row_keys(f.seed, f.step_no, f.row_seq[:batch])
                tok, lp = sample(logits, params.temperature, params.top_k, params.top_p, keys, True, f.k)
                f.record(batch, tok, lp)
        out = f.out_tok[:n_seq, :max_new]
        # each row's first EOS found here, on the device: the host then cuts lists instead of scanning them
        hit = (out[:, :, None] == f.eos[None, None, :]).any(-1)
        ends = torch.where(hit.any(-1), hit.int().argmax(-1), max_new)
        tokens = [row[:end + 1] for row, end in zip(out.tolist(), ends.tolist())]
        return tokens, (f.out_lp[:n_seq, :max_new].tolist() if params.logprobs else None)

    def _sync(self, f: Forward, params, batch, step, checked):
        """Host check every few steps: stop strings, all done, compaction. Returns (batch, checked)."""
        live = f.live
        if params.stop:
            # only the tail since the last check, with an overlap so a stop string split across checks is seen
            overlap = max(len(s) for s in params.stop) + 8
            lo = max(0, checked - overlap)
            idx = torch.nonzero(live[:batch]).squeeze(-1)
            texts = self.tokenizer.batch_decode(f.out_tok[f.row_seq[idx], lo:step].tolist(), skip_special_tokens=True)
            hit = [i for i, t in zip(idx.tolist(), texts) if any(s in t for s in params.stop)]
            if hit:
                live[torch.tensor(hit, device=live.device)] = False
            checked = step
        alive = torch.nonzero(live[:batch]).squeeze(-1)
        n_live = len(alive)
        if n_live == 0:
            return 0, checked
        target = self._bucket(n_live, batch)
        if target < batch:
            dead = torch.nonzero(~live[:batch]).squeeze(-1)[: target - n_live]
            f.compact(torch.cat([alive, dead]), f.length)
            batch = target
        return batch, checked

    def eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos])

    def _completions(self, tokens, logprobs, n_prompts, params):
        eos_ids = self.eos_ids()
        out = []
        for i, seq in enumerate(tokens):
            # rows run on past their end until the next host check: cut at whichever comes first,
            # EOS or a stop string (searched only before the EOS)
            if len(eos_ids) <= EOS_SLOTS:  # _run cut each row after its first EOS already
                end = len(seq) - 1 if seq and seq[-1] in eos_ids else None
            else:
                end = next((j for j, t in enumerate(seq) if t in eos_ids), None)
            kept, reason = truncate_at_stop(seq[:end], self.tokenizer, params.stop, set())
            if reason is None and end is not None:
                kept, reason = seq[: end + 1], "stop"
            lp = logprobs[i][: len(kept)] if logprobs is not None else None
            out.append(Completion(kept, reason or "length", lp))
        return [out[i * params.n : (i + 1) * params.n] for i in range(n_prompts)]
