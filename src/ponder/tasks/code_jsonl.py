"""Coding tasks from the user's JSONL: `prompt`, `tests`, optional `entry_point` and `code_prefix`.

`tests` is Python source (asserts that call the program's functions, or HumanEval's
`def check(candidate)` together with `entry_point`), or a list of sources, one test each.
Answers are verified by running the program in the sandbox (ponder.sandbox).
"""

from __future__ import annotations

from ponder.errors import UserError
from ponder.tasks import Task, path_fix, register
from ponder.tasks.jsonl import read_jsonl


@register
class CodeJsonl(Task):
    """Task options: `timeout` (seconds per run), `memory_mb`, `unsafe` (no bubblewrap: warns)."""

    name = "code_jsonl"

    def load(self, split="train", n=None, seed=0, path=None, timeout=10.0, memory_mb=512, unsafe=False, **_):
        if path is None:
            raise UserError(f"task 'code_jsonl' needs a path: {path_fix('code_jsonl')}")
        # on each example, not the task (one object serves every spec: the last spec's options ran them all, `unsafe` too)
        options = dict(timeout=timeout, memory_mb=memory_mb, unsafe=unsafe)
        rows = read_jsonl(path, required=("prompt", "tests"))
        for lineno, row in enumerate(rows, 1):
            check_row(row, f"{path} row {lineno}")
            row["task"], row["sandbox_options"] = self.name, options
        return rows[:n] if n else rows

    def verify(self, answer, example):
        from ponder.rewards.code import get_sandbox, program_from_answer, score_programs

        program = program_from_answer(answer) if answer is not None else None
        return score_programs([program], [example], get_sandbox(**example.get("sandbox_options", {})))[0]


def check_row(row: dict, where: str) -> None:
    tests = row["tests"]
    if not (isinstance(tests, str) or (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests))):
        raise UserError(f"{where}: 'tests' must be Python source or a list of sources, got {type(tests).__name__}")
    for key in ("entry_point", "code_prefix"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise UserError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    if isinstance(tests, str) and "def check(" in tests and not row.get("entry_point"):
        raise UserError(f"{where}: tests define check(candidate) but the row has no 'entry_point'; add the name of the function to test")
