"""Atomic checkpoints: a Hugging Face model directory plus the trainer state needed to resume exactly.

Layout: checkpoints/step-N/{config.json, model.safetensors, tokenizer files, trainer_state.pt}.
A checkpoint is written into a temporary sibling directory and renamed into place, so a kill during
the write leaves the previous checkpoints untouched and no half-written `step-N`.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ponder import models
from ponder.errors import UserError

STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def training_state(trainer) -> dict:
    """What any trainer saves to continue exactly: step, data position, optimizer, schedule, RNG, config,
    LoRA adapters. `trainer` has cfg, model, optimizer, scheduler, sampler, step_no and nan_streak."""
    from ponder.config import to_dict

    return {
        "step": trainer.step_no, "sampler_position": trainer.sampler.position, "nan_streak": trainer.nan_streak,
        "optimizer": trainer.optimizer.state_dict(), "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(), "config": to_dict(trainer.cfg),
        "adapter": {k: v for k, v in trainer.model.state_dict().items() if "lora_" in k} if trainer.cfg.model.lora else None,
    }


def restore_training(trainer, state: dict) -> None:
    """The inverse of training_state (the weights and adapters are loaded with the model)."""
    trainer.step_no, trainer.nan_streak = state["step"], state["nan_streak"]
    trainer.sampler.position = state["sampler_position"]
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])


def save(directory: Path, step: int, model, tokenizer, state: dict, keep_last: int = 2) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step}"
    tmp = directory / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    models.save(model, tokenizer, tmp)
    torch.save(state, tmp / "trainer_state.pt")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if (p / "trainer_state.pt").is_file()]


def latest(directory: Path) -> Path | None:
    ckpts = list_checkpoints(directory)
    return ckpts[-1] if ckpts else None


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite or to resume nothing."""
    last = latest(run_dir / "checkpoints")
    if resume and last is None:
        raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start the run without --resume")
    if not resume and last is not None:
        raise UserError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it, or choose another name (name=...)")
    return last


def load_state(path: Path) -> dict:
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
