"""bench/grpo_step.py measures what `ponder train` runs: GRPOTrainer.step on a recipe, nothing of its own."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_grpo_step_bench_times_the_trainers_own_steps(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import grpo_step

    from ponder.rl.trainer import GRPOTrainer

    calls = []
    real = GRPOTrainer.step
    monkeypatch.setattr(GRPOTrainer, "step", lambda self: calls.append(self.cfg) or real(self))
    out = tmp_path / "out.json"
    monkeypatch.setattr(sys, "argv", ["grpo_step.py", "--shapes", "smoke", "--steps", "2", "--new", "8", "--prompts", "2",
                                      "--group", "2", "--prompt", "16", "--work", str(tmp_path), "--json", str(out)])
    grpo_step.main()
    row = json.loads(out.read_text())["results"][0]
    assert len(calls) == 2 and row["steps"] == 1  # the first step is not timed
    cfg = calls[0]
    assert (cfg.rollout.engine, cfg.rollout.group_size, cfg.rollout.max_new_tokens) == ("fast", 2, 8)
    assert cfg.optim.token_budget is None and "bench_even_words" in cfg.rewards  # defaults; a user's reward
    assert row["completion_len"] == 8  # forced length
    assert row["total"] == pytest.approx(row["generate"] + row["reward"] + row["train"], rel=0.2)
