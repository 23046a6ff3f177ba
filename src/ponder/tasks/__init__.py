"""Tasks: where examples come from and how an answer to them is verified.

An example is a dict with `prompt` (string or chat messages), `answer` (string; may be absent for open
tasks), `task` (the task's name) and any metadata columns. A task knows how to make or load its
examples and how to verify an extracted answer against one of them; the `accuracy` reward and
`ponder eval` both call `verify`, so training and evaluation agree by construction.

A task's options are the keyword arguments of its `load` (besides split, n, seed): `load_examples`
refuses any other with a did-you-mean. A `**config` catch-all (any name but `_`) takes any option.

Custom tasks: `data.tasks: [{name: my_pkg.tasks:make, n: 100, options: {...}}]` (or `path/to/file.py:make`)
calls `make(split=..., n=..., seed=..., **options)` (declare only the arguments you use) and takes the
examples it returns or yields: dicts with `prompt` and usually `answer`, verified by mathematical
equivalence like the `jsonl` task.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import inspect
import json
import random
from itertools import islice

from ponder.errors import UserError
from ponder.plugins import raised


# how the command being run names its tasks, for the fix an error line gives: a recipe's list (data.tasks, or a sample
# recipe's tasks) or the flags of ponder eval and ponder sample (--tasks NAME:PATH, --option KEY=VALUE)
_NAMED_BY = contextvars.ContextVar("tasks_named_by", default="data.tasks")


@contextlib.contextmanager
def tasks_named_by(how: str):
    """Within: task errors name `how`, a recipe key ("tasks") or "flags"."""
    token = _NAMED_BY.set(how)
    try:
        yield
    finally:
        _NAMED_BY.reset(token)


def path_fix(task: str, example: str = "my.jsonl") -> str:
    """How to give `task` its file, in the words of the command being run."""
    how = _NAMED_BY.get()
    return f"--tasks {task}:{example}" if how == "flags" else f"{how}: [{{name: {task}, path: {example}}}]"


def option_fix(task: str, key: str) -> str:
    """How to give `task` its option `key`, in the words of the command being run."""
    how = _NAMED_BY.get()
    if how == "flags":
        return f"give it with --option {key}=..."
    return f"give it in the recipe, {how}: [{{name: '{task}', options: {{{key}: ...}}}}]"


def setting(part: str) -> str:
    """Where a task's `path` or `options` (or `options.KEY`) is set, in the words of the command being run."""
    how = _NAMED_BY.get()
    if how != "flags":
        return f"{how}[].{part}"
    if part == "path":
        return "the PATH of --tasks NAME:PATH"
    return f"--option {part.partition('.')[2] or 'KEY'}=..."


class Task:
    """Base class. Subclasses set `name` and implement `load` (and usually `verify`)."""

    name: str = ""

    def load(self, split: str = "train", n: int | None = None, seed: int = 0, **options) -> list[dict]:
        raise NotImplementedError

    def verify(self, answer: str, example: dict) -> float | None:
        """Score an extracted answer in [0, 1]; None when the example cannot be scored (e.g. bad gold)."""
        from ponder.rewards.match import answers_match

        return answers_match(answer, example.get("answer"))

    def options(self) -> tuple[list[str], bool]:
        """(the option names `load` takes, whether it takes any other through a `**config` catch-all)."""
        return _keyword_names(self.load)


def prompt_key(example: dict) -> str:
    """An example's prompt (text or chat messages) as one comparable string: the same question, the same key."""
    return json.dumps(example["prompt"], sort_keys=True, ensure_ascii=False)


def difficulty_names(task: str, difficulty, levels) -> list[str]:
    """The levels a `difficulty` option names: one, a non-empty list of them, or "mixed" (all); else one line (an
    empty list or a mapping failed in the draw, a traceback)."""
    names = list(levels) if difficulty == "mixed" else difficulty if isinstance(difficulty, list) else [difficulty]
    if not names:
        raise UserError(f"task '{task}': difficulty is an empty list; name one of: {', '.join(levels)}, mixed")
    for name in names:
        if not isinstance(name, str) or name not in levels:
            raise UserError(f"task '{task}': unknown difficulty {name!r}; choose one of: {', '.join(levels)}, mixed")
    return names


