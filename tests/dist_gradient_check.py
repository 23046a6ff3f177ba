"""Run under torchrun by tests/test_distributed.py (2 or 4 ranks): every rank trains on its own prompt groups
through the trainer's own code (assign_advantages, then learn: mask, mini-batches, mu passes, updates), the
policy sharded by FSDP2 (each train.sharding mode: argv[2]), and the last gradient and the updated weights
(gathered from the shards) must equal those of one process, unsharded, given the whole batch.

The whole batch is P prompts x G samples; rank r owns groups r, r + W, ... (as GRPOTrainer.collect deals
them), so the i-th mini-batches of all ranks together are the one process's i-th mini-batch. Cases cover
every loss aggregation, mask_truncated with uneven per-rank counts and a rank left with nothing, minibatches
> 1 with mu = 2, and batch_std. bnpo averages token means over micro-batches, so its reference is one process
with the same micro-batches (each rank's, side by side). Each case is printed before it runs: a rank that
hangs shows where. Writes {case: {grad, weights, weights_max, moved, updates, ref_updates, kl}} (maxima over ranks) to argv[1]:
grad is max |g - g_ref| / max |g_ref| of the last update, weights ||w - w_ref|| / ||w_ref - w_initial||,
weights_max max |w - w_ref|. Each later argument is a sharding mode and the cases it runs, "mode:case,case"
(the mode alone: every case), keyed "mode:case"; the one-process reference is a trainer of its own with
train.sharding=none, run once for the cases of every mode it stands for. A mode may carry
flags: fsdp+packed runs the packed policy pass (each layer through its own FSDP hooks) against one process
with the packed pass; +ckpt checkpoints the layers' activations besides; +lora trains LoRA adapters (peft) over
the frozen base, their B matrices made non-zero first (at zero, A's gradient is zero too); +kl adds the KL term
(with LoRA its reference is the base, the adapters switched off, on the sharded model itself).
"""

import copy
import datetime
import json
import sys

import torch
import torch.distributed as dist

from ponder import distributed, sharding
from ponder.config import load_config
from ponder.optim import make_optimizer
from ponder.rl import memory_plan
from ponder.rl.batching import Sample
from ponder.rl.trainer import Group, GRPOTrainer, assign_advantages
from ponder.rollout import SamplingParams, make_engine

GROUPS_PER_RANK, G = 4, 4
# local sample indices each rank's mask removes: rank 1 keeps 9 of 16 (_split by ceiling gave it 3 of 4
# mini-batches), the others uneven too
UNEVEN = {0: [5], 1: [0, 2, 5, 7, 9, 11, 14], 2: [1, 6, 12], 3: [3, 4, 8, 10, 13]}
AGGS = ("grpo", "dapo", "dr_grpo", "bnpo")
CASES = {  # name: (loss_agg, advantage, mask pattern, minibatches, mu)
    **{agg: (agg, "group_std", None, 1, 1) for agg in AGGS},
    **{f"{agg}/empty_rank": (agg, "group_std", "empty", 1, 1) for agg in AGGS},
    **{f"{agg}/uneven/mb4/mu2": (agg, "group_std", "uneven", 4, 2) for agg in AGGS},
    "grpo/empty_rank/mb4": ("grpo", "group_std", "empty", 4, 1),
    "dapo/mb2": ("dapo", "group_std", None, 2, 1),
    "batch_std": ("grpo", "batch_std", None, 1, 1),
    "batch_std/uneven/mb2": ("dapo", "batch_std", "uneven", 2, 1),
    "all_masked": ("grpo", "group_std", "all", 2, 1),
}


