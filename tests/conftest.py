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