def whole_number(task: str, key: str, value, least: int | None = None) -> int:
    """An option that must be a whole number, of at least `least` where given (a float or a text one failed in the
    draw, a traceback)."""
    if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
        bound = f" of at least {least}" if least is not None else ""
        raise UserError(f"task '{task}': {key} must be a whole number{bound}, got {value!r}")
    return value


def answer_text(value) -> str:
    """A gold answer as the rewards read it: a list (an answer of several parts) joined by ", " (its Python repr,
    "['a', 'b']", matched no answer), anything else as str; an object has no answer text (its repr was taken for one)."""
    if isinstance(value, (list, tuple)):
        return ", ".join(answer_text(v) for v in value)
    if isinstance(value, dict):
        raise UserError(f"an answer must be text, a number or a list of them, got an object {str(value)[:60]!r}")
    return str(value)


def _keyword_names(fn) -> tuple[list[str], bool]:
    params = inspect.signature(fn).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
             and p.name not in ("self", "split", "n", "seed")]
    return names, any(p.kind is p.VAR_KEYWORD and p.name != "_" for p in params)


class FunctionTask(Task):
    """A task of the user's own: a function (`module:fn`, `file.py:fn`) that returns or yields examples."""

    def __init__(self, name: str):
        from ponder.plugins import load_function

        self.name, self.fn = name, load_function(name, "task")

    def options(self):
        return _keyword_names(self.fn)

    def load(self, split="train", n=None, seed=0, **options):
        sig = inspect.signature(self.fn).parameters
        takes_all = any(p.kind is p.VAR_KEYWORD for p in sig.values())
        kwargs = {k: v for k, v in dict(split=split, n=n, seed=seed).items() if k in sig or takes_all} | options
        missing = [p.name for p in sig.values() if p.default is p.empty and p.name not in kwargs
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise UserError(f"task '{self.name}' needs option '{missing[0]}': {option_fix(self.name, missing[0])}")
        try:  # the function runs, or its generator yields, inside the loop too
            return self._rows(self.fn(**kwargs), n)
        except UserError:
            raise
        except Exception as e:  # the user's function failed: one line saying where, as for a reward of one's own
            raise UserError(raised("task", self.name, e)) from None

    def _rows(self, examples, n) -> list[dict]:
        rows = []
        for i, row in enumerate(islice(examples or (), n), 1):
            if not isinstance(row, dict) or "prompt" not in row:
                raise UserError(f"task '{self.name}': example {i} is {type(row).__name__} {str(row)[:60]!r}; "
                                "each example must be a dict with a 'prompt' (and usually an 'answer')")
            prompt = row["prompt"]
            if prompt is None or not (prompt.strip() if isinstance(prompt, str) else prompt):  # (chat messages: a list)
                raise UserError(f"task '{self.name}': example {i} has an empty prompt ({prompt!r}); every example needs one")
            if "answer" in row:
                if row["answer"] is None or not answer_text(row["answer"]).strip():
                    raise UserError(f"task '{self.name}': example {i} has an empty answer ({row['answer']!r}); give it one or leave the key out")
                row = {**row, "answer": answer_text(row["answer"])}
            rows.append({**row, "task": self.name})
        return rows


TASKS: dict[str, Task] = {}


def register(task_cls: type[Task]) -> type[Task]:
    TASKS[task_cls.name] = task_cls()
    return task_cls


def _import_builtin() -> None:
    # Importing the modules registers their tasks; optional ones may be missing their libraries.
    import importlib

    for mod in ("smoke", "jsonl", "arithmetic", "bilingual", "countdown", "gym", "humaneval", "code_jsonl", "math_formats", "hf"):
        try:
            importlib.import_module(f"ponder.tasks.{mod}")
        except ModuleNotFoundError as e:
            if not e.name or not e.name.startswith("ponder.tasks"):
                continue  # an optional dependency is missing; the task stays unregistered
            if e.name != f"ponder.tasks.{mod}":
                raise


def get_task(name: str) -> Task:
    if name not in TASKS and ":" in name:  # the user's own: module:fn or file.py:fn
        TASKS[name] = FunctionTask(name)
    if name not in TASKS:  # a built-in module not imported yet
        _import_builtin()
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known tasks: {', '.join(sorted(TASKS))}"
        raise UserError(f"unknown task '{name}'{hint}")
    return TASKS[name]


def load_examples(spec, seed: int = 0, say_short: bool = True) -> list[dict]:
    """Examples for one TaskSpec, each tagged with its task name. Fewer than its n (a file of fewer rows) are all
    taken, with a line saying so (`say_short`)."""
    task = get_task(spec.name)
    opts = dict(spec.options)
    if spec.path is not None:
        opts["path"] = spec.path
    check_options(task, opts)
    rows = task.load(split=spec.split, n=spec.n, seed=seed, **opts)
    if not rows:
        raise UserError(f"task '{spec.name}' gave no examples for split '{spec.split}'; check its path and options")
    if say_short and spec.n is not None and len(rows) < spec.n:  # (silent, a run's figures were over fewer than asked)
        from ponder.distributed import say_once

        where = f" ({spec.path})" if spec.path else ""
        say_once(f"ponder: task '{spec.name}'{where} holds {len(rows):,} examples for split '{spec.split}', fewer than "
                 f"its n={spec.n:,}: all {len(rows):,} are used")
    for i, row in enumerate(rows, 1):
        row.setdefault("task", task.name)
        problem = prompt_problem(row.get("prompt"))
        if problem:
            raise UserError(f"task '{spec.name}'{f' ({spec.path})' if spec.path else ''}, example {i}: {problem}")
    return rows


def prompt_problem(prompt) -> str | None:
    """What is wrong with a prompt, if anything: it is text, not empty, or chat messages (an object or a number was
    shown to the model as its Python repr; an empty prompt as the template alone)."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "the prompt is empty"
    if isinstance(prompt, list):
        return chat_messages_problem(prompt)
    return f"a prompt must be text or chat messages, got {type(prompt).__name__} {str(prompt)[:60]!r}"


def chat_messages_problem(prompt) -> str | None:
    """What is wrong with a prompt given as chat messages, if anything: they must be {role, content} objects with
    text content, one of them the user's (the question: a text template shows the last user turn alone, and chat
    templates refuse a conversation without one in their own words, or render an empty question)."""
    if not isinstance(prompt, list):
        return None
    if not prompt or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                             for m in prompt):
        return "a prompt given as a list must be chat messages: {role, content} objects with text content"
    if not any(m["role"] == "user" for m in prompt):
        return (f"the prompt's chat messages have no user turn (roles: {', '.join(m['role'] for m in prompt)}); "
                'add a {"role": "user", "content": ...} message holding the question')
    if not any(m["content"].strip() for m in prompt if m["role"] == "user"):  # (as a text prompt of spaces is)
        return "the prompt's user turns are empty (or spaces only); give the question as their content"
    return None


def check_prompts(examples: list[dict], template: str, tokenizer) -> list[str]:
    """Render one prompt of each shape (text, or one sequence of chat roles) under the template, so that a chat
    template refusing the data (a system turn, turns that do not alternate) is one line naming an example before
    training (templates.chat_text), not in the step that first meets one. Returns the notices to print: turns a
    text template leaves out (templates.left_out_turns)."""
    from ponder.templates import left_out_turns, one_of_each_shape, render

    for ex in one_of_each_shape(examples):
        render(template, ex["prompt"], tokenizer)
    notice = left_out_turns(template, [ex["prompt"] for ex in examples])
    return [notice] if notice else []


def check_options(task: Task, options: dict) -> None:
    """Refuse an option the task does not take, naming the closest one it does."""
    names, takes_any = task.options()
    for key in options:
        if key in names or takes_any:
            continue
        if key == "path":
            raise UserError(f"task '{task.name}' reads no file; remove its path")
        shown = [k for k in names if k != "path"]
        close = difflib.get_close_matches(str(key), shown, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ";"
        valid = f" valid options: {', '.join(shown)}" if shown else " it takes no options"
        raise UserError(f"task '{task.name}' has no option '{key}'{hint}{valid}")


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
    """Load several TaskSpecs into one list, weight x n examples of each task's n: its examples repeated int(weight)
    times, then a seeded draw of the fraction's share of them once more (1.4: all of them, and 40% twice; 0.3: 30% of
    them, as open-r1's dataset mixtures take a weight below 1). The weight was rounded: 1.4 counted as 1."""
    rows: list[dict] = []
    for i, spec in enumerate(specs):
        ex = load_examples(spec, seed)
        whole, part = divmod(max(1, int(spec.weight * len(ex) + 0.5)), max(len(ex), 1))
        chosen = sorted(random.Random(f"mix/{i}/{seed}").sample(range(len(ex)), part))  # in the task's own order
        rows += ex * whole + [ex[j] for j in chosen]
    return rows
