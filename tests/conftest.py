import os

import pytest
import torch

# Two cores in CI: one thread per test process keeps runs predictable and leaves room for workers.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def smoke_cfg(tmp_path):
    from ponder.config import load_config

    def make(*overrides):
        return load_config("recipes/smoke-first-digit.yaml", [f"output_dir={tmp_path}", *overrides])

    return make


def _share_of_sevens(completions, **_):
    """A reward that varies within every group of a random model's answers, so each update moves the weights."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def _char_hash(completions, **_):
    """A reward in [0, 1) that differs between almost any two different completions (a group has a signal)."""
    return [sum(map(ord, c)) % 97 / 97 for c in completions]


def _register_test_rewards():
    from ponder.rewards import register

    register("test_share_of_sevens")(_share_of_sevens)
    register("test_char_hash")(_char_hash)
    register("test_constant")(lambda completions, **_: [1.0] * len(completions))


_register_test_rewards()

@pytest.fixture
def error_line(capsys):
    """Runs `ponder ARGV`; asserts exit code 2 and exactly one line on stderr (no traceback); gives that line."""
    from ponder.cli import main

    def run(*argv):
        code = main(list(argv))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2
        assert len(err) == 1, err  # one line, no traceback
        return err[0]

    return run


VERIFY_LIMIT = 2.0  # seconds per answer in the tests that plant bombs


@pytest.fixture(scope="module")
def stop_verify_workers():
    """Shut the math-verify worker pool down after a module that started it."""
    yield
    from ponder.rewards import verify_pool

    verify_pool.shutdown()


@pytest.fixture
def short_limit():
    """A short per-answer time limit for math-verify workers; yields it."""
    from ponder.rewards import verify_pool

    before = verify_pool._SETTINGS["timeout"]
    verify_pool.configure(timeout=VERIFY_LIMIT)
    yield VERIFY_LIMIT
    verify_pool.configure(timeout=before)


@pytest.fixture
def triton_interpreter():
    """Runs a Python command line (a list of arguments after the interpreter) in a child process under
    Triton's CPU interpreter, which must be switched on before Triton is imported; gives the finished
    process. Skips where Triton is absent (as in CI)."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))

    def run(args, timeout=300):
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)

    return run
