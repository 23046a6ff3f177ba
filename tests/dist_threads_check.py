"""Run under torchrun by tests/test_distributed.py: each rank builds a GRPO trainer, then another with train.threads=2
(recipe overrides for both: argv[2:]), and rank 0 writes the torch CPU threads of every rank after each to argv[1].
The machine is made to look like 8 cores (CI has 2, which two ranks would divide into the 1 thread each that
torchrun's own OMP_NUM_THREADS=1 gives too)."""

import json
import os
import sys

import torch
import torch.distributed as dist

from ponder import distributed
from ponder.config import load_config
from ponder.rl.trainer import GRPOTrainer

if __name__ == "__main__":
    os.sched_getaffinity = lambda pid: set(range(8))
    out, overrides = sys.argv[1], sys.argv[2:]
    threads = {}
    for setting, extra in (("default", []), ("train.threads=2", ["train.threads=2", "name=threads2"])):
        GRPOTrainer(load_config("recipes/smoke-first-digit.yaml", ["train.log_to=[]", *overrides, *extra]))
        threads[setting] = distributed.gather_all(torch.get_num_threads())
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(threads, f)
    distributed.teardown()  # together: a rank whose peer left first aborted now and then ("terminate called ...", -6)
