"""Guardrails: the known ways long RL runs fail, detected from the figures each step already logs, and acted on.

Each detector compares a figure with the run's own history, so that no threshold needs tuning per model: its
early median (the first `guardrails.baseline_steps` steps, before which nothing fires) or its recent median
(the last `guardrails.window` steps). A guardrail fires when its condition starts to hold, not again while
it keeps holding, and takes its action (`guardrails.<name>.action`):

- warn: one line on stderr, the first time only, with the figure and the threshold.
- lower_lr: the learning rate times `guardrails.lr_factor` from the next step on.
- rollback: the weights, optimizer moments and KL reference of the newest checkpoint (written before the
  firing step), and the learning rate times `lr_factor`. The step counter, data position and sampling seeds
  move on, so the run continues on new rollouts instead of replaying the failure. With no checkpoint yet the
  learning rate is lowered only; past `guardrails.max_rollbacks` the run stops instead.
- stop: the step is logged, then the run ends with one line naming the guardrail, the figure, the threshold
  and the checkpoint to resume from (nothing is saved at the failing step).
- off.

Every firing goes to metrics.jsonl (`guardrail/<name>`: 1 and the list `guardrail_events`) and is marked on the
report's curves. Decisions read figures averaged over ranks, so every rank takes the same action.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import Counter, deque
from dataclasses import dataclass

from ponder import checkpoint, distributed, models, sharding
from ponder.config import GuardrailsConfig

WATCHED_PREFIXES = ("reward/",)
WATCHED = ("entropy", "kl", "clip_frac", "truncated_frac", "repeated_line_frac", "unreasoned_frac", "accuracy")
MIN_LINE_CHARS = 5  # shorter lines ("}", "end", a blank) repeat in healthy text and code
EXAMPLE_CHARS = 300


def repeats_a_line(text: str, min_repeats: int) -> bool:
    """True when one line of at least MIN_LINE_CHARS characters occurs `min_repeats` times or more."""
    counts = Counter(s for line in text.splitlines() if len(s := line.strip()) >= MIN_LINE_CHARS)
    return bool(counts) and max(counts.values()) >= min_repeats


def unreasoned(text: str, min_chars: int) -> bool:
    """True when the think block (the text before </think>, or before <answer> where no think block closes)
    has fewer than `min_chars` non-blank characters: an answer given without the work the template asks for."""
    head = text.split("</think>", 1)[0] if "</think>" in text else text.split("<answer>", 1)[0]
    return len("".join(head.replace("<think>", "").split())) < min_chars


def paid_without_work(group, j: int, min_chars: int) -> bool:
    """Completion j of the group scores on accuracy with an empty think block."""
    return (group.per_fn.get("accuracy", [0] * (j + 1))[j] or 0) > 0 and unreasoned(group.texts[j], min_chars)


@dataclass
class Finding:
    """What a detector saw: `figure op threshold` held, `value` being the figure's value."""

    figure: str
    value: float
    op: str
    threshold: float
    why: str  # how the threshold was made, e.g. "0.1 x its early median 1.2"
    example: str | None = None  # a completion showing it

    def describe(self) -> str:
        return f"{self.figure} {self.value:.4g} {self.op} {self.threshold:.4g} ({self.why})"


class History:
    """Per figure: its first `baseline_steps` finite values and its last `window` ones."""

    def __init__(self, baseline_steps: int, window: int):
        self.baseline_steps, self.window = baseline_steps, window
        self.early: dict[str, list[float]] = {}
        self.recent: dict[str, deque] = {}

    def add(self, figures: dict) -> None:
        for key, value in figures.items():
            if _finite(value):
                early = self.early.setdefault(key, [])
                if len(early) < self.baseline_steps:
                    early.append(float(value))
                self.recent.setdefault(key, deque(maxlen=self.window)).append(float(value))

    def baseline(self, key: str) -> float | None:
        early = self.early.get(key, [])
        return statistics.median(early) if len(early) >= self.baseline_steps else None

    def recent_median(self, key: str) -> float | None:
        """The median of the last `window` values, once there are that many. Fewer would be the run's first steps
        (a KL that starts at 0 and climbs to its level: 10x the median of five such steps is the run's normal
        level, and every short demo run with a KL term fired) or the few steps since a rollback."""
        recent = self.recent.get(key, ())
        return statistics.median(recent) if len(recent) >= self.window else None

    def window_mean(self, key: str, now: float) -> tuple[float | None, int]:
        """The mean over the last `window` steps, this one (not yet added) included, and how many steps that is;
        None while there are fewer than min(window, baseline_steps) (after a rollback one step was judged alone)."""
        values = [*self.recent.get(key, ()), now][-self.window:]
        if len(values) < min(self.window, self.baseline_steps):
            return None, len(values)
        return sum(values) / len(values), len(values)

    def forget_recent(self) -> None:
        self.recent = {}


