"""Reward functions behind one signature, registered by name and combined with weights.

Contract (DESIGN.md): `fn(completions: list[str], *, prompts: list, **columns) -> list[float | None]`,
one value per completion; None means "does not apply" (it adds nothing to the total and is left out
of the function's logged mean). `columns` holds the examples' fields (`answer`, `task`, metadata),
plus `completion_length` (tokens) and `truncated` (bool) for each completion. Functions ignore
columns they do not use.

A recipe names rewards with a weight, or with options: `rewards: {accuracy: 1.0, format: 0.5}` or
`rewards: {overlong: {weight: 1.0, max_len: 512, buffer: 64}}`.
"""

from __future__ import annotations

import difflib
from math import isnan  # (a plain `import math` would be shadowed by the submodule ponder.rewards.math)
from typing import Any, Callable

from ponder.errors import UserError

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}


def register(name: str):
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return deco


def _import_builtin() -> None:
    import importlib

    for mod in ("basic", "math", "format", "language", "length", "repetition", "code"):
        try:
            importlib.import_module(f"ponder.rewards.{mod}")
        except ModuleNotFoundError as e:
            if e.name == f"ponder.rewards.{mod}" or not (e.name or "").startswith("ponder"):
                continue
            raise


def get_reward(name: str) -> RewardFn:
    _import_builtin()
    if name not in REWARDS:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known rewards: {', '.join(sorted(REWARDS))}"
        raise UserError(f"unknown reward '{name}'{hint}")
    return REWARDS[name]


class RewardSet:
    """The weighted rewards of a run. Calling it scores a batch: (totals, {name: values})."""

    def __init__(self, spec: dict[str, Any]):
        self.fns: dict[str, RewardFn] = {}
        self.weights: dict[str, float] = {}
        self.options: dict[str, dict] = {}  # recipe options win over example columns of the same name
        for name, value in spec.items():
            opts = dict(value) if isinstance(value, dict) else {"weight": value}
            weight = opts.pop("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise UserError(f"config rewards.{name}: weight must be a number, got {weight!r}")
            self.fns[name] = get_reward(name)
            self.options[name] = opts
            self.weights[name] = float(weight)

    def score(self, completions: list[str], prompts: list, columns: dict[str, list]):
        per_fn: dict[str, list[float | None]] = {}
        for name, fn in self.fns.items():
            try:
                values = fn(completions, prompts=prompts, **{**columns, **self.options[name]})
            except TypeError as e:
                raise UserError(f"reward '{name}' could not be called with the reward contract: {e}") from None
            values = list(values) if values is not None else None
            if values is None or len(values) != len(completions):
                got = "None" if values is None else f"{len(values)} values"
                raise UserError(f"reward '{name}' returned {got} for {len(completions)} completions; it must return one value per completion")
            for v in values:
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise UserError(f"reward '{name}' returned {v!r}; values must be numbers or None")
            per_fn[name] = [None if v is None else float(v) for v in values]
        totals = [
            sum(self.weights[n] * per_fn[n][i] for n in per_fn if per_fn[n][i] is not None and not isnan(per_fn[n][i]))
            for i in range(len(completions))
        ]
        return totals, per_fn

    def check(self, example: dict, completion: str = "<think>x</think> <answer>0</answer>") -> None:
        """Call every function once on a real example so contract errors show before training starts."""
        columns = {k: [v] for k, v in example.items() if k != "prompt"}
        columns.update(completion_length=[len(completion)], truncated=[False])
        self.score([completion], [example["prompt"]], columns)