def whole_batch(tok, world):
    """Groups in the order one process would hold them; rewards differ in scale from rank to rank."""
    g = torch.Generator().manual_seed(0)
    groups = []
    for i in range(GROUPS_PER_RANK * world):
        owner = i % world
        prompt = tok(f"Write a number #{i}:").input_ids
        samples = [Sample(prompt, torch.randint(4, 100, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist())
                   for _ in range(G)]
        for s in samples:
            s.owner = owner
        rewards = (torch.randint(0, 3, (G,), generator=g) * (1 + owner)).tolist() if i % 5 else [1.0] * G  # some uniform
        groups.append(Group({"prompt": ""}, samples, [""] * G, [float(r) for r in rewards], {}))
    return groups


def mask(groups, pattern, world):
    for r in range(world):
        local = [s for grp in groups if grp.samples[0].owner == r for s in grp.samples]
        for j, s in enumerate(local):
            s.truncated = pattern == "all" or (pattern == "empty" and r == 1) or (pattern in ("uneven", "empty") and j in UNEVEN[r])


def train(trainer, initial, groups, case):
    """The case from the initial weights: (last gradient, weights after, number of updates, the KL term's sum over
    the first update's tokens)."""
    agg, adv, _, minibatches, mu = CASES[case]
    a = trainer.cfg.algorithm
    a.loss_agg, a.advantage, a.mask_truncated, a.minibatches, a.mu = agg, adv, CASES[case][2] is not None, minibatches, mu
    trainer.model.load_state_dict(initial)
    trainer.optimizer, trainer.scheduler = make_optimizer(trainer.model, trainer.cfg.optim, 1)
    assign_advantages(groups, adv)
    stats = trainer.learn([s for grp in groups for s in grp.samples])
    params = list(trainer.model.parameters())  # sharded: DTensors, gathered whole (every rank in the same order)
    weights = [sharding.full_tensor(p.detach()) for p in params]
    grad = torch.cat([(sharding.full_tensor(p.grad) if p.grad is not None else torch.zeros_like(w)).flatten()
                      for p, w in zip(params, weights)])
    return grad, torch.cat([w.flatten() for w in weights]), len(stats), stats[0]["kl"]


def as_one_process(trainer, world):
    """World size 1 for the unsharded reference trainer; bnpo's micro-batches are kept as each rank would form them."""
    saved = distributed.active, trainer.world, trainer.policy_pass.micro_batches
    split = trainer.policy_pass.micro_batches

    def per_rank(samples, budget):
        return [mb for r in range(world) for mb in split([s for s in samples if s.owner == r], budget)]

    distributed.active, trainer.world = (lambda: False), 1
    if trainer.cfg.algorithm.loss_agg == "bnpo":
        trainer.policy_pass.micro_batches = per_rank
    return saved


def rollout_check(trainer, reference, start):
    """After the updates, the sharded trainer's engine decodes from the current weights: its copy equals the
    gathered shards, and its rollouts (greedy, and sampled with a seed) are those of an unsharded model holding
    the same weights in this process. {copy_diff, moved, same_rollouts}."""
    trainer.sync_rollout_weights()  # what step() does after every update
    full = {k: sharding.full_tensor(v) for k, v in trainer.model.state_dict().items()}
    plain = copy.deepcopy(reference.model)
    plain.load_state_dict(full)
    mine = dict(trainer.rollout_weights.model.named_parameters(remove_duplicate=False))  # the head: its own matrix
    tok = trainer.tokenizer
    prompts = [tok(f"Write a number #{i}:").input_ids for i in range(3)]
    same = True
    for params in (SamplingParams(n=2, temperature=0.0, max_tokens=6), SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=5)):
        ours = [[c.token_ids for c in out] for out in trainer.engine.generate(prompts, params)]
        theirs = [[c.token_ids for c in out] for out in make_engine("fast", plain, tok).generate(prompts, params)]
        same = same and ours == theirs
    return {"copy_diff": max((mine[k] - p).abs().max().item() for k, p in plain.named_parameters(remove_duplicate=False)),
            "moved": (torch.cat([p.detach().flatten() for p in plain.parameters()]) - start).norm().item(),
            "same_rollouts": same}


FLAGS = {"packed": "train.forward=packed", "padded": "train.forward=padded", "ckpt": "model.gradient_checkpointing=true", "lora": "model.lora={r: 4, alpha: 8}",
         "kl": "algorithm.beta=0.04"}


@torch.no_grad()
def nudge_adapters(model):
    """LoRA's B starts at zero: seeded values instead, so that A has a gradient and the adapters change the policy."""
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def reference_spec(spec: str) -> str:
    """The one-process reference of a mode spec: unsharded, with the same flags (the same policy pass)."""
    return "+".join(["none", *spec.split("+")[1:]])


def make_trainer(out_path, rank, spec):
    """spec: a train.sharding mode, then +flags of FLAGS (e.g. fsdp+packed+ckpt: the packed pass, checkpointed)."""
    mode, *flags = spec.split("+")
    overrides = [f"output_dir={out_path}.runs", f"name=dist-check-{spec}-{rank if mode == 'none' else ''}", "train.threads=1",
                 "optim.lr=1e-3", "optim.weight_decay=0.01", "optim.token_budget=80", f"train.sharding={mode}",
                 *(FLAGS[f] for f in flags)]
    cfg = load_config("recipes/smoke-first-digit.yaml", overrides)
    if mode != "none":
        return GRPOTrainer(cfg)
    setup, active = distributed.setup, distributed.active  # one process on its own, inside the torchrun job
    distributed.setup, distributed.active = (lambda *_: (0, 1)), (lambda: False)
    try:
        return GRPOTrainer(cfg)
    finally:
        distributed.setup, distributed.active = setup, active


