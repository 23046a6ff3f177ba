"""Mutation check: does some test fail when a property of the trainer breaks?

Each mutant is a one-line breakage of ponder's source, applied to a temporary copy of `src/`; the trainer's
tests then run against that copy (PYTHONPATH first). A mutant that no test catches is a property the
suite does not guard. Prints one line per mutant (caught by which test, or SURVIVED) and exits 1 if any
survived. About a minute a mutant on two cores.

  python bench/mutants.py                 # all
  python bench/mutants.py --only bnpo     # the mutants whose name contains "bnpo"
  python bench/mutants.py --only guardrail  # the guardrails' (each runs only the tests that provoke it)
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

# (name, file under src/ponder, the line as it is (stripped), the broken line[, the tests to run instead of TESTS])
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
     "k = total or len(micro_lengths)", "k = len(micro_lengths)"),
    ("normalisers across ranks: this rank's counts", "rl/trainer.py",
     "n_total=n_total, tokens_total=distributed.sum_all(sum(lengths)))",
     "n_total=len(lengths), tokens_total=sum(lengths))"),
    ("every micro-batch normalised by itself", "rl/trainer.py",
     'if a.loss_agg == "bnpo":  # the mean over every rank\'s micro-batches, however many each has', "if True:"),
    ("clip: symmetric at eps_low", "rl/losses.py",
     "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a  # clip-higher: eps_high may exceed eps_low",
     "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_low) * a"),
    ("clip: off", "rl/losses.py",
     "clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a  # clip-higher: eps_high may exceed eps_low",
     "clipped = ratio * a"),
    ("k3: sign of the log-ratio", "rl/losses.py", "d = ref_logp - logp", "d = logp - ref_logp"),
    ("k3: not in the loss", "rl/losses.py", "token_loss = token_loss + beta * kl", "token_loss = token_loss"),
    ("old log-probs ignored", "rl/trainer.py",
     'old = self._saved(mb, "old_logp", logp)', "old = logp.detach()"),
    ("reference never reset", "rl/trainer.py", "if self.ref is not None and n and self.step_no % n == 0:", "if False:"),
    ("advantages: std scaling dropped", "rl/advantages.py",
     "out = centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + EPS)", "out = centred"),
    ("advantages: batch mean as baseline", "rl/advantages.py",
     "centred = torch.where(uniform, 0.0, rewards - rewards.mean(dim=1, keepdim=True))",
     "centred = torch.where(uniform, 0.0, rewards - rewards.mean())"),
    ("truncation not masked", "rl/trainer.py",
     "minis = [[s for s in mini if not s.truncated] for mini in minis]", "minis = minis"),
    ("training log-probs at temperature 1", "rl/trainer.py",
     "logp, entropy, mask = self.policy_pass.logprobs(self.model, mb, with_entropy=True, temperature=self._temp)",
     "logp, entropy, mask = self.policy_pass.logprobs(self.model, mb, with_entropy=True)"),
    ("gradient clipping off", "rl/trainer.py",
     'torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf")))',
     'torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf")))'),
    # FSDP2 averages the ranks' gradients unless told to sum them (ponder.sharding)
    ("gradients averaged across ranks, not summed", "sharding.py", "m.set_gradient_divide_factor(1.0)", "pass",
     ["tests/test_distributed.py::test_ranks_train_like_one_process_on_the_whole_batch"]),
]
# guardrails (docs/guardrails.md): each breakage runs the tests that provoke that guardrail
G, R = "tests/test_guardrails.py::test_", "tests/test_resume_and_errors.py::test_"
MUTANTS += [
    ("guardrail: entropy collapse never fires", "rl/guardrails.py", "if base and _finite(v) and v < g.fraction * base:",
     "if base and _finite(v) and v < 0 * base:", [G + "a_learning_rate_that_collapses_entropy_lowers_the_rate"]),
    ("guardrail: entropy collapse always fires", "rl/guardrails.py", "if base and _finite(v) and v < g.fraction * base:",
     "if base and _finite(v):", [G + "a_healthy_run_with_every_detector_live_fires_none"]),
    ("guardrail: a spike above its threshold passes", "rl/guardrails.py", "if v > threshold:", "if v > 1e30 * threshold:",
     [G + "a_kl_spike_rolls_back_to_the_last_checkpoint_and_the_run_goes_on"]),
    ("guardrail: spike threshold without its floor", "rl/guardrails.py", "threshold = max(g.factor * med, g.floor)",
     "threshold = g.factor * med", [G + "a_clip_spike_can_stop_the_run_naming_the_figure_and_threshold"]),
    ("guardrail: rollback keeps the weights", "rl/guardrails.py", "trainer.model.load_state_dict(saved.state_dict())", "pass",
     [G + "a_kl_spike_rolls_back_to_the_last_checkpoint_and_the_run_goes_on"]),
    ("guardrail: lower_lr leaves the optimizer's rate", "rl/guardrails.py", 'group["lr"] *= factor', "pass",
     [G + "a_learning_rate_that_collapses_entropy_lowers_the_rate"]),
    ("guardrail: fires at every step its condition holds", "rl/guardrails.py", "if name not in self.active:", "if True:",
     [G + "a_learning_rate_that_collapses_entropy_lowers_the_rate"]),
    ("guardrail: two firings at one step roll back twice", "rl/guardrails.py",
     'elif action in ("lower_lr", "rollback") and self._done_now & {action, "rollback"}:', "elif False:",
     [G + "a_kl_spike_rolls_back_to_the_last_checkpoint_and_the_run_goes_on"]),
    ("guardrail: shares judged on one step", "rl/guardrails.py", "mean, n = h.window_mean(key, v)", "mean, n = v, 1",
     [G + "a_reward_for_length_alone_runs_away_to_the_limit"]),
    ("guardrail: length runaway never fires", "rl/guardrails.py", "threshold = max(g.share, g.factor * base)", "threshold = 2.0",
     [G + "a_reward_for_length_alone_runs_away_to_the_limit"]),
    ("guardrail: reward hacking never fires", "rl/guardrails.py", "if mean >= base + g.rise:", "if mean >= base + g.rise + 1:",
     [G + "a_reward_that_pays_beside_the_task_is_reported_as_hacked"]),
    ("guardrail: reward hacking ignores accuracy", "rl/guardrails.py", "if acc_mean > g.accuracy_ratio * acc_base:", "if False:",
     [G + "a_reward_that_pays_beside_the_task_is_reported_as_hacked"]),
    ("guardrail: repeated lines never seen", "rl/guardrails.py", "return bool(counts) and max(counts.values()) >= min_repeats",
     "return False", [G + "completions_repeating_a_line_are_caught"]),
    ("guardrail: non-finite streak off by one", "rl/guardrails.py", "if s.nan_streak >= g.max_nan_steps:",
     "if s.nan_streak > g.max_nan_steps:", [R + "nan_losses_stop_the_run_and_keep_the_last_checkpoint"]),
    ("guardrail: stop ignored by the run loop", "train.py", "_stop(trainer, main)", "pass",
     [R + "nan_losses_stop_the_run_and_keep_the_last_checkpoint"]),
    ("guardrail: history not restored on resume", "rl/guardrails.py",
     "if not state:  # a checkpoint from before guardrails: the history starts again", "if True:",
     [G + "guardrail_state_survives_a_resume"]),
    ("guardrail: train.max_nan_steps of an older run not moved", "resume.py",
     '_move_key(saved, "train.max_nan_steps", "guardrails.non_finite.max_nan_steps")', "pass",
     [G + "a_run_started_before_guardrails_resumes_with_its_nan_limit_moved"]),
    ("guardrail: firings not marked on the curves", "report.py",
     'ax.axvline(step, color="red", linestyle=":", linewidth=1.2, alpha=0.8, label="guardrail fired" if i == 0 else None)',
     "pass", [G + "the_report_lists_firings_and_marks_them_on_every_curve"]),
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
        for name, rel, old, new, *tests in chosen:
            backup = (src / "ponder" / rel).read_text()
            apply(src, rel, old, new)
            caught = run(src, tests[0] if tests else TESTS, a.timeout)
            (src / "ponder" / rel).write_text(backup)
            print(f"{'caught by ' + caught if caught else 'SURVIVED':80} {name}", flush=True)
            if not caught:
                survived.append(name)
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutants caught")
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
