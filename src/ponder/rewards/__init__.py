"""Reward functions behind one signature, registered by name and combined with weights.

Contract (DESIGN.md): `fn(completions: list[str], *, prompts: list, **columns) -> list[float | None]`,
one value per completion; None means "does not apply" (it adds nothing to the total and is left out
of the function's logged mean). NaN or inf is refused, naming the function, the value and the example. `columns` holds the examples' fields (`answer`, `task`, metadata),
plus `completion_length` (tokens), `truncated` (bool) and `think_opened` (bool: the prompt's text left a think
block open, as R1-Distill's chat template does) for each completion. Functions ignore
columns they do not use.

A recipe names rewards with a weight, or with options: `rewards: {accuracy: 1.0, format: 0.5}` or
`rewards: {overlong: {weight: 1.0, max_len: 512, buffer: 64}}`.

A reward of one's own is named by where it lives (ponder.plugins): `rewards: {my_pkg.rewards:brevity: 0.5}`
or `{path/to/file.py:brevity: 0.5}` (a relative path is from the working directory). It keeps the
contract above, gets the whole batch in one call (every completion of the step), may be `async def`
(it is awaited), receives its recipe options as keyword arguments, and is logged under the function's
name: `reward/brevity`.

Columns and options share the keyword arguments; a column never changes an option unseen. A built-in names the
columns it reads (`register(name, columns=...)`): its other parameters are options, the recipe's or their defaults.
Of one's own, a parameter with a default other than None is an option: a column of its name, the option not set in
the recipe, is refused at start-up (which one was meant is unknown); one without a default, or None, reads a column,
and so do completion_length, truncated and think_opened whatever their default (ponder passes them always).
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import numbers
from math import isfinite  # (a plain `import math` would be shadowed by the submodule ponder.rewards.math)
from typing import Any, Callable

from ponder.errors import UserError
from ponder.plugins import raised

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}


def register(name: str, columns: tuple[str, ...] = ()):
    """Register a reward by name (the built-ins, and one's own in a plugin). `columns`: the parameters it reads from
    the examples whatever their defaults; a built-in's other parameters are options, set by the recipe alone (a column
    of the same name never reaches them), one's own follow the rule for one's own (module docstring)."""
    def deco(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        fn.reads_columns = frozenset(columns)
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
    if ":" in name:  # the user's own: module:fn or file.py:fn
        from ponder.plugins import load_function

        return load_function(name, "reward")
    _import_builtin()
    if name not in REWARDS:
        close = difflib.get_close_matches(name, list(REWARDS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known rewards: {', '.join(sorted(REWARDS))}"
        raise UserError(f"unknown reward '{name}'{hint}")
    return REWARDS[name]


# The columns ponder itself passes for each completion (score()'s callers always do): columns, whatever a reward's
# defaults; `truncated=False` is the value when called without them, not an option that a column could take unseen.
PER_COMPLETION = ("completion_length", "truncated", "think_opened")


MAX_WEIGHT = 1e6  # a reward's weight, in size
MAX_VALUE = 1e6  # a reward's value, in size: weighted, at most 1e12, whose square float32 holds (advantages, the std)


class RewardSet:
    """The weighted rewards of a run. Calling it scores a batch: (totals, {name: values})."""

    def __init__(self, spec: dict[str, Any]):
        self.fns: dict[str, RewardFn] = {}
        self.weights: dict[str, float] = {}
        self.options: dict[str, dict] = {}  # recipe options win over example columns of the same name
        self.refs: dict[str, str] = {}  # logged name -> the name in the recipe (module:fn for one's own)
        self.option_params: dict[str, dict[str, Any]] = {}  # name -> {option parameter: its default}
        from ponder.config import number_text  # (here: verification workers import this package, not the config)

        for ref, value in spec.items():
            opts = dict(value) if isinstance(value, dict) else {"weight": value}
            weight = number_text(opts.pop("weight", 1.0))  # `rewards` holds any values: the config converts none of them
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not isfinite(weight):
                raise UserError(f"config rewards.{ref}: weight must be a finite number, got {weight!r}")
            if abs(weight) > MAX_WEIGHT:  # 1e160 overflowed the advantages: every update skipped, the lr blamed
                raise UserError(f"config rewards.{ref}: weight must be at most {MAX_WEIGHT:g} in size (larger ones "
                                f"overflow the advantages), got {weight:g}")
            name = str(ref).rpartition(":")[2]  # logged as reward/<name>: a function of one's own by its name
            if name in self.fns:
                raise UserError(f"rewards '{self.refs[name]}' and '{ref}' would both be logged as reward/{name}; rename one function")
            self.fns[name] = get_reward(str(ref))
            _check_options(self.fns[name], str(ref), opts)
            self.option_params[name] = _option_params(self.fns[name])
            self.options[name] = opts
            self.weights[name] = float(weight)
            self.refs[name] = str(ref)

    def score(self, completions: list[str], prompts: list, columns: dict[str, list]):
        per_fn: dict[str, list[float | None]] = {}
        for name, fn in self.fns.items():
            ref = self.refs[name]
            passed = self._passed_columns(name, columns)
            kwargs = {**{k: v for k, v in columns.items() if k in passed}, **self.options[name]}
            try:
                inspect.signature(fn).bind(completions, prompts=prompts, **kwargs)
            except TypeError as e:
                raise UserError(f"reward '{ref}' could not be called with the reward contract: {e}") from None
            except ValueError:  # no signature to read (a builtin): the call itself tells
                pass
            try:
                values = _resolve(fn(completions, prompts=prompts, **kwargs))
            except Exception as e:
                if _is_builtin(fn):  # a built-in reward's failure is ponder's bug: its traceback is for us
                    raise
                raise UserError(_failure(ref, e)) from None
            if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
                raise UserError(f"reward '{ref}' returned {type(values).__name__} {str(values)[:40]!r}; "
                                "it must return a list with one number (or None) per completion")
            values = list(values)
            if len(values) != len(completions):
                raise UserError(f"reward '{ref}' returned {len(values)} value{'s' * (len(values) != 1)} for {len(completions)} completions; "
                                "it must return one value per completion")
            for i, v in enumerate(values):
                if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                    raise UserError(f"reward '{ref}' returned {v!r}; values must be numbers or None")
                # NaN would poison the group's advantages, inf every update; past MAX_VALUE the float32 advantages
                # overflowed (1e39; squared in the std, 1e20), every update was skipped and the guardrail blamed the lr
                if v is not None and not (isfinite(v) and abs(v) <= MAX_VALUE):
                    answer = columns.get("answer", [None] * len(values))[i]
                    raise UserError(f"reward '{ref}' returned {float(v):g} for completion {i + 1} of the batch (prompt "
                                    f"{prompts[i]!r:.60}, answer {answer!r:.30}); a reward must be a finite number of at "
                                    f"most {MAX_VALUE:g} in size, or None where it does not apply")
            per_fn[name] = [None if v is None else float(v) for v in values]
        totals = [sum(self.weights[n] * per_fn[n][i] for n in per_fn if per_fn[n][i] is not None) for i in range(len(completions))]
        return totals, per_fn

    def check(self, example: dict, completion: str = "<think>x</think> <answer>0</answer>") -> None:
        """Call every function once on a real example so contract errors show before training starts:
        two completions (a wrong one and the gold answer), so a wrong length shows too."""
        completions = [completion, f"<think>x</think> <answer>{example.get('answer', 0)}</answer>"]
        columns = {k: [v, v] for k, v in example.items() if k != "prompt"}
        self.check_columns(columns)
        columns.update(completion_length=[len(c) for c in completions], truncated=[False, False], think_opened=[False, False])
        self.score(completions, [example["prompt"]] * 2, columns)

    def check_columns(self, names) -> None:
        """Refuse, before training, a data column that would change a reward's options unseen (`names`: the columns of
        every example, when the trainer has them all; check() looks at the first example's)."""
        for key in ("completions", "prompts"):
            if key in names:
                raise UserError(f"the data's column '{key}' has the name of the reward contract's own argument; rename the column")
        for name in self.fns:
            self._passed_columns(name, names)

    def _passed_columns(self, name: str, names) -> set[str]:
        """The columns passed to a reward: not those named like its options. A built-in's options are the recipe's or
        their defaults; a column named like an option of one's own is refused, since which was meant is unknown."""
        clash = [k for k in self.option_params[name] if k in names and k not in self.options[name] and k not in PER_COMPLETION]
        ref = self.refs[name]
        if clash and not _is_builtin(self.fns[name]):
            p, default, w = clash[0], self.option_params[name][clash[0]], self.weights[name]
            raise UserError(f"reward '{ref}': its option '{p}' (default {default!r}) has the name of a column of the data, "
                            f"whose values would take its place; set it under the reward (recipe: rewards: {{{ref}: {{weight: "
                            f"{w}, {p}: <value>}}}}; command line: rewards.{ref}.{p}=<value>), or rename the parameter (one "
                            "without a default, or with None, reads the column)")
        return set(names) - set(clash)