# ---------------------------------------------------------------- detectors: (settings, history, step) -> Finding | None
@dataclass
class StepView:
    figures: dict  # the step's metrics, averaged over ranks
    groups: list  # this rank's groups (for examples)
    nan_streak: int


def entropy_collapse(g, h: History, s: StepView):
    base, v = h.baseline("entropy"), s.figures.get("entropy")
    if base and _finite(v) and v < g.fraction * base:
        return Finding("entropy", v, "<", g.fraction * base, f"{g.fraction:g} x its early median {base:.4g}")


def _spike(g, h: History, key: str, v, figure: str | None = None):
    med = h.recent_median(key)
    if not med or not _finite(v):  # 0: no update has moved the policy yet, so no scale to compare with
        return None
    threshold = max(g.factor * med, g.floor)
    if v > threshold:
        return Finding(figure or key, v, ">", threshold, f"{g.factor:g} x its recent median {med:.4g}, at least {g.floor:g}")


def kl_spike(g, h: History, s: StepView):
    return _spike(g, h, "kl", s.figures.get("kl"))


def clip_spike(g, h: History, s: StepView):
    return _spike(g, h, "clip_frac", _clip_frac(s.figures), "clip_low_frac + clip_high_frac")


def _share_above(g, h: History, key: str, v):
    """A share that stays high: its mean over the last `window` steps (one step of a few dozen samples is noisy)."""
    base = h.baseline(key)
    if base is None or not _finite(v):
        return None
    threshold = max(g.share, g.factor * base)
    mean, n = h.window_mean(key, v)
    if mean is not None and mean > threshold:
        return Finding(key, mean, ">", threshold,
                       f"mean of the last {n} steps; the larger of {g.share:g} and {g.factor:g} x its early median {base:.3g}")


def length_runaway(g, h: History, s: StepView):
    found = _share_above(g, h, "truncated_frac", s.figures.get("truncated_frac"))
    if found:
        found.example = _first(s.groups, lambda g_, j: g_.samples[j].truncated)
    return found


def repetition(g, h: History, s: StepView):
    found = _share_above(g, h, "repeated_line_frac", s.figures.get("repeated_line_frac"))
    if found:
        found.example = _first(s.groups, lambda g_, j: repeats_a_line(g_.texts[j], g.min_repeats))
    return found


def empty_reasoning(g, h: History, s: StepView):
    """Answers that score with an empty think block: the accuracy reward is paid for a guess or a memorised
    answer, and the chain of thought the template asks for withers."""
    found = _share_above(g, h, "unreasoned_frac", s.figures.get("unreasoned_frac"))
    if found:
        found.example = _first(s.groups, lambda g_, j: paid_without_work(g_, j, g.min_chars))
    return found


def reward_hacking(g, h: History, s: StepView):
    """A reward other than accuracy rises while accuracy does not: the policy found a way to be paid without
    solving the task (format kept, work skipped; length; a loophole in a rule)."""
    acc_base, acc = h.baseline("accuracy"), s.figures.get("accuracy")
    if acc_base is None or not _finite(acc):
        return None
    acc_mean, n = h.window_mean("accuracy", acc)
    if acc_mean is None or acc_mean > g.accuracy_ratio * acc_base:
        return None
    for key in sorted(k for k in s.figures if k.startswith("reward/") and k != "reward/accuracy"):
        base, v = h.baseline(key), s.figures[key]
        if base is None or not _finite(v):
            continue
        mean, _ = h.window_mean(key, v)
        if mean is not None and mean >= base + g.rise:
            name = key.split("/", 1)[1]
            why = (f"its early median {base:.3g} + {g.rise:g}, mean of the last {n} steps, while accuracy's mean "
                   f"{acc_mean:.3g} <= {g.accuracy_ratio:g} x its early median {acc_base:.3g}")
            example = _first(s.groups, lambda g_, j: (g_.per_fn[name][j] or 0) > 0 and not (g_.per_fn.get("accuracy", [0] * (j + 1))[j] or 0))
            return Finding(key, mean, ">=", base + g.rise, why, example)
    return None


