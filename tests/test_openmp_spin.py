"""ponder bounds OpenMP's idle spin before torch loads it (bench/README.md, "CPU under contention")."""

import os
import subprocess
import sys

PROBE = "import os, ponder, torch; print(os.environ.get('GOMP_SPINCOUNT'))"


def run(env):
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120).stdout.strip()


def test_short_spin_is_the_default_and_a_users_setting_wins():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert run(env) == "10000"
    assert run({**env, "GOMP_SPINCOUNT": "123"}) == "123"