def main(out_path, runs: dict[str, list[str]]):
    """runs: each mode spec and its cases."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a mismatched collective fails, not hangs
    rank, world = dist.get_rank(), dist.get_world_size()
    modes = list(runs)
    ref_results, results, rollouts, references, plan, wholes, initials, starts = {}, {}, {}, {}, {}, {}, {}, {}
    for ref_spec in dict.fromkeys(map(reference_spec, modes)):  # the one-process reference of every case, once
        names = dict.fromkeys(case for mode in modes if reference_spec(mode) == ref_spec for case in runs[mode])
        reference = references[ref_spec] = make_trainer(out_path, rank, ref_spec)
        if "lora" in ref_spec:
            nudge_adapters(reference.model)
        wholes[ref_spec] = memory_plan.state_to_come(reference.model, reference.optimizer)
        initial = initials[ref_spec] = copy.deepcopy(reference.model.state_dict())
        start = starts[ref_spec] = torch.cat([p.detach().flatten() for p in reference.model.parameters()]).clone()
        for case in names:
            groups = whole_batch(reference.tokenizer, world)
            mask(groups, CASES[case][2], world)
            reference.cfg.algorithm.loss_agg = CASES[case][0]  # as_one_process reads it (train sets the rest)
            saved = as_one_process(reference, world)
            try:
                ref_results[ref_spec, case] = train(reference, initial, groups, case)
            finally:
                distributed.active, reference.world, reference.policy_pass.micro_batches = saved
    for mode in modes:
        reference, start = references[reference_spec(mode)], starts[reference_spec(mode)]
        trainer = make_trainer(out_path, rank, mode)  # the same seed: the reference's initial weights, sharded
        flags = mode.split("+")[1:]
        assert trainer.policy_pass.packed == reference.policy_pass.packed == ("padded" not in flags)  # auto: packed
        inner = trainer.model.get_base_model() if "lora" in flags else trainer.model
        assert bool(inner.model.gradient_checkpointing) == ("ckpt" in flags)  # the layers then checkpointed
        assert ("lora" in flags) == hasattr(trainer.model, "peft_config") and (trainer.ref is None) == ("lora" in flags or "kl" not in flags)
        if "lora" in flags:  # the reference's nudged adapters, into the shards
            sharding.load_full_state(trainer.model, initials[reference_spec(mode)])
        initial_mode = copy.deepcopy(trainer.model.state_dict())
        # the memory plan counts each rank's shards of the gradients and AdamW moments: together, the whole model's
        mine = memory_plan.state_to_come(trainer.model, trainer.optimizer)
        plan[mode] = {"mine": mine, "whole": wholes[reference_spec(mode)], "sum": int(distributed.sum_all(mine))}
        assert torch.equal(torch.cat([sharding.full_tensor(p.detach()).flatten() for p in trainer.model.parameters()]), start)
        for case in runs[mode]:
            print(f"rank {rank}: {mode}:{case}", flush=True)
            groups = whole_batch(trainer.tokenizer, world)
            mask(groups, CASES[case][2], world)
            mine = [copy.deepcopy(grp) for grp in groups if grp.samples[0].owner == rank]
            grad, weights, updates, kl = train(trainer, initial_mode, mine, case)
            ref_grad, ref_weights, ref_updates, _ = ref_results[reference_spec(mode), case]
            moved = (ref_weights - start).norm().item()
            results[f"{mode}:{case}"] = {"grad": (grad - ref_grad).abs().max().item() / max(ref_grad.abs().max().item(), 1e-30),
                         "weights": (weights - ref_weights).norm().item() / max(moved, 1e-30),
                         "weights_max": (weights - ref_weights).abs().max().item(),
                         "moved": moved, "updates": updates, "ref_updates": ref_updates, "kl": kl}
            if mode not in rollouts and moved > 0:  # after the first case that moved the weights
                rollouts[mode] = rollout_check(trainer, reference, start)
    results["rollouts"], results["plan"] = rollouts, plan
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        merged = {case: {k: (max(r[case][k] for r in everyone) if k != "updates" else [r[case][k] for r in everyone])
                         for k in results[case]} for case in results if case not in ("rollouts", "plan")}
        merged["rollouts"] = {mode: [r["rollouts"][mode] for r in everyone] for mode in modes}
        merged["plan"] = {mode: [r["plan"][mode] for r in everyone] for mode in modes}
        json.dump(merged, open(out_path, "w"), indent=1)
    distributed.teardown()  # a barrier, then leave: left to interpreter shutdown, gloo's threads sometimes aborted the process


if __name__ == "__main__":
    main(sys.argv[1], {mode: cases.split(",") if cases else list(CASES)
                       for mode, _, cases in (arg.partition(":") for arg in sys.argv[2:])})
