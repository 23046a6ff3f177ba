"""What running the next step's rollout beside this step's update on one GPU would save (a probe, not a feature).

Builds bench/grpo_step.py's trainer and workload, runs two steps to compile, capture and plan, then times
- serial: collect() then learn(), as `ponder train` runs them;
- overlapped: collect() in a second thread on its own CUDA stream (normal or high priority) while the main
  thread runs learn() on the samples of the rollout before (one step off-policy, as an asynchronous trainer
  would). The update's head does not borrow the rollout's idle KV cache here (they run at once); the numbers
  the two compute are not checked: the rollout copy is refreshed while the other thread may read it.

  PYTHONPATH=src python bench/overlap_probe.py --shape 0.5b --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import recipe, workload  # noqa: E402  (registers the bench's reward)
from rollout import force_length  # noqa: E402

from ponder.config import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="0.5b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--set", nargs="*", default=[])
    a = ap.parse_args()
    a.engine, a.steps = "fast", 100
    from ponder.rl.trainer import GRPOTrainer

    root = Path(tempfile.mkdtemp())
    model_dir, data = workload(root, a.shape, 4096, a.prompt)
    trainer = GRPOTrainer(load_config(None, recipe(model_dir, data, root / "runs", a, "auto")))
    force_length(trainer.model, True)
    for _ in range(2):
        m = trainer.step()
        print(f"warm-up step: total {m['time/total']:.2f} s, generate {m['time/generate']:.2f}, train {m['time/train']:.2f}", flush=True)
    trainer.policy_pass.scratch = None
    dev = trainer.device
    flat = lambda groups: [s for g in groups for s in g.samples]  # noqa: E731

    def sync():
        torch.cuda.synchronize(dev)
        return time.perf_counter()

    rows = []
    for _ in range(a.reps):
        t0 = sync()
        groups = trainer.collect()[0]
        t1 = sync()
        trainer.learn(flat(groups))
        t2 = sync()
        rows.append((t1 - t0, t2 - t1, t2 - t0))
        print(f"serial: generate {t1 - t0:.3f}  learn {t2 - t1:.3f}  step {t2 - t0:.3f}", flush=True)
    report = {"serial": rows}
    for priority in (0, -1):
        stream = torch.cuda.Stream(dev, priority=priority)
        prev = trainer.collect()[0]
        rows = []
        for _ in range(a.reps):
            out = {}

            def gen():
                try:
                    torch.cuda.set_stream(stream)
                    t = time.perf_counter()
                    out["groups"] = trainer.collect()[0]
                    stream.synchronize()
                    out["t"] = time.perf_counter() - t
                except BaseException as e:  # noqa: BLE001
                    out["error"] = e

            t0 = sync()
            th = threading.Thread(target=gen)
            th.start()
            trainer.learn(flat(prev))
            torch.cuda.current_stream(dev).synchronize()
            t_learn = time.perf_counter() - t0
            th.join()
            t2 = sync()
            if "error" in out:
                raise out["error"]
            prev = out["groups"]
            rows.append((out["t"], t_learn, t2 - t0))
            print(f"overlapped (priority {priority}): generate {out['t']:.3f}  learn {t_learn:.3f}  step {t2 - t0:.3f}", flush=True)
        report[f"overlapped, priority {priority}"] = rows
    for k, rows in report.items():
        med = [statistics.median(r[i] for r in rows) for i in range(3)]
        print(f"{k}: medians generate {med[0]:.3f}, learn {med[1]:.3f}, step {med[2]:.3f}")


if __name__ == "__main__":
    main()