def _is_builtin(fn) -> bool:
    """One of ponder's own rewards (they declare the columns they read), not one a user wrote, whether named by
    module:function or registered by name (register() is public: plugins use it too)."""
    return getattr(fn, "__module__", "").startswith("ponder.rewards.")


def _option_params(fn) -> dict[str, Any]:
    """A reward's options, by their defaults, less the columns it declares it reads (register(columns=...)): a
    built-in's other parameters; one's own, those with a default other than None (`answer=None`, like one without a
    default, reads a column)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p for p in params if p.kind in kinds and p.name not in ("completions", "prompts")]
    named = [p for p in named if p.name not in getattr(fn, "reads_columns", ())]
    if _is_builtin(fn):
        return {p.name: p.default for p in named}
    return {p.name: p.default for p in named if p.default is not p.empty and p.default is not None}


def _named_options(fn) -> set[str] | None:
    """The keyword parameters a reward takes by name (options and the columns it reads), or None if unknown."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in params if p.kind in kinds} - {"completions", "prompts"}


def _check_options(fn, ref: str, opts: dict) -> None:
    """A recipe option must be a parameter of the function: one that `**columns` would swallow is a typo. A column
    the reward declares it reads is no option (overlong's completion_length given one was an int where the
    trainer's list goes: a traceback inside the reward), unless it has a default of its own (language's target)."""
    named = _named_options(fn)
    if named is None:
        return
    defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()}
    columns = {c for c in getattr(fn, "reads_columns", ()) if defaults.get(c, None) in (None, inspect.Parameter.empty)}
    named -= columns
    for key in opts:
        if key in columns:
            raise UserError(f"config rewards.{ref}: '{key}' is a column the reward reads from each example, not an "
                            "option; remove it from the recipe")
        if key not in named:
            close = difflib.get_close_matches(key, sorted(named), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"config rewards.{ref}: the reward has no option '{key}'; {hint}its options: "
                            f"{', '.join(sorted(named)) or 'none'} (and weight)")


def _failure(ref: str, e: Exception) -> str:
    """One line for an exception raised inside a reward of one's own. (A column can no longer take an option's place
    unseen, the cause this line once named: RewardSet refuses such a clash before the call.)"""
    return raised("reward", ref, e)


def _resolve(values):
    """The values of an async reward, awaited (in a thread of its own if an event loop already runs here)."""
    if not inspect.isawaitable(values):
        return values

    async def wait():
        return await values

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()
