"""Throughput of the math accuracy reward: 10,000 mixed answers (right, wrong, tricky) scored as a trainer does.

    python bench/verify.py [--n 10000] [--group 16] [--workers 2] [--timeout 5] [--json out.json]

Answers come in GRPO groups (one gold, `group` completions each) and are scored one training step
(16 groups) per `accuracy` call, so the batching, the in-process fast path, the cache and the worker
pool all work as they do in training. The golds mix GSM8K-style integers with MATH-style fractions,
radicals, expressions, intervals, sets and choices; a few answers are bombs that must time out.
Prints answers per second and where the answers were decided.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def problem(rng: random.Random):
    """(gold, right forms, wrong forms) for one random problem."""
    kind = rng.choice(["int", "int", "int", "frac", "radical", "poly", "interval", "set", "choice", "decimal"])
    if kind == "int":
        k = rng.randint(-50, 5000)
        return str(k), [str(k), f"{k}.0", f"x = {k}", f"\\boxed{{{k}}}", f"{k} apples", f"{k:,}"], [str(k + rng.choice([-10, -1, 1, 2, 100])), f"{k}0", f"-{k + 1}"]
    if kind == "decimal":
        a = rng.randint(1, 999)
        return f"{a / 8}", [f"\\frac{{{a}}}{{8}}", f"{a}/8", f"{a / 8:.4f}"], [f"{a / 8 + 0.1:.3f}", f"\\frac{{8}}{{{a}}}"]
    if kind == "frac":
        p, q = rng.randint(1, 40), rng.randint(41, 90)
        return f"\\frac{{{p}}}{{{q}}}", [f"{p}/{q}", f"\\frac{{{2 * p}}}{{{2 * q}}}", f"\\dfrac{{{p}}}{{{q}}}"], [f"\\frac{{{q}}}{{{p}}}", f"\\frac{{{p + 1}}}{{{q}}}", f"{p / q:.3f}"]
    if kind == "radical":
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7, 10, 11])
        return f"{a}\\sqrt{{{b}}}", [f"\\sqrt{{{a * a * b}}}", f"{a} \\sqrt {b}"], [f"{a}\\sqrt{{{b + 1}}}", f"{a + 1}\\sqrt{{{b}}}", f"\\sqrt{{{a * b}}}"]
    if kind == "poly":
        a = rng.randint(1, 9)
        return f"(x+{a})^2", [f"x^2 + {2 * a}x + {a * a}", f"(x + {a})^{{2}}"], [f"x^2 + {a * a}", f"(x-{a})^2"]
    if kind == "interval":
        a, b = sorted(rng.sample(range(-20, 20), 2))
        return f"[{a}, {b})", [f"[{a},{b})", f"{a} \\le x < {b}"], [f"({a}, {b})", f"[{a}, {b}]"]
    if kind == "set":
        a, b = rng.sample(range(-9, 10), 2)
        return f"\\{{{a}, {b}\\}}", [f"\\{{{b}, {a}\\}}", f"{b}, {a}"], [f"\\{{{a}\\}}", f"\\{{{a}, {b + 20}\\}}"]
    letter = rng.choice("ABCDE")
    return f"\\text{{({letter})}}", [letter, f"({letter})"], [rng.choice([c for c in "ABCDE" if c != letter])]


def tricky(rng: random.Random, gold: str, right: str) -> str:
    return rng.choice([f"not {right}", f"{right} or {gold}7", f"1, 2, 3, \\ldots, {right}", "", "{" * 2000 + right + "}" * 2000,
                       "7" * 100_000, f"<think>{right}</think>"])


def completion(answer: str, rng: random.Random) -> str:
    if answer.startswith("<think>"):
        return answer + " <answer></answer>"
    if rng.random() < 0.3:
        return f"<think>working it out</think> The answer is $\\boxed{{{answer}}}$."
    return f"<think>working it out</think> <answer>{answer}</answer>"


def build(n: int, group: int, bombs: int, seed: int = 0):
    rng = random.Random(seed)
    groups = []
    while len(groups) * group < n:
        gold, right, wrong = problem(rng)
        answers = []
        for _ in range(group):
            r = rng.random()
            answers.append(rng.choice(right) if r < 0.45 else rng.choice(wrong) if r < 0.9 else tricky(rng, gold, right[0]))
        groups.append((gold, [completion(a, rng) for a in answers]))
    for i in range(bombs):  # a power tower (caught by a guard) and a huge power (only the time limit stops it)
        gold, comps = groups[(i + 1) * len(groups) // (bombs + 1)]
        comps[0] = completion(r"9^{9^{9^{9}}}" if i % 2 == 0 else r"10^{10^{10}}", rng)
    return groups


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), to give a figure independent of machine load."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--bombs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from ponder.rewards import match, verify_pool
    from ponder.rewards.basic import accuracy

    verify_pool.configure(workers=args.workers, timeout=args.timeout)
    groups = build(args.n, args.group, args.bombs)
    calls = []
    for i in range(0, len(groups), 16):  # one call per training step of 16 groups
        step = groups[i : i + 16]
        comps = [c for _, cs in step for c in cs]
        golds = [g for g, cs in step for _ in cs]
        calls.append((comps, golds))
    total = sum(len(c) for c, _ in calls)

    original = verify_pool.VerifyPool.map
    sent = []
    verify_pool.VerifyPool.map = lambda self, func, arglist: sent.append(len(arglist)) or original(self, func, arglist)
    verify_pool.pool().start()  # start-up is not throughput
    sent.clear()
    pids = verify_pool.pool().pids
    cpu_before = [cpu_seconds(p) for p in [*pids]] + [time.process_time()]
    start = time.perf_counter()
    scores = []
    for comps, golds in calls:
        scores += accuracy(comps, prompts=[""] * len(comps), answer=golds, task=["plain"] * len(comps))
    seconds = time.perf_counter() - start
    verify_pool.VerifyPool.map = original
    # CPU of the workers alive at the start (a replaced worker's CPU is lost with it) plus this process.
    cpu_after = [cpu_seconds(p) for p in pids] + [time.process_time()]
    cpu = None if None in cpu_before + cpu_after else sum(cpu_after) - sum(cpu_before)

    result = {
        "answers": total, "seconds": round(seconds, 2), "answers_per_second": round(total / seconds, 1),
        "distinct_pairs": len(match._CACHE), "sent_to_workers": sum(sent), "timeouts": verify_pool.pool().timeouts,
        "accuracy_mean": round(sum(s for s in scores if s is not None) / len(scores), 3),
        "cpu_seconds": None if cpu is None else round(cpu, 2),
        "answers_per_cpu_second": None if not cpu else round(total / cpu, 1),
        "workers": args.workers, "timeout_s": args.timeout, "cpus": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    verify_pool.shutdown()
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
