r"""One GRPO step on two CPU cores: `ponder train`'s trainer beside TRL's GRPOTrainer, same workload, one sitting.

Workload (issue 15): a random-weight Qwen2 of 0.99M parameters (hidden 128, 4 layers, 4 heads, 2 KV heads,
intermediate 512, tied embeddings) with a 51-token vocabulary (a byte-level BPE of single characters plus
the four answer/think tags, which transformers 5 loads through its own Qwen2 tokenizer class), a JSONL task
of arithmetic prompts whose answers are numbers, 16 prompts x 4 samples x 64 new tokens, every completion
forced to full length (ponder: generation_config eos [-1], as bench/rollout.py's force_length; TRL:
min_new_tokens), temperature 1, beta 0, mu 1, lr 1e-5, grad clip 1, reward `accuracy`.

On this workload the random model answers nothing right: every group's rewards are equal (`uniform groups` 1.00),
every advantage is 0 and so is the gradient. ponder's default (train.skip_zero_advantage) then runs no backward
pass and no forward (the logged entropy is the rollout's), where TRL runs its whole update: to time ponder's update
against TRL's, add a configuration with `train.skip_zero_advantage=false` (see bench/README.md).

- ponder: a recipe file read by ponder.config.load_config and run by ponder.rl.trainer.GRPOTrainer with its
  defaults, step by step as `ponder train` runs it (trainer.step(), then the metrics and samples lines).
- TRL (--trl): trl.GRPOTrainer in its own venv (--trl-python; it must hold torch, trl and math-verify), with
  trl.rewards.accuracy_reward (math-verify in process on the whole completion, TRL's own accuracy reward), once
  with its own default precision (GRPOConfig's bf16=True: autocast on CPU as on GPUs) and once with bf16=False
  (--trl-precision). ponder's default on CPU is float32 (train.precision auto); add a configuration with
  train.precision=mixed for its bf16 products.
Each run is a process of its own, one after the other, with torch at --threads threads; with --rounds, everything
runs that many times in turn and the last table gives the medians over rounds. A step's time is the wall time
between the ends of consecutive steps; a run's figure is the median over --steps steps after --warmup steps.
`others' CPU s / step` is what other processes used of the machine meanwhile (/proc/stat): the cores are shared
with whatever else runs, and a figure taken while others ran is not the trainer's.

  python bench/cpu_step.py                                    # ponder only, its defaults
  python bench/cpu_step.py --trl --rounds 3 --extract default none \
      --configs '' 'train.forward=packed' 'rollout.engine_options.attention=sdpa' 'src=/path/to/other/checkout/src'
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
SHAPE = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]  # eos = pad, and three that never occur
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
CHARS = list(string.digits) + [" ", "\n"] + list("+-*/=().") + [c for c in string.ascii_lowercase if c not in "jqz"]


# ------------------------------------------------------------------------------------------ the workload
def build_world(root: Path, n_prompts: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """A Qwen2 model directory (random weights, 51-token vocabulary) and a JSONL task; returns their paths."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_sym = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIAL + TAGS + [to_sym[ord(c)] for c in CHARS])}
    assert len(vocab) == 51, len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=SPECIAL[0], pad_token=SPECIAL[0], unk_token="<unk>")
    cfg = Qwen2Config(vocab_size=len(vocab), tie_word_embeddings=True, max_position_embeddings=512, rope_theta=10000.0,
                      eos_token_id=0, pad_token_id=0, bos_token_id=None, **SHAPE)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    for layer in model.model.layers:  # Qwen2's q/k/v biases start at zero; make them count
        for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
            p.data.normal_(0, 0.02)
    model.generation_config.eos_token_id = [-1]  # forced length: -1 never matches (bench/rollout.py's force_length)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(seed)
    data = root / "task.jsonl"
    with data.open("w") as f:
        for _ in range(n_prompts):
            a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 9)
            f.write(json.dumps({"prompt": f"what is {a} + {b} * {c}\n<think>", "answer": str(a + b * c)}) + "\n")
    return model_dir, data


def n_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())


class Others:
    """CPU seconds that processes other than this one and its verification workers used while the steps ran
    (/proc/stat, Linux): the two cores are shared with whatever else runs, and a step that waited for them is
    not this trainer's time. Snapshot at each step's end; `per_step` over the timed steps."""

    def __init__(self, pids=lambda: []):
        self.pids, self.marks = pids, []

    @staticmethod
    def _busy() -> float:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def _ours(self) -> float:
        t = os.times()
        own = t.user + t.system
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                own += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                pass
        return own

    def mark(self) -> None:
        if os.path.exists("/proc/stat"):
            self.marks.append(self._busy() - self._ours())

    def per_step(self, first: int) -> float:
        m = self.marks[first:]
        return (m[-1] - m[0]) / max(len(m) - 1, 1) if len(m) > 1 else float("nan")


