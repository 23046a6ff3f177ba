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
