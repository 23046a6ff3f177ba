"""Tasks: where examples come from and how an answer to them is verified.

An example is a dict with `prompt` (string or chat messages), `answer` (string; may be absent for open
tasks), `task` (the task's name) and any metadata columns. A task knows how to make or load its
examples and how to verify an extracted answer against one of them; the `accuracy` reward and
`ponder eval` both call `verify`, so training and evaluation agree by construction.
"""

from __future__ import annotations

import difflib
import random

from ponder.errors import UserError


class Task:
    """Base class. Subclasses set `name` and implement `load` (and usually `verify`)."""

    name: str = ""

    def load(self, split: str = "train", n: int | None = None, seed: int = 0, **options) -> list[dict]:
        raise NotImplementedError

    def verify(self, answer: str, example: dict) -> float | None:
        """Score an extracted answer in [0, 1]; None when the example cannot be scored (e.g. bad gold)."""
        from ponder.rewards.match import answers_match

        return answers_match(answer, example.get("answer"))


TASKS: dict[str, Task] = {}


def register(task_cls: type[Task]) -> type[Task]:
    TASKS[task_cls.name] = task_cls()
    return task_cls


def _import_builtin() -> None:
    # Importing the modules registers their tasks; optional ones may be missing their libraries.
    import importlib

    for mod in ("smoke", "jsonl", "arithmetic", "countdown", "gym", "humaneval", "code_jsonl", "math_formats"):
        try:
            importlib.import_module(f"ponder.tasks.{mod}")
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith("ponder.tasks"):
                continue  # an optional dependency is missing; the task stays unregistered
            if e.name != f"ponder.tasks.{mod}":
                raise


def get_task(name: str) -> Task:
    if name not in TASKS:  # a built-in module not imported yet
        _import_builtin()
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known tasks: {', '.join(sorted(TASKS))}"
        raise UserError(f"unknown task '{name}'{hint}")
    return TASKS[name]


def load_examples(spec, seed: int = 0) -> list[dict]:
    """Examples for one TaskSpec, each tagged with its task name."""
    task = get_task(spec.name)
    opts = dict(spec.options)
    if spec.path is not None:
        opts["path"] = spec.path
    rows = task.load(split=spec.split, n=spec.n, seed=seed, **opts)
    if not rows:
        raise UserError(f"task '{spec.name}' gave no examples for split '{spec.split}'; check its path and options")
    for row in rows:
        row.setdefault("task", task.name)
    return rows


def verify(example: dict, answer: str) -> float | None:
    return get_task(example.get("task", "")).verify(answer, example)


class PromptSampler:
    """Endless, seeded stream of examples: a fresh permutation each epoch, resumable by position."""

    def __init__(self, examples: list[dict], seed: int):
        self.examples, self.seed, self.position = examples, seed, 0
        self._epoch, self._order = -1, []

    def _order_for(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
        return self._order

    def next(self, k: int) -> list[dict]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, len(self.examples))
            out.append(self.examples[self._order_for(epoch)[i]])
            self.position += 1
        return out


def mix(specs, seed: int) -> list[dict]:
    """Load several TaskSpecs into one list, repeating each task's examples by its integer weight."""
    rows: list[dict] = []
    for spec in specs:
        ex = load_examples(spec, seed)
        rows += ex * max(1, round(spec.weight))
    return rows
