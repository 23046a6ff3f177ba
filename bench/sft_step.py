"""Time and memory of the SFT step that `ponder sft` runs, on long examples (R1's distillation traces), on one GPU.

The product's own path: a recipe and `SFTTrainer` (what `ponder sft` runs) with its defaults, so the micro-batch
budget and activation checkpointing are the memory plan's (ponder.rl.memory_plan) unless --set fixes them. The
workload: a local Qwen2.5-shaped model directory with random weights (bench/rollout.py's shapes) and the one-token-
a-word tokenizer of bench/grpo_step.py, a JSONL file of {prompt, completion} rows with prompts of --prompt words
and completions of --length words (or, with --lengths long-tail, of lengths drawn as bench/rollout.py draws R1-Zero's:
lognormal with median --median, a tenth at --length), --batch examples a step, the plain template. Reported: the median step of the
steps after the first (which plans), tokens a second, the budget, whether the plan checkpointed, and the peaks of
allocated and reserved memory over the timed steps.

  PYTHONPATH=src python bench/sft_step.py --shapes 7b --batch 16 --length 8192 --steps 3
  PYTHONPATH=src python bench/sft_step.py --shapes 7b --set optim.token_budget=16384 model.gradient_checkpointing=false
  PYTHONPATH=src python bench/sft_step.py --shapes 1.5b --batch 64 --length 32000 --median 4000 --lengths long-tail \
      --set train.forward=padded
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_step import WORDS, new_report, parse_with_common, workload  # noqa: E402
from rollout import CUDA, long_tail, quantiles  # noqa: E402

from ponder.config import load_config  # noqa: E402
from ponder.models import checkpointing_on  # noqa: E402


def examples(root: Path, n: int, prompt: int, lengths: list[int]) -> Path:
    path = root / f"sft-{n}x{prompt}+{max(lengths)}-{sum(lengths)}.jsonl"
    if not path.is_file():
        g = torch.Generator().manual_seed(1)
        words = lambda k: " " + " ".join(WORDS[w] for w in torch.randint(0, len(WORDS), (k,), generator=g).tolist())  # noqa: E731
        path.write_text("".join(json.dumps({"prompt": words(prompt), "completion": words(k)}) + "\n" for k in lengths))
    return path


def run(a, shape: str, root: Path) -> dict:
    from ponder.sft.config import SFTConfig
    from ponder.sft.trainer import SFTTrainer

    model_dir, _ = workload(root, shape, 1, 1)
    n = a.batch * a.steps
    lengths = long_tail(n, a.length, a.median) if a.lengths == "long-tail" else [a.length] * n
    print(f"completion lengths: {json.dumps(quantiles(lengths))}", flush=True)
    data = examples(root, n, a.prompt, lengths)
    cfg = load_config(None, [
        f"model.path={model_dir}", f"output_dir={root / 'runs'}", f"name=sft-{time.time_ns()}", "data.template=plain",
        f"data.files=[{data}]", f"train.batch_size={a.batch}", f"train.steps={a.steps}", "train.save_every=0",
        "train.log_samples=0", "eval.tasks=[]", "optim.lr=1e-5", *a.set], cls=SFTConfig)
    trainer = SFTTrainer(cfg)
    steps = []
    for i in range(a.steps):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        m = trainer.step()
        m["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
        m["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if CUDA else 0.0
        steps.append(m)
        print(f"  step {i + 1}: {m['time/step']:.2f} s, {m['tokens_per_s']:.0f} tokens/s, {m['tokens']} tokens, "
              f"budget {m['token_budget']}, loss {m['loss']:.3f}, peak {m['peak_gib']:.1f} / {m['reserved_gib']:.1f} GiB",
              flush=True)
    timed = steps[1:] or steps
    med = lambda k: statistics.median(m[k] for m in timed)  # noqa: E731
    row = dict(shape=shape, step_s=med("time/step"), tokens_per_s=med("tokens_per_s"), tokens=med("tokens"),
               budget=steps[-1]["token_budget"], checkpointing=checkpointing_on(trainer.model),
               pack_efficiency=med("pack_efficiency"), micro_batches=med("micro_batches"),
               peak_gib=max(m["peak_gib"] for m in timed), reserved_gib=max(m["reserved_gib"] for m in timed),
               precision=trainer.precision.name, moments=trainer.precision.moments, steps=len(timed))
    trainer.metrics.close()
    del trainer
    if CUDA:
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["7b"])
    ap.add_argument("--batch", type=int, default=16, help="examples a step")
    ap.add_argument("--prompt", type=int, default=128, help="prompt words (tokens)")
    ap.add_argument("--length", type=int, default=8192, help="completion words (tokens); long-tail: the limit")
    ap.add_argument("--lengths", choices=["uniform", "long-tail"], default="uniform")
    ap.add_argument("--median", type=int, default=1500, help="long-tail: the median completion")
    ap.add_argument("--steps", type=int, default=3, help="steps run; the first is not timed")
    ap.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. optim.token_budget=16384")
    a = parse_with_common(ap)
    report = new_report(a)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.work or tmp)
        for shape in a.shapes:
            row = run(a, shape, root)
            print(json.dumps(row), flush=True)
            report["results"].append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