# ------------------------------------------------------------------------------------------ ponder
def run_ponder(a) -> dict:
    import torch
    import yaml

    from ponder.config import load_config
    from ponder.rl.trainer import GRPOTrainer

    root = Path(a.world)
    reward = {"accuracy": 1.0} if a.extract is None else {"accuracy": {"weight": 1.0, "extract": a.extract}}
    recipe = {
        "name": "cpu-step", "output_dir": str(root / "runs"), "seed": 0,
        "model": {"path": str(root / "model")},
        "data": {"template": "plain", "tasks": [{"name": "jsonl", "path": str(root / "task.jsonl")}]},
        "rollout": {"engine": "fast", "group_size": a.group, "prompts_per_step": a.prompts, "max_new_tokens": a.new,
                    "temperature": 1.0},
        "rewards": reward,
        "algorithm": {"beta": 0.0, "mu": 1},
        "optim": {"lr": 1e-5},
        "train": {"steps": a.warmup + a.steps, "threads": a.threads, "device": "cpu", "save_every": 0},
    }
    path = root / f"recipe-{os.getpid()}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cfg = load_config(path, a.set)  # dotted overrides, as `ponder train RECIPE key=value` takes them
    trainer = GRPOTrainer(cfg)
    sent = _count_worker_items()
    from ponder.rewards import verify_pool

    others = Others(lambda: verify_pool.pool().pids)
    ends, rows = [time.perf_counter()], []
    others.mark()
    for _ in range(a.warmup + a.steps):  # what ponder.train.train runs each step, less the progress bar
        m = trainer.step()
        trainer.metrics.log(trainer.step_no, m)
        trainer.metrics.samples(trainer.step_no, trainer.sample_rows(trainer.last_groups, cfg.train.log_samples))
        ends.append(time.perf_counter())
        others.mark()
        rows.append(m)
    trainer.metrics.close()
    steps = [t1 - t0 for t0, t1 in zip(ends, ends[1:])][a.warmup:]
    timed = rows[a.warmup:]
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    return dict(trainer="ponder", step_s=statistics.median(steps), steps=steps, threads=torch.get_num_threads(),
                other_cpu_s=others.per_step(a.warmup),
                generate_s=med("time/generate"), reward_s=med("time/reward"), train_s=med("time/train"),
                completion_len=med("completion_len/mean"), reward_mean=statistics.mean(r["reward"] for r in timed),
                uniform_groups=statistics.mean(r["zero_var_groups_frac"] for r in timed),
                worker_items_per_step=sent[0] / (a.warmup + a.steps))


def _count_worker_items() -> list[int]:
    """Count the (answer, gold) pairs sent to the verification workers (a wrapper around VerifyPool.map)."""
    from ponder.rewards import verify_pool

    sent, inner = [0], verify_pool.VerifyPool.map

    def counted(self, func, arglist):
        sent[0] += len(arglist)
        return inner(self, func, arglist)

    verify_pool.VerifyPool.map = counted
    return sent


# ------------------------------------------------------------------------------------------ TRL
def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.rewards import accuracy_reward

    torch.set_num_threads(a.threads)
    root = Path(a.world)
    rows = [json.loads(line) for line in (root / "task.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": r["prompt"], "solution": r["answer"]} for r in rows])

    def accuracy(completions, solution, **kw):  # TRL's accuracy reward takes chat messages; ours are plain text
        return accuracy_reward([[{"role": "assistant", "content": c}] for c in completions], solution, **kw)

    ends, others = [], Others()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            others.mark()

    n = a.prompts * a.group
    cfg = GRPOConfig(
        output_dir=str(root / "trl-out"), per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=a.group, generation_batch_size=n, max_completion_length=a.new, temperature=1.0,
        generation_kwargs={"min_new_tokens": a.new}, beta=0.0, num_iterations=1, learning_rate=1e-5,
        lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=a.warmup + a.steps + 1, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, **({"bf16": False} if a.trl_precision == "fp32" else {}), seed=0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tok = AutoTokenizer.from_pretrained(root / "model")
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Clock()])
    trainer.train()
    steps = [t1 - t0 for t0, t1 in zip(ends, ends[1:])][a.warmup:]  # the first step has no start mark: one extra step
    import trl

    return dict(trainer=f"TRL {trl.__version__} {a.trl_precision} (bf16={cfg.bf16})", step_s=statistics.median(steps), steps=steps,
                other_cpu_s=others.per_step(a.warmup),
                threads=torch.get_num_threads())


