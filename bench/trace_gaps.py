"""Where the GPU waits in a profiled step: busy time and the largest idle gaps of a Chrome trace that
bench/grpo_step.py --profile wrote, each with the host operations running during it.

  python bench/trace_gaps.py OUT/prof.0.5b.auto.trace.json --split _partial [--kernels 25] [--sizes]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--split", default="_partial", help="kernel name whose last launch ends the first phase (decode)")
    ap.add_argument("--gaps", type=int, default=12)
    ap.add_argument("--min-us", type=float, default=200.0)
    ap.add_argument("--kernels", type=int, default=0, help="also list each phase's N kernels of most time (name, ms, launches)")
    ap.add_argument("--sizes", action="store_true", help="also sum each phase's idle by gap size (many launch-sized gaps or a few long waits)")
    a = ap.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    ops = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function") and "dur" in e]
    if not kernels:
        print("no kernels in the trace")
        return
    split = max((k["ts"] + k["dur"] for k in kernels if a.split in k["name"]), default=kernels[0]["ts"])
    start, end = kernels[0]["ts"], max(k["ts"] + k["dur"] for k in kernels)
    for name, lo, hi in (("first phase", start, split), ("second phase", split, end)):
        busy, gaps, last = 0.0, [], None
        for k in kernels:
            s, e = max(k["ts"], lo), min(k["ts"] + k["dur"], hi)
            if e <= s:
                continue
            if last is not None and s > last:
                gaps.append((s - last, last, s))
            busy += e - max(s, last or s)
            last = max(last or e, e)
        span = hi - lo
        print(f"{name}: span {span / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms "
              f"in {sum(g[0] >= a.min_us for g in gaps)} gaps of >= {a.min_us:.0f} us ({sum(g[0] for g in gaps if g[0] >= a.min_us) / 1e3:.1f} ms)")
        if a.sizes:
            edges = [0, 5, 20, 100, 500, 2000, 10000, float("inf")]
            for lo_us, hi_us in zip(edges, edges[1:]):
                part = [g[0] for g in gaps if lo_us <= g[0] < hi_us]
                print(f"    gaps of {lo_us:g}-{hi_us:g} us: {len(part):6d}, {sum(part) / 1e3:8.1f} ms")
        for dur, s, e in sorted(gaps, reverse=True)[: a.gaps]:
            during = Counter(o["name"][:70] for o in ops if o["ts"] < e and o["ts"] + o["dur"] > s and o["dur"] < 5 * dur + 1e5)
            print(f"  {dur / 1e3:7.2f} ms at +{(s - lo) / 1e3:8.1f}: {', '.join(n for n, _ in during.most_common(6))}")
        if a.kernels:
            time, calls = Counter(), Counter()
            for k in kernels:
                if lo <= k["ts"] < hi:
                    time[k["name"][:90]] += k["dur"]
                    calls[k["name"][:90]] += 1
            for n, t in time.most_common(a.kernels):
                print(f"    {t / 1e3:9.2f} ms {calls[n]:7d}x  {n}")


if __name__ == "__main__":
    main()
