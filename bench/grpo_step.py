"""Time of the GRPO step that `ponder train` runs, split into generate / reward / train, on one GPU.

The product's own path: a recipe, `GRPOTrainer` (what `ponder train` runs) and its defaults; nothing here
builds a step of its own. The workload (issue 15): a local Qwen2.5-shaped model directory with random
weights (0.5B or 1.5B shapes, bench/rollout.py's), a byte-level BPE tokenizer with one token per word
(17,000 three-letter words), a JSONL task of 4,096 prompts of 128 tokens, the plain template, G = 8,
32 prompts a step, 512 new tokens forced (no EOS), temperature 1, beta 0, mu 1. Random weights write no
text to verify, so the reward is a rule on the words (the share of words from one half of the vocabulary),
registered through `ponder.rewards.register` as a user's reward is: it varies within groups, so every
update pays for real gradients. Reported: the median of steps 2.. (step 1 compiles, captures, plans),
tokens per second of the rollout, and the peaks of allocated and reserved memory over the timed steps.

  PYTHONPATH=src python bench/grpo_step.py --shapes 0.5b 1.5b --steps 6 --json out.json
  PYTHONPATH=src python bench/grpo_step.py --shapes 0.5b --budget 16384 32768 65536   # fixed budgets beside auto
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import CUDA, build, force_length, long_tail, quantiles  # noqa: E402

from ponder.config import load_config  # noqa: E402
from ponder.rewards import register  # noqa: E402

WORDS = ["".join(t) for t in itertools.islice(itertools.product(string.ascii_lowercase, repeat=3), 17000)]
EVEN = frozenset(WORDS[::2])


@register("bench_even_words")
def even_words(completions, **_):
    """Share of a completion's words that are in the even half of the vocabulary (0 with no words)."""
    out = []
    for text in completions:
        words = text.split()
        out.append(sum(w in EVEN for w in words) / len(words) if words else 0.0)
    return out


def word_tokenizer():
    """A byte-level BPE tokenizer in which each word (after a space) is one token, saved as Qwen2's tokenizer
    is (transformers loads a qwen2 directory with its Qwen2 tokenizer class, which splits digits: letters only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(WORDS) + 2000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def workload(root: Path, shape: str, n_prompts: int, prompt_len: int) -> tuple[Path, Path]:
    """(model directory, JSONL task) under root, made once per shape."""
    model_dir, data = root / f"qwen2-{shape}", root / f"prompts-{prompt_len}.jsonl"
    if not (model_dir / "config.json").is_file():
        model = build(shape)
        model.save_pretrained(model_dir)
        word_tokenizer().save_pretrained(model_dir)
        del model
    if not data.is_file():
        g = torch.Generator().manual_seed(0)
        with data.open("w") as f:
            for i in range(n_prompts):
                words = torch.randint(0, len(WORDS), (prompt_len,), generator=g).tolist()
                f.write(json.dumps({"prompt": " " + " ".join(WORDS[w] for w in words), "answer": "-", "task": "bench"}) + "\n")
    return model_dir, data


def recipe(model_dir: Path, data: Path, out: Path, a, budget: str) -> list[str]:
    over = [
        f"model.path={model_dir}", f"output_dir={out}", f"name=bench-{time.time_ns()}", "data.template=plain",
        f"data.tasks=[{{name: jsonl, path: {data}}}]", "rewards={bench_even_words: 1.0}", "eval.tasks=[]",
        f"rollout.engine={a.engine}", f"rollout.group_size={a.group}", f"rollout.prompts_per_step={a.prompts}",
        f"rollout.max_new_tokens={a.new}", "rollout.temperature=1.0", "algorithm.beta=0.0", "algorithm.mu=1",
        f"train.steps={a.steps}", "train.save_every=0", "train.log_samples=0",
    ]
    return over + ([f"optim.token_budget={budget}"] if budget != "auto" else []) + a.set


def run(a, shape: str, budget: str, root: Path) -> dict:
    from ponder.rl.trainer import GRPOTrainer

    model_dir, data = workload(root, shape, 4096, a.prompt)
    trainer = GRPOTrainer(load_config(None, recipe(model_dir, data, root / "runs", a, budget)))
    force_length(trainer.model, True)
    if a.lengths == "long-tail":  # each rollout's samples end at lengths drawn afresh (bench/rollout.py's law)
        plain, calls = trainer.engine.generate, itertools.count()

        def forced(prompts, params):
            limits = long_tail(len(prompts) * params.n, params.max_tokens, seed=next(calls))
            print(f"  lengths: {quantiles(limits)}", flush=True)
            return plain(prompts, params, limits=limits)

        trainer.engine.generate = forced
    steps = []
    for i in range(a.steps):
        steps.append(trainer.step())
        m = steps[-1]
        print(f"  step {i + 1}: total {m['time/total']:.2f} s, generate {m['time/generate']:.2f}, train {m['time/train']:.2f}, "
              f"budget {m['token_budget']}, peak {m.get('memory/peak_allocated_gib', 0):.1f} / "
              f"{m.get('memory/peak_reserved_gib', 0):.1f} GiB"
              + (f", rollout_is {m['rollout_is/mean']:.5f} (capped {m['rollout_is/capped_frac']:.5f})"
                 if "rollout_is/mean" in m else ""), flush=True)
    if a.profile:  # one more step, not timed
        profiled(trainer, f"{a.profile}.{shape}.{budget}", stack=a.stack, update_only=a.profile_update)
    timed = steps[1:] or steps
    med = lambda k: statistics.median(m[k] for m in timed)  # noqa: E731
    row = dict(shape=shape, engine=a.engine, budget=steps[-1]["token_budget"], asked=budget,
               total=med("time/total"), generate=med("time/generate"), reward=med("time/reward"), train=med("time/train"),
               tokens_per_s=med("tokens_per_s"), completion_len=med("completion_len/mean"),
               peak_gib=max(m.get("memory/peak_allocated_gib", 0.0) for m in timed),
               reserved_gib=max(m.get("memory/peak_reserved_gib", 0.0) for m in timed), steps=len(timed),
               kv_gib_peak=getattr(trainer.engine, "stats", {}).get("kv_gib_peak"))
    trainer.metrics.close()
    del trainer
    if CUDA:
        torch.cuda.empty_cache()
    return row


def profiled(trainer, path: str, stack: bool = False, update_only: bool = False) -> dict:
    """One step under the profiler: the kernel table and a Chrome trace (where the GPU waits). `stack`: the
    Python calls too (which host code runs while the GPU waits; the host runs slower under it). `update_only`: the
    update alone (thousands of decode steps make a trace too big to write in a call's time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    if update_only:
        learn = trainer.learn

        def learn_profiled(samples):
            nonlocal prof
            with profile(activities=activities, with_stack=stack) as prof:
                return learn(samples)

        prof, trainer.learn = None, learn_profiled
        try:
            m = trainer.step()
        finally:
            trainer.learn = learn
    else:
        with profile(activities=activities, with_stack=stack) as prof:
            m = trainer.step()
    with open(path + ".txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total" if CUDA else "cpu_time_total", row_limit=50))
    prof.export_chrome_trace(path + ".trace.json")
    print(f"profile written: {path}.txt and .trace.json", flush=True)
    return m


