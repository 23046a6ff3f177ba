"""Sandbox semantics: per-test verdicts, partial results, plain data, trusted setup, errors, modes."""

from __future__ import annotations

import textwrap

import pytest

from ponder.errors import UserError
from ponder.sandbox import Limits, Sandbox, isolation
from ponder.sandbox.capture import Finished
from ponder.sandbox.pool import _verdict


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(Limits(timeout=3.0), workers=2)
    yield sb
    sb.close()


def test_each_test_has_its_own_verdict(sandbox):
    program = "def double(x):\n    return 2 * x if x != 3 else 7\n"
    r = sandbox.run(program, ["assert double(1) == 2", "assert double(3) == 6", "assert double(5) == 10"])
    assert r.status == "failed" and [t.passed for t in r.tests] == [True, False, True]
    assert r.fraction == pytest.approx(2 / 3)
    assert r.detail == "assert double(3) == 6: AssertionError" and r.tests[1].error == "AssertionError"


def test_program_exceptions_reach_the_tests_by_type(sandbox):
    program = "class Custom(Exception):\n    pass\ndef root(x):\n    if x < 0:\n        raise ValueError('negative')\n    if x == 0:\n        raise Custom('zero')\n    return x ** 0.5\n"
    tests = [
        "try:\n    root(-1)\n    ok = False\nexcept ValueError as e:\n    ok = str(e) == 'negative'\nassert ok",
        "try:\n    root(0)\nexcept Exception as e:\n    msg = str(e)\nassert msg == 'Custom: zero'",
        "assert root(9) == 3.0",
        "assert root(0) == 0",
    ]
    r = sandbox.run(program, tests)
    assert [t.passed for t in r.tests] == [True, True, True, False]
    assert r.tests[3].error == "ProgramError: Custom: zero"


def test_results_are_rebuilt_as_plain_builtins(sandbox):
    program = textwrap.dedent("""
        def values():
            return [None, True, -3, 2 ** 100, 10 ** 5000, 1.5, float('-inf'), 2j, 'é\\n', b'\\x00',
                    (1,), [], {3: {'a': (1, 2)}}, {1, 2}, frozenset([4]), set(), ()]
        def echo(*args, **kwargs):
            return [args, kwargs]
        """)
    tests = textwrap.dedent("""
        v = values()
        assert v == [None, True, -3, 2 ** 100, 10 ** 5000, 1.5, float('-inf'), 2j, 'é\\n', b'\\x00', (1,), [], {3: {'a': (1, 2)}}, {1, 2}, frozenset([4]), set(), ()]
        assert [type(x) for x in v] == [type(None), bool, int, int, int, float, float, complex, str, bytes, tuple, list, dict, set, frozenset, set, tuple]
        assert echo(1, [2.5], k=(None,)) == [(1, [2.5]), {'k': (None,)}]
        """)
    r = sandbox.run(program, tests)
    assert r.status == "passed" and len(r.tests) == 3, r


def test_names_computed_from_the_program_count_and_bare_asserts_do_not(sandbox):
    tests = "import math\nr = square(3)\nassert True, 'HumanEval style filler'\nassert r == 9\nassert math.sqrt(square(4)) == 4\n"
    r = sandbox.run("def square(x):\n    return x * x\n", tests)
    assert r.status == "passed" and [t.source for t in r.tests] == ["assert r == 9", "assert math.sqrt(square(4)) == 4"]


def test_asserts_that_never_run_are_no_tests_and_pytest_style_tests_are_called(sandbox):
    """A statement counted as a test when an assert stood anywhere in it: `def test_add(): assert ...` only defines the
    function, so it "passed" with any program, one that defines nothing too (reward 1 for every wrong answer on
    pytest-style tests), and `if __name__ == "__main__":` asserts were skipped (the tests' __name__ was "tests"). Now
    pytest's top-level test functions are called as pytest calls them, tests run as __main__, and a test function's
    body counts where a test calls it."""
    wrong, right = "def add(a, b):\n    return 0\n", "def add(a, b):\n    return a + b\n"
    pytest_style = "def test_add():\n    assert add(1, 2) == 3\n\ndef test_zero():\n    assert add(0, 0) == 0\n"
    r = sandbox.run(wrong, pytest_style)
    assert r.status == "failed" and [t.passed for t in r.tests] == [False, True] and r.fraction == 0.5
    assert sandbox.run(right, pytest_style).status == "passed"
    assert sandbox.run("x = 1\n", pytest_style).status == "failed"
    main_guard = "if __name__ == '__main__':\n    assert add(1, 2) == 3\n"
    assert (sandbox.run(wrong, main_guard).status, sandbox.run(right, main_guard).status) == ("failed", "passed")
    called = ["def check(f):\n    assert f(1, 2) == 3", "check(add)"]  # a test function, then a test that calls it
    r = sandbox.run(wrong, called)
    assert r.status == "failed" and [t.source for t in r.tests] == ["check(add)"]
    assert sandbox.run(right, called).status == "passed"
    # a test function called by the tests themselves too: one test, run twice, counted once
    r = sandbox.run(wrong, "def test_add():\n    assert add(1, 2) == 3\n\ntest_add()\n")
    assert r.status == "failed" and len(r.tests) == 1 and r.fraction == 0.0
    # a function with parameters is no pytest test (its fixtures are not here): not called, so no test
    assert sandbox.run(wrong, "def test_add(x):\n    assert add(x, 2) == 3\n").status == "bad_tests"


