"""Run under torchrun by tests/test_distributed.py: two ranks, each with half of a fixed batch, must
produce the gradient of the whole batch in one process (for every loss aggregation). bnpo averages the
token means of all ranks' micro-batches (here one per rank): the mean of the two halves' gradients."""

import json
import sys

import torch

from ponder import distributed
from ponder.config import load_config
from ponder.rl.batching import Sample
from ponder.rl.trainer import GRPOTrainer


def batch(tok):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        prompt = tok(f"Write a number #{i}:").input_ids
        n = int(torch.randint(1, 7, (1,), generator=g))
        out.append(Sample(prompt, torch.randint(4, 100, (n,), generator=g).tolist(), advantage=float(torch.randn(1, generator=g))))
    return out


def grads(trainer, samples):
    trainer.update(samples)
    return torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


out_path, results = sys.argv[1], {}
for agg in ("grpo", "dapo", "dr_grpo", "bnpo"):
    cfg = load_config("recipes/smoke-first-digit.yaml", [f"output_dir={out_path}.runs", f"name={agg}", "optim.lr=0",
                                                          f"algorithm.loss_agg={agg}", "optim.grad_clip=0"])
    trainer = GRPOTrainer(cfg)
    samples = batch(trainer.tokenizer)
    mine = grads(trainer, samples[trainer.rank :: trainer.world])  # summed across the two ranks
    active, world = distributed.active, trainer.world
    distributed.active, trainer.world = (lambda: False), 1  # the same trainer as one process
    try:
        if agg == "bnpo":  # each half is one micro-batch
            whole = (grads(trainer, samples[0::2]) + grads(trainer, samples[1::2])) / 2
        else:
            whole = grads(trainer, samples)
    finally:
        distributed.active, trainer.world = active, world
    results[agg] = (mine - whole).abs().max().item() / whole.abs().max().item()
if distributed.rank() == 0:
    json.dump(results, open(out_path, "w"))