def parse_with_common(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The options the step benches share (--work, --json), then the parsed arguments."""
    ap.add_argument("--work", help="where the model directories and data go (default: a temporary directory)")
    ap.add_argument("--json")
    return ap.parse_args()


def new_report(a) -> dict:
    return dict(gpu=torch.cuda.get_device_name() if CUDA else "cpu", torch=torch.__version__, workload=vars(a), results=[])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["0.5b", "1.5b"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--budget", nargs="+", default=["auto"], help="optim.token_budget values; auto: the trainer's plan")
    ap.add_argument("--engine", default="fast", choices=["fast", "hf"], help="hf: transformers' generate (slow: --steps 2)")
    ap.add_argument("--steps", type=int, default=6, help="steps run; the first is not timed")
    ap.add_argument("--set", nargs="*", default=[], help="more recipe overrides, e.g. rollout.engine_options={dtype: fp32}")
    ap.add_argument("--profile", help="profile one more step after the timed ones: PATH.SHAPE.BUDGET.txt and .trace.json")
    ap.add_argument("--stack", action="store_true", help="with --profile: record the Python calls in the trace")
    ap.add_argument("--profile-update", action="store_true", help="with --profile: the update alone, not the rollout")
    ap.add_argument("--lengths", choices=["uniform", "long-tail"], default="uniform",
                    help="long-tail: each sample ends at a length from a lognormal (median 1,500, 10%% at --new)")
    a = parse_with_common(ap)
    if a.profile_update and not a.profile:
        ap.error("--profile-update needs --profile PATH")
    report = new_report(a)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.work or tmp)
        for shape in a.shapes:
            for budget in a.budget:
                row = run(a, shape, budget, root)
                print(json.dumps(row), flush=True)
                report["results"].append(row)
    print(f"\n{'shape':6} {'budget':>7} {'total s':>8} {'generate':>9} {'reward':>7} {'train':>7} {'tok/s':>8} "
          f"{'peak GiB':>9} {'reserved':>9}")
    for r in report["results"]:
        print(f"{r['shape']:6} {r['budget']:7} {r['total']:8.2f} {r['generate']:9.2f} {r['reward']:7.3f} {r['train']:7.2f} "
              f"{r['tokens_per_s']:8.0f} {r['peak_gib']:9.2f} {r['reserved_gib']:9.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