def non_finite(g, h: History, s: StepView):
    if s.nan_streak >= g.max_nan_steps:
        return Finding("non-finite losses in a row", s.nan_streak, ">=", g.max_nan_steps,
                       "guardrails.non_finite.max_nan_steps; those updates were skipped")


# what to change when a guardrail keeps firing, for its warning and stop lines
FIXES = {
    "entropy_collapse": "a higher algorithm.eps_high (clip-higher), a higher rollout.temperature, a lower optim.lr "
                        "or an entropy bonus (algorithm.entropy_coef=0.001)",
    "kl_spike": "a lower optim.lr or a higher algorithm.beta",
    "clip_spike": "a lower optim.lr or fewer passes (algorithm.mu)",
    "length_runaway": "a higher rollout.max_new_tokens, or the overlong reward (rewards.overlong)",
    "reward_hacking": "a fix of the named reward's rule or a lower weight for it under rewards",
    "repetition": "the overlong reward (rewards.overlong), a lower optim.lr, or algorithm.mask_truncated",
    "empty_reasoning": "a longer or harder task mix, or a lower weight for the accuracy reward beside format",
    "non_finite": "a lower optim.lr, or train.precision=fp32 where it ran in bf16",  # (non-finite rewards are refused)
}

DETECTORS = {"entropy_collapse": entropy_collapse, "kl_spike": kl_spike, "clip_spike": clip_spike,
             "length_runaway": length_runaway, "reward_hacking": reward_hacking, "repetition": repetition,
             "empty_reasoning": empty_reasoning, "non_finite": non_finite}


def example_rows(m: dict) -> list[dict]:
    """samples.jsonl rows for the step's firings that came with an example completion."""
    return [{"guardrail": e["guardrail"], "message": e["message"], "completion": e["example"]}
            for e in m.get("guardrail_events", []) if "example" in e]


