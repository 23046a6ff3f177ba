"""Language mixing and its cure, in miniature (issue 21; docs/bilingual.md): the whole comparison, one command.

    python bench/bilingual_mixing.py --seeds 0 1 2 --parallel 9 [--out runs/bilingual-exp] [--base DIR]
    python bench/bilingual_mixing.py --smoke --seeds 0 --out /tmp/bilingual-smoke     # seconds: the plumbing only

Stages, each skipped when its output exists (so an interrupted comparison continues):
  1. the bilingual base: the shipped tiny-bilingual-base (or --base DIR; --smoke pretrains 2 steps into OUT/base)
  2. per seed, the arms, all with the same RL budget (the recipe's steps, prompts and samples):
       zero       ponder train recipes/zero-bilingual-tiny.yaml              accuracy + format (R1-Zero)
       language   ponder train recipes/zero-bilingual-lang-tiny.yaml         + the language reward
       coldstart  ponder sft recipes/coldstart-bilingual-tiny.yaml, then
                  ponder train recipes/coldstart-rl-bilingual-tiny.yaml      cold start in the target language, then R1-Zero
Then prints one table (held-out, before -> after, mean of the seeds with their range): language-mixing
rate and pass@1 for Chinese and English prompts, completion length and format rate; and draws the
curves (mixing rate and accuracy per language over steps, each arm the mean of its seeds) to --plot.
Every command is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ARMS = {
    "zero": "zero-bilingual-tiny.yaml",
    "language": "zero-bilingual-lang-tiny.yaml",
    "coldstart": "coldstart-rl-bilingual-tiny.yaml",
}
EVAL_KEY = "bilingual_arithmetic/test"  # the recipes' one eval entry; its figures per language below
LANGS = ("zh", "en")
# (column, language or None for both, figure)
COLUMNS = [("mixing zh", "zh", "mixing_rate"), ("mixing en", "en", "mixing_rate"),
           ("pass@1 zh", "zh", "pass@1"), ("pass@1 en", "en", "pass@1"),
           ("length", None, "mean_length"), ("format", None, "format_rate")]
CURVES = [("mixing_rate/zh", "mixing rate, Chinese prompts"), ("mixing_rate/en", "mixing rate, English prompts"),
          ("accuracy/zh", "accuracy, Chinese prompts"), ("accuracy/en", "accuracy, English prompts"),
          ("completion_len/mean", "completion length (tokens)"), ("format_rate", "format rate")]
SMOKE_PRETRAIN = ["steps=2", "batch_size=2", "block=64", "corpus_chars=60000", "warmup_steps=1", "probe.n=0", "workers=1"]
SMOKE_EVAL = "[{name: bilingual_arithmetic, split: test, n: 4, options: {language: both, difficulty: hard}}]"
SMOKE_TRAIN = ["train.steps=2", "train.save_every=2", "rollout.group_size=2", "rollout.prompts_per_step=2",
               "rollout.max_new_tokens=8", "eval.k=1", f"eval.tasks={SMOKE_EVAL}",
               "data.tasks=[{name: bilingual_arithmetic, split: train, n: 8, options: {language: both}}]"]
SMOKE_SFT = ["train.epochs=1", "train.batch_size=2", "eval.k=1", "eval.max_new_tokens=8", f"eval.tasks={SMOKE_EVAL}",
             "data.coldstart=[{name: bilingual_arithmetic, n: 4, split: train, options: {language: both}}]"]


def ponder(args: list[str], log: Path) -> None:
    """Runs one ponder command with its output in `log`; stops the comparison if it fails."""
    print("$ ponder " + " ".join(args), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        done = subprocess.run([sys.executable, "-m", "ponder", *args], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): ponder {' '.join(args)}; see {log}")


def run_arm(arm: str, seed: int, base: Path, args) -> Path:
    out, name = Path(args.out), f"{arm}-seed{seed}"
    run = out / name
    if (run / "eval_after.json").is_file():
        return run
    model = base
    if arm == "coldstart":
        sft = out / f"coldstart-sft-seed{seed}"
        if not (sft / "final" / "config.json").is_file():
            ponder(["sft", str(RECIPES / "coldstart-bilingual-tiny.yaml"), f"seed={seed}", f"name={sft.name}",
                    f"output_dir={out}", f"model.path={base}", f"train.threads={args.threads}",
                    *(SMOKE_SFT if args.smoke else [])], out / f"{sft.name}.log")
        model = sft / "final"
    ponder(["train", str(RECIPES / ARMS[arm]), f"seed={seed}", f"name={name}", f"output_dir={out}",
            f"model.path={model}", f"train.threads={args.threads}", *(SMOKE_TRAIN if args.smoke else []),
            *args.overrides], out / f"{name}.log")
    return run


def figures(run: Path, tag: str) -> dict:
    """{language: figures} of a run's held-out evaluation `tag` (before | after), and 'all'."""
    result = json.loads((run / f"eval_{tag}.json").read_text())[EVAL_KEY]
    out = {lang: result["tasks"].get(f"bilingual_arithmetic/{lang}", {}) for lang in LANGS}
    out["all"] = result["metrics"]
    return out


