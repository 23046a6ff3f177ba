"""The micro-batch token budget from the device's free memory, when the recipe sets none.

The policy pass's memory grows with the tokens of a micro-batch: activations kept for backward and the
head's logits. Three probe passes (forward and backward over synthetic micro-batches: two sizes of short rows, one
of long rows) measure what one more token costs, how that grows with the length of its row (attention that holds
a queries x keys tensor a segment: the padded pass), and what a pass holds whatever its size; a token is costed
at the run's longest rows (its longest prompt and max_new_tokens). The budget is what fits in the memory
left once the step holds what it holds anyway (weights, the rollout engine, gradients, optimizer state, a
pass's fixed part), less a margin, up to a cap past which
larger micro-batches run no faster and only hold memory. Planned at the first update, when the rollout
engine has made its cache, for the data's longest prompts, and again when that cache has grown or a prompt longer
than any planned for has come (GRPOTrainer.token_budget); printed, and logged as `token_budget`.

`ponder sft` plans the same way (ponder.sft.trainer): through the packed pass, GRPO's probe; through the model's
own forward, an SFT pass over rows of random tokens, its budget counting padded tokens (rows x the widest) as its
micro-batches do.

Activation checkpointing (`model.gradient_checkpointing: auto`) is the plan's to turn on: when the budget
without it cannot hold one full-length sample (the longest prompt and `max_new_tokens`; in SFT the longest
example), no micro-batch split could train that sample, so the layers are checkpointed (only each layer's input
kept, the rest recomputed in backward) and the cost of a token is measured again. Where one sample fits, it stays
off: it costs a third more compute, while a smaller budget costs only more, smaller micro-batches.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ponder import distributed, models
from ponder.errors import UserError
from ponder.runtime import free_cuda_memory, rng_kept
from ponder.optim import state_bytes
from ponder.rl.batching import Sample

CPU_BUDGET = 16384  # without a device memory to read: the former fixed default
# H200, 0.5B shape, 32 x 8 x 640 tokens (bench/README.md): 32,768 tokens a micro-batch trains within 2% of 65,536
CAP = 32768
FLOOR = 1024
PROBE_TOKENS = (2048, 6144)
PROBE_ROWS = (240, 960)  # completion lengths of the probes' short and long rows
MARGIN = 0.10  # of the free memory, for fragmentation and what the probe does not see
# and of the whole device, held back besides: the caching allocator's fragmentation grows with what the step
# holds, not with what is free (a 7B step on an H200 ran out of memory with 5.8 GiB reserved but unallocated
# while the margin left 3.8 GiB)
RESERVE = 0.04
GIB = 2**30
GRPO_SHORTER = "lower rollout.max_new_tokens"
LORA_WAY = "train adapters only (model.lora: {r: 16, alpha: 32})"  # a way out for GRPO and SFT alike


def grpo_fixes(lora: bool = False, offload: bool = False) -> str:
    """What a GRPO run can do when its state leaves nothing for the update, less the ways it has taken already
    (`ponder sft` passes its own)."""
    ways = ([] if lora else [LORA_WAY]) + \
        ([] if offload else ["keep the optimizer state in CPU memory (train.sharding=fsdp train.offload=true)"])
    return ", ".join(ways + ["or shard over more GPUs (torchrun --nproc-per-node N)" if ways else
                             "shard over more GPUs (torchrun --nproc-per-node N)"])


@dataclass
class Plan:
    budget: int
    per_token: float  # bytes one more token of a micro-batch costs at the peak of its pass
    free: float  # bytes free for the step before its micro-batches (device free + cached, less state to come)
    capped: bool
    checkpointing: bool = False  # turned on by the plan (model.gradient_checkpointing: auto)
    without: int = 0  # the budget without checkpointing, when the plan turned it on
    longest: int = 0  # tokens of the run's longest row

    def line(self) -> str:
        why = "the cap" if self.capped else f"{_gib(self.free)} free"
        line = (f"optim.token_budget: {self.budget:,} tokens a micro-batch, chosen from device memory "
                f"({self.per_token / 2**20:.2f} MiB a token, {why}; set optim.token_budget to fix it)")
        if self.checkpointing:
            line += (f"; activation checkpointing on: without it a micro-batch could hold {self.without:,} tokens, "
                     f"less than the longest row's {self.longest:,} (set model.gradient_checkpointing: false to refuse)")
        return line


def budget_for(per_token: float, free: float, cap: int = CAP, floor: int = FLOOR) -> tuple[int, bool]:
    """The largest multiple of `floor` tokens whose activations fit in `free` bytes less the margin, at most
    `cap`; (budget, whether the cap decided). Where fewer than `floor` fit, those that fit (at least 1): a floor
    above them would run out of memory (the plan stops the run first where the longest row does not fit)."""
    fits = int((free * (1 - MARGIN)) / max(per_token, 1.0))
    budget = min(cap, fits) // floor * floor or max(fits, 1)
    return budget, fits >= cap


def state_to_come(model, optimizer, device=None) -> int:
    """Bytes the first update will still allocate beside its activations: gradients and the optimizer's
    state (AdamW: two moments a parameter; KahanAdamW: float32 or bf16 moments and a compensation) for
    trainable parameters that have none yet. Sharded (FSDP2), a rank holds its shard of each: the local
    shard's bytes. With `device`, only what lives there (shards offloaded to the CPU bring their gradients
    and optimizer state there)."""
    total = grads_to_come(model, device)
    for p in model.parameters():
        if p.requires_grad and not optimizer.state.get(p):  # the state's bytes, in the share this rank holds
            total += state_bytes(optimizer, p) * _local_bytes(p, device) // max(p.numel() * p.element_size(), 1)
    return total


def grads_to_come(model, device=None) -> int:
    return sum(_local_bytes(p, device) for p in model.parameters() if p.requires_grad and p.grad is None)


def _local_bytes(p: torch.Tensor, device=None) -> int:
    """Bytes of this rank's part of a parameter: its local shard when it is a DTensor (FSDP2); 0 if not on `device`."""
    from torch.distributed.tensor import DTensor

    local = p.to_local() if isinstance(p, DTensor) else p
    if device is not None and local.device.type != torch.device(device).type:
        return 0
    return local.numel() * local.element_size()