# ------------------------------------------------------------------------------------------ driver
def child(python: str, which: str, a, extra: list[str], src: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false")
    src = src or str(HERE.parents[1] / "src")
    if which == "ponder":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    argv = [python, str(HERE), f"--child={which}", f"--world={a.world}", f"--threads={a.threads}", f"--steps={a.steps}",
            f"--warmup={a.warmup}", f"--prompts={a.prompts}", f"--group={a.group}", f"--new={a.new}", *extra]
    out = subprocess.run(argv, env=env, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise SystemExit(f"{which} run failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


COLS = [("step s (median)", "step_s", "{:.3f}"), ("generate s", "generate_s", "{:.3f}"), ("reward s", "reward_s", "{:.3f}"),
        ("train s", "train_s", "{:.3f}"), ("uniform groups", "uniform_groups", "{:.2f}"),
        ("sent to workers / step", "worker_items_per_step", "{:.1f}"),
        ("others' CPU s / step", "other_cpu_s", "{:.3f}"), ("x TRL default (same round)", "x_trl_default", "{:.2f}"),
        ("x TRL fp32", "x_trl_fp32", "{:.2f}")]


def table(rows: list[dict]) -> None:
    w = max(len(r["trainer"]) for r in rows)
    print(f"| {'trainer':<{w}} | " + " | ".join(c[0] for c in COLS) + " |")
    print(f"|{'-' * (w + 2)}|" + "|".join("-" * (len(c[0]) + 1) + ":" for c in COLS) + "|")
    for r in rows:
        cells = [(fmt.format(r[k]) if k in r else "").rjust(len(name)) for name, k, fmt in COLS]
        print(f"| {r['trainer']:<{w}} | " + " | ".join(cells) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer on the same workload")
    ap.add_argument("--trl-python", default="/tmp/trlvenv/bin/python", help="python of a venv with torch, trl, math-verify")
    ap.add_argument("--trl-precision", nargs="+", choices=["default", "fp32"], default=["default", "fp32"],
                    help="TRL runs, one per precision: default (GRPOConfig's own: bf16=True, autocast on CPU too) and fp32 "
                         "(bf16=False); the x TRL columns divide by each")
    ap.add_argument("--extract", nargs="+", default=["default"],
                    help="ponder runs, one per accuracy extraction mode: default (the reward's own, tags_or_boxed) "
                         "or none (the whole completion is the answer: every completion is a non-numeric answer)")
    ap.add_argument("--configs", nargs="+", default=[""], metavar="OVERRIDES",
                    help="ponder configurations, each a space-separated list of recipe overrides as `ponder train` takes "
                         "them, and optionally src=DIR (another checkout's src/ to run); '' is this checkout with its "
                         "defaults (e.g. --configs '' 'train.forward=packed' 'src=/tmp/old/src')")
    ap.add_argument("--set", nargs="*", default=[], help=argparse.SUPPRESS)  # (internal) one configuration's overrides
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="run everything this many times, in turn; medians over rounds")
    ap.add_argument("--world", help=argparse.SUPPRESS)  # (internal) the workload's directory
    ap.add_argument("--child", choices=["ponder", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.child:
        if a.child == "ponder":
            a.extract = None if a.extract == ["default"] else a.extract[0]
        a.trl_precision = a.trl_precision[0]
        print(json.dumps(run_ponder(a) if a.child == "ponder" else run_trl(a)), flush=True)
        return
    load0 = os.getloadavg()[0]
    rounds = []
    with tempfile.TemporaryDirectory(prefix="cpu_step_") as tmp:
        a.world = tmp
        build_world(Path(tmp))
        params = n_params(Path(tmp) / "model")
        for i in range(a.rounds):
            rows = []
            for config in a.configs:
                for mode in a.extract:
                    sets = [kv for kv in config.split() if not kv.startswith("src=")]
                    src = next((kv[4:] for kv in config.split() if kv.startswith("src=")), None)
                    r = child(sys.executable, "ponder", a, [f"--extract={mode}", "--set", *sets], src)
                    r["trainer"] += f" (accuracy, extract {mode})" + (f" {config}" if config else "")
                    rows.append(r)
            if a.trl:
                trl = {}
                for precision in a.trl_precision:
                    r = trl[precision] = child(a.trl_python, "trl", a, [f"--trl-precision={precision}"])
                    r["trainer"] += " (accuracy_reward)"
                for r in rows + list(trl.values()):
                    for precision, t in trl.items():
                        r[f"x_trl_{precision}"] = r["step_s"] / t["step_s"]
                rows += trl.values()
            rounds.append(rows)
            print(f"\nround {i + 1} of {a.rounds}:")
            table(rows)
    print(f"\nQwen2 {params / 1e6:.2f}M parameters, vocabulary 51; {a.prompts} prompts x {a.group} samples x {a.new} tokens "
          f"(forced); torch threads {rounds[0][0]['threads']}; each figure the median of {a.steps} steps after {a.warmup} "
          f"warm-up{f', then the median over {a.rounds} rounds' if a.rounds > 1 else ''}; load average {load0:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after (1 min). Target: ponder at most 0.50x TRL's step.")
    if a.rounds > 1:
        table([{"trainer": rows[0]["trainer"], **{k: statistics.median(r[k] for r in rows) for _, k, _ in COLS if k in rows[0]}}
               for rows in zip(*rounds)])
    if a.json:
        Path(a.json).write_text(json.dumps(dict(params=params, workload=vars(a), rounds=rounds), indent=1))


if __name__ == "__main__":
    main()
