"""Run the R1-Zero demo recipe with several seeds and draw its curves with their spread.

    python bench/demo_seeds.py --seeds 0 1 2 [--parallel 2] [--out docs/figures/zero-tiny-seeds.png]

Each seed is a whole `ponder train recipes/zero-tiny.yaml seed=S` run (data order, sampling and
initialisation all follow the seed). Prints a before/after table per seed (held-out split) and
writes one PNG with reward, accuracy, completion length and reflection-word rate over steps:
the mean of the seeds as a line, their min-max range shaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CURVES = [("accuracy", "accuracy (training batch)"), ("format_rate", "format rate"),
          ("completion_len/mean", "completion length (tokens)"), ("reflection_rate/countdown", "reflection-word rate, countdown"),
          ("completion_len/arithmetic", "completion length, arithmetic"), ("accuracy/countdown", "accuracy, countdown")]
FIGURES = ("pass@1", "format_rate", "mean_length", "reflection_rate")


def run(seed: int, args) -> Path:
    name = f"{args.name}-seed{seed}"
    cmd = [sys.executable, "-m", "ponder", "train", args.recipe, f"seed={seed}", f"name={name}",
           f"output_dir={args.output_dir}", f"train.threads={args.threads}", *args.overrides]
    log = Path(args.output_dir) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return Path(args.output_dir) / name


def rows(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward" in r]


def smooth(values, k=5):
    out = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - k + 1) : i + 1] if v is not None]
        out.append(sum(window) / len(window) if window else float("nan"))
    return out


def plot(runs: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        series = [smooth([r.get(key) for r in rows(d)]) for d in runs]
        n = min(len(s) for s in series)
        steps = list(range(1, n + 1))
        cols = list(zip(*[s[:n] for s in series]))
        mean = [sum(c) / len(c) for c in cols]
        ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], alpha=0.25, label="min-max of seeds")
        ax.plot(steps, mean, label="mean of seeds")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"R1-Zero on tiny-base, {len(runs)} seeds (5-step running means)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def table(runs: list[Path]) -> str:
    lines = ["| seed | " + " | ".join(f"{f} before -> after" for f in FIGURES) + " |", "|---" * (len(FIGURES) + 1) + "|"]
    for d in runs:
        before = next(iter(json.loads((d / "eval_before.json").read_text()).values()))["metrics"]
        after = next(iter(json.loads((d / "eval_after.json").read_text()).values()))["metrics"]
        cells = [f"{before[f]:.3f} -> {after[f]:.3f}" for f in FIGURES]
        lines.append(f"| {d.name.rsplit('seed', 1)[-1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/zero-tiny.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=1, help="runs at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="zero-tiny")
    p.add_argument("--output-dir", default="runs/seeds")
    p.add_argument("--out", default="docs/figures/zero-tiny-seeds.png")
    p.add_argument("--plot-only", action="store_true", help="draw from runs already in --output-dir")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every seed")
    args = p.parse_args()
    if args.plot_only:
        runs = [Path(args.output_dir) / f"{args.name}-seed{s}" for s in args.seeds]
    else:
        with ThreadPoolExecutor(args.parallel) as pool:
            runs = list(pool.map(lambda s: run(s, args), args.seeds))
    plot(runs, Path(args.out))
    print(table(runs))
    print(f"curves: {args.out}")


if __name__ == "__main__":
    main()
