"""The code reward: run the program a completion commits to against its example's tests, sandboxed.

Columns used: `tests` (Python source, or a list of sources, one test each), optional `entry_point`
(the function HumanEval-style `check(candidate)` receives) and optional `code_prefix` (code put
before the program, e.g. HumanEval's signature and helpers; the grader also runs it, trusted, so
tests use the original helpers even if the program redefines them). Examples without tests get None.

Options (recipe: `rewards: {code: {weight: 1.0, partial: true, timeout: 5}}`): `partial` gives the
fraction of tests passed instead of all-or-nothing; `timeout`, `memory_mb`, `workers`; `unsafe`
runs without bubblewrap (a warning is printed on every call).
"""

from __future__ import annotations

import functools
import re

from ponder.errors import UserError
from ponder.rewards import register
from ponder.rewards.extract import answer_blocks, outside_think
from ponder.sandbox import Limits, Result, Sandbox

FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(completion: str, think_opened: bool = False) -> str | None:
    """The program a completion commits to: its answer block, else its last fenced code block.

    Inside an answer block a fenced block wins over the prose around it. Code in a think block is a
    draft and never counts, also where the prompt opened the block (`think_opened`) and the completion never
    closed it; several different answer blocks commit to none (as in extract_answer).
    """
    final = outside_think(completion, think_opened)
    if final is None:
        return None
    blocks = set(answer_blocks(final))
    if blocks:
        return program_from_answer(blocks.pop()) if len(blocks) == 1 else None
    fenced = FENCE_RE.findall(final)
    return (fenced[-1].strip("\n") or None) if fenced else None


def program_from_answer(answer: str) -> str | None:
    """An extracted answer as a program: its last fenced block if it has one, else the text itself."""
    fenced = FENCE_RE.findall(answer)
    code = fenced[-1] if fenced else answer
    return code.strip("\n") or None


@functools.lru_cache(maxsize=8)
def get_sandbox(timeout: float = 10.0, memory_mb: int = 512, workers: int | None = None, unsafe: bool = False) -> Sandbox:
    """One shared sandbox (and worker pool) per setting, so bubblewrap is checked once per process."""
    if not isinstance(unsafe, bool):
        raise UserError(f"sandbox setting 'unsafe' must be true or false, got {unsafe!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UserError(f"sandbox setting 'workers' must be a positive integer, got {workers!r}")
    return Sandbox(Limits(timeout=timeout, memory_mb=memory_mb), workers=workers, unsafe=unsafe)


FUTURE_RE = re.compile(r"^from __future__ import [^\n]*\n?", re.MULTILINE)


def job_for(program: str, example: dict) -> dict:
    prefix = example.get("code_prefix") or ""
    # a program's `from __future__` imports must stay first in the file the prefix goes in front of
    futures = "".join(line.rstrip("\n") + "\n" for line in FUTURE_RE.findall(program)) if prefix else ""
    return dict(
        program=f"{futures}{prefix}\n{FUTURE_RE.sub('', program) if futures else program}\n" if prefix else program + "\n",
        tests=example["tests"],
        entry_point=example.get("entry_point"),
        setup=prefix,
    )


def score(result: Result, partial: bool = False) -> float | None:
    if result.status == "bad_tests":
        return None  # the tests are broken: the run says nothing about the program
    if result.passed:
        return 1.0
    return result.fraction if partial else 0.0


def score_programs(programs: list[str | None], examples: list[dict], sandbox: Sandbox, partial: bool = False) -> list[float | None]:
    """One score per program: None without tests, 0 without a program, else the sandbox's verdict.

    Identical jobs (a group often repeats an answer) run once.
    """
    out: list[float | None] = [None] * len(programs)
    unique: dict[str, tuple[dict, list[int]]] = {}
    for i, (program, example) in enumerate(zip(programs, examples)):
        if example.get("tests") is None:
            continue
        if program is None:
            out[i] = 0.0
            continue
        job = job_for(program, example)
        unique.setdefault(repr(sorted(job.items())), (job, []))[1].append(i)
    results = sandbox.run_many([job for job, _ in unique.values()])
    for (_, where), result in zip(unique.values(), results):
        for i in where:
            out[i] = score(result, partial)
    return out


@register("code", columns=("tests", "entry_point", "code_prefix", "think_opened"))
def code(completions, *, prompts, tests=None, entry_point=None, code_prefix=None, partial: bool = False,
         timeout: float = 10.0, memory_mb: int = 512, workers: int | None = None, unsafe: bool = False,
         think_opened=None, **_):  # fmt: skip
    """1 when the completion's program passes all of its example's tests (or the fraction, with `partial`)."""
    n = len(completions)
    cols = {"tests": tests, "entry_point": entry_point, "code_prefix": code_prefix}
    examples = [{k: (v[i] if v is not None else None) for k, v in cols.items()} for i in range(n)]
    if all(e["tests"] is None for e in examples):
        return [None] * n
    sandbox = get_sandbox(timeout, memory_mb, workers, unsafe)
    opened = think_opened if think_opened is not None else [False] * n
    return score_programs([extract_program(c, bool(o)) for c, o in zip(completions, opened)], examples, sandbox, partial)
