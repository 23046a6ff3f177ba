"""ponder bounds OpenMP's idle spin before torch loads it (bench/README.md, "CPU under contention")."""

import os
import subprocess
import sys

import pytest

PROBE = "import os, ponder, torch; print(os.environ.get('GOMP_SPINCOUNT'))"


def run(env):
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120).stdout.strip()


def test_short_spin_is_the_default_and_a_users_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert run(env) == "10000"
    assert run({**env, "GOMP_SPINCOUNT": "123"}) == "123"


@pytest.mark.parametrize("asked", [2000, 2**40])
def test_more_threads_than_cores_are_cut_to_the_cores_with_one_line(monkeypatch, capsys, asked):
    """2,000 torch threads on two cores segfaulted in backward (1,500 ran 26x slower); 2**40 overflowed torch's int."""
    import torch

    from ponder import runtime

    before = torch.get_num_threads()
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    try:
        assert runtime.set_threads(asked, "threads") == 2
        assert capsys.readouterr().err == f"ponder: threads={asked} is more than this machine's 2 cores; using 2\n"
        assert runtime.set_threads(1) == 1 and capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)