def cell(values: list[float]) -> str:
    """Mean of the seeds, with their range when there are several."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ({min(values):.2f}-{max(values):.2f})"


def table(runs: dict[str, list[Path]]) -> str:
    """One row per arm and moment (before, after RL): each column the mean of the seeds (min-max)."""
    lines = ["| arm | seeds | when | " + " | ".join(c for c, _, _ in COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for arm, dirs in runs.items():
        for tag in ("before", "after"):
            figs = [figures(d, tag) for d in dirs]
            cells = [cell([f[lang or "all"].get(key) for f in figs]) for _, lang, key in COLUMNS]
            lines.append(f"| {arm} | {len(dirs)} | {tag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: dict[str, list[Path]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for arm, dirs in runs.items():
            series = [[r.get(key) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "reward" in r]
                      for d in dirs]
            n = min(len(s) for s in series)
            cols = [[v for v in c if v is not None] for c in zip(*[s[:n] for s in series])]
            steps = [i + 1 for i, c in enumerate(cols) if c]
            mean = [sum(c) / len(c) for c in cols if c]
            ax.plot(steps, mean, label=arm)
            ax.fill_between(steps, [min(c) for c in cols if c], [max(c) for c in cols if c], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Language mixing on the bilingual tiny base: mean of seeds, min-max shaded")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--parallel", type=int, default=3, help="runs at once")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument("--out", default="runs/bilingual-exp")
    p.add_argument("--base", help="the bilingual base model (default: the shipped tiny-bilingual-base; with --smoke, "
                                  "a 2-step pretrain of recipes/pretrain-bilingual-tiny.yaml into OUT/base)")
    p.add_argument("--plot", help="where to draw the curves (default: OUT/curves.png)")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything on a few problems: checks the plumbing in seconds")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every RL run (e.g. train.steps=120)")
    args = p.parse_args()
    out = Path(args.out)
    from ponder.models import ASSETS

    base = Path(args.base) if args.base else out / "base" if args.smoke else ASSETS / "tiny-bilingual-base"
    if args.smoke and not args.base and not (base / "config.json").is_file():
        ponder(["pretrain", str(RECIPES / "pretrain-bilingual-tiny.yaml"), f"output={base}",
                *(SMOKE_PRETRAIN if args.smoke else [])], out / "base.log")
    jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]
    with ThreadPoolExecutor(args.parallel) as pool:
        done = list(pool.map(lambda job: run_arm(job[0], job[1], base, args), jobs))
    runs = {arm: [d for (a, _), d in zip(jobs, done) if a == arm] for arm in args.arms}
    print(table(runs))
    curves = Path(args.plot) if args.plot else out / "curves.png"
    plot(runs, curves)
    print(f"curves: {curves}")


if __name__ == "__main__":
    main()
