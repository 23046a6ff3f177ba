"""Mutation check: does some test fail when a property of the trainer breaks?

Each mutant is a one-line breakage of ponder's source, applied to a temporary copy of `src/`; the trainer's
tests then run against that copy (PYTHONPATH first). A mutant that no test catches is a property the
suite does not guard. Prints one line per mutant (caught by which test, or SURVIVED) and exits 1 if any
survived. About a minute a mutant on two cores.

  python bench/mutants.py                 # all
  python bench/mutants.py --only bnpo     # the mutants whose name contains "bnpo"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_losses.py", "tests/test_advantages.py", "tests/test_grpo_smoke.py", "tests/test_logprobs.py",
         "tests/test_distributed.py", "tests/test_packed_forward.py"]

# (name, file under src/ponder, the line as it is (stripped), the broken line)
MUTANTS = [
    ("grpo normaliser: sequence length ignored", "rl/losses.py",
     "return [1.0 / (max(l, 1) * n_all) for l in lengths]", "return [1.0 / n_all for l in lengths]"),
    ("dapo normaliser: this micro-batch's tokens", "rl/losses.py",
     "return [1.0 / max(tokens_total or sum(lengths), 1)] * n", "return [1.0 / max(sum(lengths), 1)] * n"),
    ("dr_grpo normaliser: sequences only", "rl/losses.py",
     "return [1.0 / (n_all * max_new_tokens)] * n", "return [1.0 / n_all] * n"),
    ("bnpo normaliser: rows, not tokens", "rl/losses.py",
     "return [[1.0 / (max(sum(ls), 1) * k)] * len(ls) for ls in micro_lengths]",
     "return [[1.0 / (max(len(ls), 1) * k)] * len(ls) for ls in micro_lengths]"),
    ("bnpo normaliser across ranks: this rank's micro-batches", "rl/losses.py",
     "k = len(micro_lengths) * world", "k = len(micro_lengths)"),
    ("normalisers across ranks: this rank's counts", "rl/trainer.py",
     "n_total=distributed.sum_all(len(lengths)), tokens_total=distributed.sum_all(sum(lengths)))",
     "n_total=len(lengths), tokens_total=sum(lengths))"),
    ("every micro-batch normalised by itself", "rl/trainer.py", 'if a.loss_agg == "bnpo":', "if True:"),
    ("clip: symmetric at eps_low", "rl/losses.py",
     "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a  # clip-higher: eps_high may exceed eps_low",
     "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_low) * a"),
    ("clip: off", "rl/losses.py",
     "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a  # clip-higher: eps_high may exceed eps_low",
     "clipped = ratio * a"),
    ("k3: sign of the log-ratio", "rl/losses.py", "d = ref_logp - logp", "d = logp - ref_logp"),
    ("k3: not in the loss", "rl/losses.py", "token_loss = token_loss + beta * kl", "token_loss = token_loss"),
    ("old log-probs ignored", "rl/trainer.py",
     "old = pad_rows([s.old_logp for s in mb], width, self.device) if mb[0].old_logp is not None else logp.detach()",
     "old = logp.detach()"),
    ("reference never reset", "rl/trainer.py", "if self.ref is not None and n and self.step_no % n == 0:", "if False:"),
    ("advantages: std scaling dropped", "rl/advantages.py",
     "out = centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + EPS)", "out = centred"),
    ("advantages: batch mean as baseline", "rl/advantages.py",
     "centred = torch.where(uniform, 0.0, rewards - rewards.mean(dim=1, keepdim=True))",
     "centred = torch.where(uniform, 0.0, rewards - rewards.mean())"),
    ("truncation not masked", "rl/trainer.py",
     "samples = [s for s in samples if not s.truncated]", "samples = samples"),
    ("training log-probs at temperature 1", "rl/trainer.py",
     "logp, entropy, mask = self.policy_pass.logprobs(self.model, mb, with_entropy=True, temperature=self._temp)",
     "logp, entropy, mask = self.policy_pass.logprobs(self.model, mb, with_entropy=True)"),
    ("gradient clipping off", "rl/trainer.py",
     'grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))',
     'grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))'),
    ("gradients not summed across ranks", "distributed.py",
     "dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)", "pass"),
]


def apply(src: Path, rel: str, old: str, new: str) -> None:
    path = src / "ponder" / rel
    lines = path.read_text().splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.strip() == old]
    if len(hits) != 1:
        raise SystemExit(f"mutant out of date: {len(hits)} lines of {rel} read {old!r}; update bench/mutants.py")
    i = hits[0]
    indent = re.match(r"\s*", lines[i]).group(0)
    lines[i] = indent + new + "\n"
    path.write_text("".join(lines))


def run(src: Path, tests: list[str], timeout: int) -> str | None:
    """The first failing test's id, or None if all pass."""
    env = dict(os.environ, PYTHONPATH=str(src))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *tests]
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout).stdout
    except subprocess.TimeoutExpired:
        return "timeout"
    failed = re.findall(r"^FAILED (\S+)", out, re.M) or re.findall(r"^ERROR (\S+)", out, re.M)
    return failed[0] if failed else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="run the mutants whose name contains this")
    ap.add_argument("--timeout", type=int, default=900)
    a = ap.parse_args()
    chosen = [m for m in MUTANTS if a.only in m[0]]
    survived = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
        check = subprocess.run([sys.executable, "-c", "import ponder; print(ponder.__file__)"], env=dict(
            os.environ, PYTHONPATH=str(src)), capture_output=True, text=True).stdout.strip()
        if not check.startswith(str(src)):
            raise SystemExit(f"the copy is not what Python imports ({check}); install ponder without -e or fix PYTHONPATH")
        for name, rel, old, new in chosen:
            backup = (src / "ponder" / rel).read_text()
            apply(src, rel, old, new)
            caught = run(src, TESTS, a.timeout)
            (src / "ponder" / rel).write_text(backup)
            print(f"{'caught by ' + caught if caught else 'SURVIVED':80} {name}", flush=True)
            if not caught:
                survived.append(name)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutants caught")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
