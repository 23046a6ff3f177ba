"""Checkpoint directories: which is the latest, how many are kept, and the random state a resume restores."""

import random
from types import SimpleNamespace

import numpy as np
import torch

from ponder import checkpoint


def written(directory, step):
    """A checkpoint as save leaves it in its temporary directory (trainer_state.pt makes it complete)."""
    tmp = directory / f".tmp-step-{step}-1"
    tmp.mkdir(parents=True)
    (tmp / "trainer_state.pt").write_text(f"state of step {step}")
    return tmp


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    """By name, "step-10" sorts before "step-9": a resume after step 10 would have gone back to step 9."""
    for step in (9, 10):
        (tmp_path / f"step-{step}").mkdir()
        (tmp_path / f"step-{step}" / "trainer_state.pt").write_text("x")
    (tmp_path / "step-11").mkdir()  # no trainer_state.pt: not a complete checkpoint
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-9", "step-10"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step-10"


def test_keep_last_keeps_that_many_newest_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint._publish(tmp_path, written(tmp_path, step), step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    assert (tmp_path / "step-4" / "trainer_state.pt").read_text() == "state of step 4"


def test_keep_last_0_keeps_every_checkpoint(tmp_path):
    for step in (1, 2, 3):
        checkpoint._publish(tmp_path, written(tmp_path, step), step, keep_last=0)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-1", "step-2", "step-3"]


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip_restores_every_generator():
    state = checkpoint.rng_state()
    first = draws()
    checkpoint.set_rng_state(state)
    assert draws() == first


def test_restoring_training_state_restores_the_random_state_saved(tmp_path):
    """A resume samples what the uninterrupted run would have: restore_training puts back the RNG saved with the
    step (after the save the generators moved on, as the run's later steps move them)."""
    from ponder.config import RunConfig

    def trainer():
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        return SimpleNamespace(cfg=RunConfig(), model=model, optimizer=optimizer, scheduler=scheduler,
                               sampler=SimpleNamespace(position=0), step_no=0, nan_streak=0)

    saved = trainer()
    saved.step_no, saved.sampler.position = 3, 12
    state = checkpoint.training_state(saved)
    after_save = draws()
    draws()  # later steps move the generators on
    resumed = trainer()
    checkpoint.restore_training(resumed, state, tmp_path)
    assert (resumed.step_no, resumed.sampler.position) == (3, 12)
    assert draws() == after_save