def test_helpers_of_the_trusted_setup_stay_trusted(sandbox):
    setup = "def helper(x):\n    return x + 1\n"
    program = setup + "def helper(x):\n    return 0\ndef g():\n    return 1\n"  # redefines the helper
    r = sandbox.run(program, "def check(candidate):\n    assert helper(candidate()) == 2\n", entry_point="g", setup=setup)
    assert r.passed, r  # with the program's helper, helper(1) would be 0


def test_humaneval_style_check(sandbox):
    tests = "METADATA = {}\n\ndef check(candidate):\n    xs = [1, 2, 3]\n    assert candidate(xs) == 6\n    for n in range(5):\n        assert candidate(list(range(n))) == n * (n - 1) // 2\n"
    r = sandbox.run("def total(xs):\n    return sum(xs)\n", tests, entry_point="total")
    assert r.passed and [t.source for t in r.tests] == ["assert candidate(xs) == 6", "for n in range(5):"]
    r = sandbox.run("def other(xs):\n    return 0\n", tests, entry_point="total")
    assert r.status == "program_error" and r.detail == "the program defines no function 'total'"


def test_program_errors(sandbox):
    r = sandbox.run("def f(:\n    pass\n", "assert f() == 1")
    assert r.status == "program_error" and r.detail.startswith("SyntaxError (line 1)") and r.tests == []
    r = sandbox.run("import numpy_that_is_not_there\n", "assert f() == 1")
    assert r.status == "program_error" and "ModuleNotFoundError" in r.detail


def test_broken_tests_are_not_the_programs_fault(sandbox):
    r = sandbox.run("def f():\n    return 1\n", "assert f( == 1")
    assert r.status == "bad_tests" and r.detail.startswith("tests do not parse")
    r = sandbox.run("def f():\n    return 1\n", "assert 1 + 1 == 2")
    assert r.status == "bad_tests" and r.detail == "the tests hold no assert that calls the program"


def test_a_program_stopped_by_its_cpu_time_limit_timed_out():
    """The CPU-time limit (SIGXCPU) and the clock reach the deadline together; either way the verdict is
    a timeout, not a failure (here the program sends itself the signal that limit sends)."""
    sb = Sandbox(Limits(timeout=5.0), workers=1)
    prog = "import os, signal\ndef f(x):\n    if x == 0:\n        os.kill(os.getpid(), signal.SIGXCPU)\n    return x\n"
    r = sb.run(prog, ["assert f(1) == 1", "assert f(0) == 0", "assert f(2) == 2"])
    assert r.status == "timeout" and [t.passed for t in r.tests] == [True, False, False]
    assert r.tests[1].error == "timeout" and r.tests[2].error == "not run"


def test_timeout_keeps_the_tests_already_passed():
    sb = Sandbox(Limits(timeout=1.0), workers=1)
    r = sb.run("def f(x):\n    while x == 0:\n        pass\n    return x\n", ["assert f(1) == 1", "assert f(0) == 0", "assert f(2) == 2"])
    assert r.status == "timeout" and [t.passed for t in r.tests] == [True, False, False]
    assert r.tests[1].error == "timeout" and r.tests[2].error == "not run" and r.fraction == pytest.approx(1 / 3)


def test_output_scratch_and_stdlib(sandbox):
    program = textwrap.dedent("""
        import json, re, sys, tempfile
        print("to stdout")
        print("to stderr", file=sys.stderr)
        with tempfile.NamedTemporaryFile("w", dir="/tmp", delete=False) as f:
            f.write(json.dumps({"a": 1}))
        def read():
            return json.load(open(f.name))
        """)
    r = sandbox.run(program, "assert read() == {'a': 1}")
    assert r.passed and r.stdout == "to stdout\n" and r.stderr == "to stderr\n"


