"""Isolated execution of model-written code against trusted tests (threat model: docs/sandbox.md).

    from ponder.sandbox import Sandbox
    result = Sandbox().run("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3")
    result.passed, result.fraction, result.tests, result.stdout

Isolation comes from bubblewrap (`isolation.py`), limits and the two-process grader from
`runner.py`, the deadline and output caps from `capture.py`, the pool and verdicts from `pool.py`.
"""

from ponder.sandbox.pool import Limits, Result, Sandbox, TestOutcome

__all__ = ["Limits", "Result", "Sandbox", "TestOutcome"]
