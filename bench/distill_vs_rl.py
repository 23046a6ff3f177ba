"""Experiment 2 of docs/recipe.md: distillation against RL for a small student (R1 paper, Table 6).

    python bench/distill_vs_rl.py --seeds 0 1 2 --parallel 6 [--out runs/distill-exp]

Stages, each skipped when its output exists (so an interrupted experiment continues):
  1. the teacher: GRPO on tiny-base, `recipes/zero-tiny.yaml seed=0` (or `--teacher DIR`, a model)
  2. the student's base: `ponder pretrain recipes/distill-student-base.yaml` (or `--student-base DIR`)
  3. per seed, both arms at once: `ponder distill recipes/distill-tiny.yaml` (teacher -> sample -> SFT of
     the student) and `ponder train recipes/rl-student-tiny.yaml` (GRPO on the same student)
Then prints one table: held-out pass@1 (mean over k), format rate and length of every run, before and
after, with each arm's wall time. Every command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FIGURES = ("pass@1", "format_rate", "mean_length")


def ponder(args: list[str], log: Path) -> float:
    """Runs one ponder command, its output in `log`; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "ponder", *args]
    print("$ ponder " + " ".join(args), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): ponder {' '.join(args)}; see {log}")
    return time.time() - t


def metrics(run: Path, tag: str) -> dict:
    path = run / f"eval_{tag}.json"
    return next(iter(json.loads(path.read_text()).values()))["metrics"] if path.is_file() else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="runs at once")
    p.add_argument("--out", default="runs/distill-exp")
    p.add_argument("--teacher", help="a trained teacher model (default: train one with recipes/zero-tiny.yaml)")
    p.add_argument("--student-base", help="the student's base model (default: pretrain recipes/distill-student-base.yaml)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    args = p.parse_args()
    out = Path(args.out)
    walls: dict[str, float] = {}

    teacher = Path(args.teacher) if args.teacher else out / "teacher" / "checkpoints" / "step-80"
    student = Path(args.student_base) if args.student_base else out / "student-base"
    first = []
    if not teacher.exists():
        first.append(("teacher", ["train", "recipes/zero-tiny.yaml", "seed=0", "name=teacher", f"output_dir={out}",
                                  f"train.threads={args.threads}"]))
    if not (student / "model.safetensors").exists():
        first.append(("student-base", ["pretrain", "recipes/distill-student-base.yaml", f"output={student}"]))
    with ThreadPoolExecutor(max(1, len(first))) as pool:
        for (name, _), wall in zip(first, pool.map(lambda job: ponder(job[1], out / f"{job[0]}.log"), first)):
            walls[name] = wall

    jobs = []
    for s in args.seeds:
        if not (out / f"distill-s{s}" / "student" / "eval_after.json").exists():
            jobs.append((f"distill-s{s}", ["distill", "recipes/distill-tiny.yaml", f"seed={s}", f"name=distill-s{s}",
                                           f"output_dir={out}", f"sample.model={teacher}", f"sft.model.path={student}",
                                           f"sft.train.threads={args.threads}", "--resume"]))
        if not (out / f"rl-s{s}" / "eval_after.json").exists():
            jobs.append((f"rl-s{s}", ["train", "recipes/rl-student-tiny.yaml", f"seed={s}", f"name=rl-s{s}",
                                      f"output_dir={out}", f"model.path={student}", f"train.threads={args.threads}"]))
    with ThreadPoolExecutor(args.parallel) as pool:
        for (name, _), wall in zip(jobs, pool.map(lambda job: ponder(job[1], out / f"{job[0]}.log"), jobs)):
            walls[name] = wall

    runs = {"teacher": [("teacher", out / "teacher")] if not args.teacher else [],
            "distilled student (SFT on teacher traces)": [(f"s{s}", out / f"distill-s{s}" / "student") for s in args.seeds],
            "RL student (GRPO, zero-tiny recipe)": [(f"s{s}", out / f"rl-s{s}") for s in args.seeds]}
    print("\n| arm | seed | " + " | ".join(f"{f} before -> after" for f in FIGURES) + " |")
    print("|---|---" + "|---" * len(FIGURES) + "|")
    for arm, members in runs.items():
        afters = []
        for seed, run in members:
            b, a = metrics(run, "before"), metrics(run, "after")
            if not a:
                continue
            afters.append(a)
            print(f"| {arm} | {seed} | " + " | ".join(f"{b.get(f, float('nan')):.3f} -> {a[f]:.3f}" for f in FIGURES) + " |")
        if len(afters) > 1:
            cells = [f"{st.mean(x[f] for x in afters):.3f} ± {st.stdev(x[f] for x in afters):.3f}" for f in FIGURES]
            print(f"| **{arm}** | mean ± sd | " + " | ".join(cells) + " |")
    for s in args.seeds:
        summary = out / f"distill-s{s}" / "traces.summary.json"
        if summary.is_file():
            print(f"traces s{s}: " + json.dumps(json.loads(summary.read_text()))[:400])
    print("wall seconds: " + json.dumps({k: round(v, 1) for k, v in walls.items()}))


if __name__ == "__main__":
    main()