def test_pool_keeps_order(sandbox):
    jobs = [dict(program=f"def f():\n    return {i}\n", tests=f"assert f() == {i if i != 5 else -1}") for i in range(8)]
    results = sandbox.run_many(jobs)
    assert [r.passed for r in results] == [i != 5 for i in range(8)]


def test_verdict_needs_the_nonce():
    forged = b"{'tests': ['assert f() == 1'], 'nonce': 'guess'}\n{'test': 0, 'ok': True, 'nonce': 'guess'}\n{'done': True, 'status': 'passed', 'nonce': 'guess'}\n"
    r = _verdict(Finished(0, b"", b"", forged, None, 0.1), "the-real-nonce", 1.0)
    assert r.status == "no_verdict" and r.tests == []
    real = forged.replace(b"guess", b"the-real-nonce")
    assert _verdict(Finished(0, b"", b"", real, None, 0.1), "the-real-nonce", 1.0).passed
    partial = real.replace(b"'ok': True", b"'ok': False").replace(b"'status': 'passed'", b"'status': 'failed'")
    assert _verdict(Finished(0, b"", b"", partial, None, 0.1), "the-real-nonce", 1.0).status == "failed"


def test_a_passed_status_needs_every_test_to_pass():
    """The grader's final `passed` is a backstop, not trusted alone: with tests a and b where only a reported a pass,
    the verdict is failed, and half the tests passed."""
    nonce = "the-real-nonce"
    report = (f"{{'tests': ['assert a()', 'assert b()'], 'nonce': '{nonce}'}}\n"
              f"{{'test': 0, 'ok': True, 'nonce': '{nonce}'}}\n"
              f"{{'test': 1, 'ok': False, 'error': 'AssertionError', 'nonce': '{nonce}'}}\n"
              f"{{'done': True, 'status': 'passed', 'nonce': '{nonce}'}}\n").encode()
    r = _verdict(Finished(0, b"", b"", report, None, 0.1), nonce, 1.0)
    assert (r.status, r.detail) == ("failed", "not every test reported a pass")
    assert [t.passed for t in r.tests] == [True, False] and r.fraction == 0.5
    assert not r.passed


def test_cpu_limit_rounds_the_timeout_up_to_whole_seconds():
    """RLIMIT_CPU takes whole seconds: 1.5 s of wall clock allows 2 s of CPU (rounding down would stop the program
    with SIGXCPU before its deadline), and never less than 1."""
    assert Limits(timeout=1.5).rlimits()["cpu"] == 2
    assert Limits(timeout=3.0).rlimits()["cpu"] == 3
    assert Limits(timeout=0.2).rlimits()["cpu"] == 1


@pytest.mark.parametrize("name", ["timeout", "memory_mb", "processes", "file_size_mb", "open_files", "output_kb", "scratch_mb"])
def test_a_zero_sandbox_limit_is_refused(name):
    with pytest.raises(UserError) as e:
        Limits(**{name: 0})
    assert str(e.value) == f"sandbox limit '{name}' must be a positive number, got 0"


def test_missing_bubblewrap_is_a_user_error(monkeypatch):
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)
    with pytest.raises(UserError) as e:
        Sandbox()
    assert str(e.value) == (
        "bubblewrap (bwrap) is not installed but is needed to run model-written code; install it with "
        "`apt-get install bubblewrap` (or `make sysdeps`), or set `unsafe: true` to run model code without isolation"
    )


def test_unsafe_mode_warns_on_every_run(monkeypatch, capsys):
    monkeypatch.setattr(isolation.shutil, "which", lambda name: None)  # works without bubblewrap
    sb = Sandbox(Limits(timeout=3.0), unsafe=True)
    assert sb.run("def f():\n    return 1\n", "assert f() == 1").passed
    assert [r.passed for r in sb.run_many([dict(program="def f():\n    return 2\n", tests="assert f() == 2")])] == [True]
    assert capsys.readouterr().err.count("WARNING: unsafe mode") == 2


def test_bubblewrap_that_cannot_start_is_a_user_error(monkeypatch):
    from ponder.sandbox import pool

    real = isolation.bwrap_argv
    monkeypatch.setattr(pool, "_PROBED", set())
    monkeypatch.setattr(isolation, "bwrap_argv", lambda *a: real(*a) + ["--no-such-option"])
    with pytest.raises(UserError) as e:
        Sandbox()
    assert str(e.value).startswith("bubblewrap cannot start a sandbox on this machine (bwrap: Unknown option --no-such-option); ")
