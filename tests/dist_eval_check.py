"""Run under torchrun by tests/test_distributed.py: every rank evaluates its share of the chunks of one evaluation
(ponder.evaluation.runner deals them out) and rank 0 writes the result to argv[1], to be compared with one process's
evaluation of the same model and problems."""

import json
import sys

import torch.distributed as dist

from ponder import distributed
from ponder.evaluation.runner import evaluate
from ponder.models import load
from ponder.tasks import load_examples
from ponder.config import TaskSpec
from ponder.rollout import make_engine


def run() -> dict:
    """The evaluation's result (timing left out) and how many generate calls this process made."""
    model, tok = load("tiny-base", seed=0)
    examples = load_examples(TaskSpec(name="arithmetic", split="test", n=7), 0)
    engine = make_engine("fast", model, tok, batch_size=6)
    calls, real = [0], engine.generate
    engine.generate = lambda *a, **k: calls.__setitem__(0, calls[0] + 1) or real(*a, **k)
    r = evaluate(model, tok, examples, k=3, max_new_tokens=24, batch_size=6, progress=False, seed=5, engine=engine)
    r.pop("timing")
    return {**r, "calls": calls[0]}


if __name__ == "__main__":
    from pathlib import Path

    dist.init_process_group("gloo")
    r = run()
    calls = [None] * dist.get_world_size()
    dist.all_gather_object(calls, r["calls"])
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps({**r, "calls": calls}, default=str))
    distributed.teardown()  # together (a barrier, then leave): see tests/dist_threads_check.py