def probe_samples(n_tokens: int, vocab: int, row: int, prompt: int = 128) -> list[Sample]:
    """A synthetic micro-batch of about `n_tokens` stream tokens: one prompt and completions of `row` tokens."""
    g = torch.Generator().manual_seed(n_tokens + row)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    p = ids(prompt)
    return [Sample(p, ids(row + 1), 1.0 if j % 2 else -1.0, False) for j in range(max((n_tokens - prompt) // row, 2))]


@dataclass
class Cost:
    """Bytes at the peak of a policy pass: `fixed` + stream tokens x (`per_token` + `per_token_row` x a row's
    length, its prompt's tokens and its own: the keys its queries see). The last term is attention that holds a
    [queries x keys] tensor a segment (the padded pass: float32, or no varlen kernel), whose cost a token grows with
    the length of its row; 0 for varlen flash attention."""
    per_token: float
    per_token_row: float
    fixed: float

    def at(self, row: int) -> float:
        """Bytes a token costs in rows of `row` tokens."""
        return self.per_token + self.per_token_row * row


def measure_cost(probe) -> Cost:
    """The Cost from three probe passes (forward and backward): two sizes of short rows give the cost of a token
    and the fixed part, one batch of long rows the growth with a row's length. The fixed part holds what a pass
    keeps for its whole length, such as the bfloat16 casts of frozen weights that autocast makes and backward
    keeps (14 GiB for a 7B model under LoRA); not the gradients, which are there before it (peak_of). `probe(tokens,
    row)`: one training pass over about `tokens` tokens in rows of `row` tokens (a prompt's and a completion's in
    GRPO, an example's in SFT), leaving no gradients behind; returns (bytes at its peak, the tokens it ran, the
    length of its rows)."""
    short, long = PROBE_ROWS
    # a training pass, whatever mode the first caller is in: GRPO plans at its first micro-batch, which with
    # beta > 0 or mu > 1 is a no-grad scoring pass (its backward then stopped the run)
    with torch.enable_grad():
        (p0, n0, row), (p1, n1, _), (p2, n2, _) = [probe(PROBE_TOKENS[0], short), probe(PROBE_TOKENS[1], short),
                                                   probe(PROBE_TOKENS[0], long)]
    at_short = (p1 - p0) / (n1 - n0)
    fixed = p0 - at_short * n0
    at_long = (p2 - fixed) / n2
    growth = max((at_long - at_short) / (long - short), 0.0)  # (measurement noise can make it negative)
    return Cost(at_short - growth * row, growth, fixed)


def policy_probe(policy_pass, model, device, vocab: int):
    """GRPO's probe for measure_cost: probe_samples through the policy pass. A row's length counts its prompt,
    as the plan's longest sample does."""

    def probe(tokens: int, row: int) -> tuple[int, int, int]:
        batch = probe_samples(tokens, vocab, row)
        lent, policy_pass.scratch = policy_pass.scratch, None  # the engine's lent cache would hide the head's logits
        try:
            peak = _peak(policy_pass, model, device, batch)
        finally:
            policy_pass.scratch = lent
        prompt = len(batch[0].prompt_ids)
        return peak, prompt + sum(len(s.completion_ids) - 1 for s in batch), prompt + row

    return probe


def _peak(policy_pass, model, device, batch) -> int:
    def step():
        logp, ent, mask = policy_pass.logprobs(model, batch, with_entropy=True)
        ((logp + ent if policy_pass.entropy_grad else logp) * mask).sum().backward()  # as the loss's terms are

    return peak_of(step, model, device)


def peak_of(step, model, device) -> int:
    """Bytes that `step()` (a forward and backward) allocated at its peak beyond what was allocated before, run as
    a micro-batch after the first runs: beside every gradient (zeros until then). From no gradients, a checkpointed
    pass peaked at the end of its backward, its gradients made and its activations gone, and the activations hid:
    a 7B model's plan costed a token at 0.03 MiB and its first 32,768-token micro-batch ran out of memory. The
    gradients are dropped after; the random state is left as it was."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    # the probe's random draws (dropout) are not the run's: a resumed run probes after restoring its saved state, and
    # drawing here gave its steps other dropout masks than the uninterrupted run's
    with rng_kept(model):
        step()
    torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return torch.cuda.max_memory_allocated(device) - base


def reads_memory(device) -> bool:
    return torch.device(device).type == "cuda"


def total_bytes(device) -> float:
    return torch.cuda.get_device_properties(device).total_memory


def free_bytes(device) -> float:
    """Free device memory plus what the caching allocator holds unused."""
    return free_cuda_memory(device)


def plan(policy_pass, model, optimizer, device, vocab: int, print_line: bool = True, longest: int = 0,
         may_checkpoint: bool = False, fixes: str | None = None) -> Plan:
    """GRPO's plan (plan_with, probing the policy pass). `longest`: stream tokens of one full-length sample (its
    prompt and max_new_tokens)."""
    return plan_with(policy_probe(policy_pass, model, device, vocab), model, optimizer, device, print_line, longest,
                     may_checkpoint, fixes)


def plan_with(probe, model, optimizer, device, print_line: bool = True, longest: int = 0,
              may_checkpoint: bool = False, fixes: str | None = None, shorter: str = GRPO_SHORTER) -> Plan:
    """The plan from `probe` (see measure_cost) where device memory can be read (CUDA); elsewhere the fixed CPU
    budget. `longest`: tokens of the run's longest row; `may_checkpoint`: gradient_checkpointing is auto. Where the
    state to come leaves no memory for a micro-batch at all, or the longest row's activations do not fit (after
    checkpointing, where it may), one line naming `fixes` (and `shorter`, how to shorten the rows) before the step
    runs out of memory."""
    if not reads_memory(device):
        return Plan(CPU_BUDGET, 0.0, 0.0, True)
    fixes = fixes or grpo_fixes()
    to_come = state_to_come(model, optimizer, device)  # before the probe, which makes gradients and frees them again
    left = lambda: free_bytes(device) - to_come - RESERVE * total_bytes(device)  # noqa: E731
    room_or_stop(left(), to_come, 0.0, device, fixes)
    cost = measure_cost(probe)
    per_token = cost.at(longest or PROBE_ROWS[1])  # a token of the longest rows costs the most
    # read again after the probe: its first pass loads what stays (kernels, workspaces); less what a pass holds
    # whatever its size, beside the gradients (in to_come)
    fixed = max(cost.fixed, 0)
    free = left() - fixed
    room_or_stop(free, to_come, fixed, device, fixes)
    budget, capped = budget_for(per_token, free)
    result = Plan(budget, per_token, free, capped)
    # every rank alike: checkpointed layers gather sharded weights again in backward
    if may_checkpoint and distributed.max_all(float(needs_checkpointing(per_token, free, longest))):
        models.enable_checkpointing(model)
        per_token = measure_cost(probe).at(longest or PROBE_ROWS[1])
        budget, capped = budget_for(per_token, free)
        result = Plan(budget, per_token, free, capped, checkpointing=True, without=result.budget, longest=longest)
    if distributed.max_all(float(needs_checkpointing(per_token, free, longest))):  # still: the longest row cannot run
        how = ("even with activation checkpointing" if models.checkpointing_on(model) else
               "without activation checkpointing (model.gradient_checkpointing: auto turns it on when it helps)")
        raise UserError(f"the longest row ({longest:,} tokens) needs {_gib(per_token * longest)} of activations {how}, "
                        f"and {_gib(free * (1 - MARGIN))} are free for them; {shorter}, or {fixes}")
    if hasattr(optimizer, "make_state"):  # (KahanAdamW) in one piece now, not among the update's freed activations
        optimizer.make_state()
    if print_line:
        print(f"ponder: {result.line()}", file=sys.stderr)
    return result


def room_or_stop(free: float, to_come: int, fixed: float, device, fixes: str) -> None:
    """One line naming `fixes` when `free` bytes are left for activations or fewer: the first update's optimizer
    step would run out of memory (a 7B model's full-parameter GRPO on an 80 GB H100 did, after its first rollout).
    `fixed`: what a pass holds whatever its size (such as LoRA's bf16 casts of a frozen base)."""
    if distributed.max_all(float(free <= 0)):  # every rank stops, or the others would wait in a collective
        total = total_bytes(device)
        pass_part = f", what a pass holds whatever its length ({_gib(fixed)})" if fixed else ""
        raise UserError(f"the update does not fit this device: what the run holds ({_gib(total - free_bytes(device))} of "
                        f"{_gib(total)}), the gradients and optimizer state to come ({_gib(to_come)}){pass_part} and a "
                        f"margin leave {_gib(free)} for activations; {fixes}")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def needs_checkpointing(per_token: float, free: float, longest: int) -> bool:
    """Whether the activations of one full-length sample would not fit in `free` bytes less the margin."""
    return longest > 0 and per_token * longest > free * (1 - MARGIN)