# ---------------------------------------------------------------- the per-step check and its actions
class Guardrails:
    def __init__(self, cfg: GuardrailsConfig, announce: bool = True):
        assert set(cfg.guards()) == set(DETECTORS) == set(FIXES), "each guardrail in the config has a detector and a fix"
        self.cfg, self.announce = cfg, announce
        self.history = History(cfg.baseline_steps, cfg.window)
        self.active: set[str] = set()  # conditions that held at the last step: they fire again only once cleared
        self.warned: set[str] = set()
        self.rollbacks = 0
        self.stop_reason: str | None = None

    def check(self, trainer, m: dict) -> dict:
        """Run every detector on the step just taken (`m`: its figures, averaged over ranks) and act on what
        fires. Returns `m` with the firings added."""
        view = StepView(m, trainer.last_groups, trainer.nan_streak)
        events, holding = [], set()
        self._done_now: set[str] = set()  # two guardrails firing at one step roll back or lower the rate once
        for name, g in self.cfg.guards().items():
            found = DETECTORS[name](g, self.history, view) if g.action != "off" else None
            if found is None:
                continue
            holding.add(name)
            if name not in self.active:
                events.append(self._act(trainer, name, g.action, found))
        self.active = holding
        self.history.add({**{k: m.get(k) for k in WATCHED}, "clip_frac": _clip_frac(m),
                          **{k: v for k, v in m.items() if k.startswith(WATCHED_PREFIXES)}})
        if any(e["action"] == "rollback" and e["done"].startswith("restored") for e in events):
            self.history.forget_recent()  # the figures since the checkpoint describe weights that are gone
            self.active = set()
        if not events:
            return m
        return {**m, **{f"guardrail/{e['guardrail']}": 1.0 for e in events}, "guardrail_events": events}

    def _act(self, trainer, name: str, action: str, found: Finding) -> dict:
        step = trainer.step_no
        head = f"guardrail {name} at step {step}: {found.describe()}"
        if action == "rollback" and self.rollbacks >= self.cfg.max_rollbacks:
            action, head = "stop", f"{head}; {self.rollbacks} rollbacks already (guardrails.max_rollbacks)"
        if action == "warn":
            done = "warned"
            if name not in self.warned:
                self._say(f"{head}; warning only (guardrails.{name}.action=warn); if it persists, try {FIXES[name]}")
            self.warned.add(name)
        elif action in ("lower_lr", "rollback") and self._done_now & {action, "rollback"}:
            done = f"{'rolled back' if 'rollback' in self._done_now else 'lr lowered'} already at this step"
        elif action in ("lower_lr", "rollback"):
            if action == "lower_lr":
                done = _scale_lr(trainer, self.cfg.lr_factor)
            else:  # after a lower_lr of this step, the weights only: the rate is lowered once a step
                done = self._rollback(trainer, lower="lower_lr" not in self._done_now)
            self._done_now.add(action)
            self._say(f"{head}; {done}")
        else:
            last = checkpoint.latest(trainer.ckpt_dir)
            fix = FIXES[name]
            where = (f"the last good checkpoint is {last} (continue it with --resume and --allow-changes, e.g. with {fix})"
                     if last else f"no checkpoint was written before it; start again, e.g. with {fix}")
            done = "stopped"
            self.stop_reason = f"{head}; {where}"
        if name == "non_finite" and action != "stop":
            trainer.nan_streak = 0  # counting starts again, so a later streak fires again
        event = {"guardrail": name, "step": step, "figure": found.figure, "value": found.value, "op": found.op,
                 "threshold": found.threshold, "action": action, "done": done, "message": f"{head}; {done}"}
        if found.example is not None:
            event["example"] = found.example[:EXAMPLE_CHARS]
        return event

    def _rollback(self, trainer, lower: bool = True) -> str:
        distributed.barrier()  # rank 0 may still be writing the checkpoint
        last = checkpoint.latest(trainer.ckpt_dir)
        self.rollbacks += 1  # with no checkpoint too: else a run without saves lowered its rate without end
        rate = _scale_lr(trainer, self.cfg.lr_factor) if lower else "lr lowered already at this step"
        if last is None:
            return f"no checkpoint yet to restore (rollback {self.rollbacks} of at most {self.cfg.max_rollbacks}); {rate}"
        restore(trainer, last)
        return f"restored {last.name} (rollback {self.rollbacks} of at most {self.cfg.max_rollbacks}); {rate}"

    def _say(self, line: str) -> None:
        if self.announce:
            print(f"ponder: {line}", file=sys.stderr, flush=True)

    def state_dict(self) -> dict:
        return {"early": self.history.early, "recent": {k: list(v) for k, v in self.history.recent.items()},
                "active": sorted(self.active), "warned": sorted(self.warned), "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:  # a checkpoint from before guardrails: the history starts again
            return
        self.history.early = {k: list(v) for k, v in state["early"].items()}
        self.history.recent = {k: deque(v, maxlen=self.cfg.window) for k, v in state["recent"].items()}
        self.active, self.warned, self.rollbacks = set(state["active"]), set(state["warned"]), state["rollbacks"]


def restore(trainer, ckpt) -> None:
    """The weights, optimizer moments and KL reference of checkpoint `ckpt`, in place (the engine's rollout
    copy follows the weights by itself); the learning rate and schedule position stay as they are."""
    state = checkpoint.load_state(ckpt)
    lrs = [group["lr"] for group in trainer.optimizer.param_groups]
    if (ckpt / sharding.SHARDED_DIR).is_dir():  # weights and optimizer from the shards (every rank reads its own)
        checkpoint.load_model_and_optimizer(trainer, state, ckpt)
    else:
        if trainer.cfg.model.lora is not None:
            trainer.model.load_state_dict(state["adapter"], strict=False)
        else:
            models.load_weights_into(trainer.model, ckpt)
        trainer.optimizer.load_state_dict(state["optimizer"])
    for group, lr in zip(trainer.optimizer.param_groups, lrs):
        group["lr"] = lr
    if trainer.ref is not None and state.get("ref") is not None:
        sharding.load_full_state(trainer.ref, state["ref"])
    trainer.nan_streak = 0


def _scale_lr(trainer, factor: float) -> str:
    """Multiply the learning rate by `factor` for the rest of the run (the schedule's base too)."""
    old = trainer.optimizer.param_groups[0]["lr"]
    for group in trainer.optimizer.param_groups:
        group["lr"] *= factor
    trainer.scheduler.base_lrs = [lr * factor for lr in trainer.scheduler.base_lrs]
    return f"lr {old:.3g} -> {old * factor:.3g}"


def _clip_frac(m: dict):
    low, high = m.get("clip_low_frac"), m.get("clip_high_frac")
    return low + high if _finite(low) and _finite(high) else None


def _first(groups, pick) -> str | None:
    for g in groups:
        for j, text in enumerate(g.texts):
            if pick(g, j):
                return text
    return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
