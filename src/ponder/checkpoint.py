"""Atomic checkpoints: a Hugging Face model directory plus the trainer state needed to resume exactly.

Layout: checkpoints/step-N/{config.json, model.safetensors, tokenizer files, trainer_state.pt}, and with
sharding (ponder.sharding) `sharded/`: the model and optimizer state as torch.distributed.checkpoint wrote
them, each rank its shards (the optimizer is then not in trainer_state.pt). The Hugging Face files hold the
full weights either way. A checkpoint is written into a temporary sibling directory and renamed into place,
so a kill during the write leaves the previous checkpoints untouched and no half-written `step-N`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ponder import distributed, models, sharding, stopping
from ponder.errors import UserError
from ponder.files import replace_dir, unwritable

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
        # one state a GPU that was visible at the save: a run saved on 8 GPUs resumes where fewer are visible
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def training_state(trainer, optimizer: bool = True) -> dict:
    """What any trainer saves to continue exactly: step, data position, optimizer (unless sharded: see
    save_sharded), schedule, RNG, config, LoRA adapters. `trainer` has cfg, model, optimizer, scheduler,
    sampler, step_no and nan_streak. Every rank calls it (a sharded adapter is gathered)."""
    from ponder.config import to_dict

    return {
        "step": trainer.step_no, "sampler_position": trainer.sampler.position, "nan_streak": trainer.nan_streak,
        "optimizer": trainer.optimizer.state_dict() if optimizer else None, "scheduler": trainer.scheduler.state_dict(),
        "rng": rng_state(), "config": to_dict(trainer.cfg), "data": getattr(trainer, "data_hash", None),
        "adapter": {k: sharding.full_tensor(v).cpu() for k, v in trainer.model.state_dict().items() if "lora_" in k}
        if trainer.cfg.model.lora else None,
    }


def restore_training(trainer, state: dict, path: Path) -> None:
    """The inverse of training_state (the weights and adapters are loaded with the model), from checkpoint
    `path`; the optimizer (and the weights again) from its sharded state if it has one."""
    trainer.step_no, trainer.nan_streak = state["step"], state["nan_streak"]
    trainer.sampler.position = state["sampler_position"]
    # the settings the optimizer was just built with (this run's config), before the checkpoint's overwrite them
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    load_model_and_optimizer(trainer, state, path)
    trainer.scheduler.load_state_dict(state["scheduler"])
    keep_config_settings(trainer.optimizer, trainer.scheduler, fresh)
    set_rng_state(state["rng"])


def keep_config_settings(optimizer, scheduler, fresh: list[dict]) -> None:
    """Undo what loading a checkpoint's optimizer and schedule state did to settings that come from the config, so
    that a resume with a changed optim.lr (or betas, weight decay, schedule: --allow-changes) trains with it: torch
    loads each parameter group's lr, betas and weight decay, and the schedule's base rates, as they were saved.
    The learning rate scales by new / old optim.lr (`initial_lr` is the config's rate; a guardrail's lower_lr
    scaled the base rates, and keeps its factor); the rest are the config's as they are."""
    for i, (group, new) in enumerate(zip(optimizer.param_groups, fresh)):
        old_initial = group.get("initial_lr", new.get("initial_lr"))
        group.update({k: v for k, v in new.items() if k not in ("lr", "initial_lr")})
        if "initial_lr" not in new or new["initial_lr"] == old_initial:
            continue
        scheduler.base_lrs[i] *= new["initial_lr"] / old_initial
        group["initial_lr"] = new["initial_lr"]
    for i, (group, base, factor) in enumerate(zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas)):
        lr = base * factor(scheduler.last_epoch)
        # the rate or the schedule changed; otherwise the saved value stays, bits included (after a guardrail's
        # lower_lr it is the rate times the factor, which may differ from base times schedule in the last bit)
        if abs(lr - group["lr"]) > 1e-6 * abs(lr):
            group["lr"] = lr
            scheduler._last_lr[i] = lr


def load_model_and_optimizer(trainer, state: dict, path: Path) -> None:
    """The optimizer state of checkpoint `path` (its weights are already loaded, unless sharded): from its
    DCP directory into a model sharded over any number of ranks (or none), or from trainer_state.pt, into one
    process or (an unsharded run continued sharded) each rank's shards."""
    if (path / sharding.SHARDED_DIR).is_dir():
        sharding.load_state(path / sharding.SHARDED_DIR, trainer.model, trainer.optimizer)
    elif sharding.is_sharded(trainer.model):
        sharding.load_full_optimizer(trainer.model, trainer.optimizer, state["optimizer"])
    else:
        trainer.optimizer.load_state_dict(state["optimizer"])


REPLACED_RE = re.compile(r"^\.tmp-step-(\d+)-\d+-replaced$")


def restore_replaced(directory: Path) -> None:
    """A step-N set aside to be replaced (.tmp-step-N-PID-replaced) whose new step-N never took its name (a kill
    between _publish's two renames) is the only step-N there is: it goes back to its name. Called by every rank before
    it looks for the checkpoint to resume from; safe where several do at once, as each rename is atomic and one that
    another rank made first leaves nothing to rename."""
    for tmp in sorted(directory.glob(".tmp-step-*-replaced")) if directory.is_dir() else ():
        m = REPLACED_RE.match(tmp.name)
        final = directory / f"step-{m.group(1)}" if m else None
        if final is not None and not final.exists():
            try:
                os.replace(tmp, final)
            except OSError:  # another rank's rename came first
                pass


def remove_unfinished(directory: Path) -> None:
    """The temporary directories of saves that a kill interrupted (named by the step and the pid of a process that is
    gone), once a step-N set aside and not replaced is back in its place: called once at the start of a run, by rank 0."""
    restore_replaced(directory)
    for tmp in directory.glob(".tmp-step-*") if directory.is_dir() else ():
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _writing(directory: Path, step: int, tmp: Path | None):
    """A write that fails for want of space or permission is the user's to fix: one line, and the partial `tmp` goes
    (it held the space a full disk lacks). A full disk is no OSError from every writer: torch.save raises
    RuntimeError ("unexpected pos"), safetensors SafetensorError."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint step-{step} in {directory}: {' '.join(str(e).split())}; free space "
                        "or fix the permissions, then --resume continues from the last checkpoint written (if none, run "
                        "again)") from e


@stopping.whole()  # a SIGTERM meanwhile waits: the checkpoint is renamed into place whole, then the run stops
def save(directory: Path, step: int, model, tokenizer, state: dict, keep_last: int = 2) -> Path:
    tmp = directory / f".tmp-step-{step}-{os.getpid()}"
    with _writing(directory, step, tmp):
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        models.save(model, tokenizer, tmp)
        torch.save(state, tmp / "trainer_state.pt")
        return _publish(directory, tmp, step, keep_last)


@stopping.whole()
def save_sharded(directory: Path, step: int, model, optimizer, tokenizer, state: dict, keep_last: int = 2) -> Path:
    """Every rank calls: each writes its shards of the model and optimizer (torch.distributed.checkpoint) into
    the temporary directory, rank 0 the Hugging Face export from the gathered full weights and trainer_state.pt;
    once all have written (barrier), rank 0 renames it into place."""
    tmp = None
    if distributed.rank() == 0:
        tmp = directory / f".tmp-step-{step}-{os.getpid()}"
        with _writing(directory, step, None):
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
    tmp = distributed.broadcast(tmp)  # one directory for all ranks (rank 0 names it)
    with _writing(directory, step, tmp if distributed.rank() == 0 else None):
        sharding.save_state(tmp / sharding.SHARDED_DIR, model, optimizer)
        full = sharding.full_model_state(model)  # on rank 0's CPU (empty elsewhere)
        if distributed.rank() == 0:
            models.save(model, tokenizer, tmp, state_dict=full)
            torch.save(state, tmp / "trainer_state.pt")
    distributed.barrier()
    final = _publish(directory, tmp, step, keep_last) if distributed.rank() == 0 else directory / f"step-{step}"
    distributed.barrier()
    return final


def _publish(directory: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """The written `tmp` renamed to step-N (files.replace_dir: a step-N saved again is set aside, removed after); the
    oldest beyond `keep_last` removed."""
    final = directory / f"step-{step}"
    replace_dir(tmp, final)
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


RUN_FILES = {"config.yaml": False, "metrics.jsonl": False, "samples.jsonl": False, "checkpoints": True, "tensorboard": True}


def resume_point(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); refuses to overwrite, to resume nothing, or a run directory
    that cannot be written (found by the first write otherwise: a traceback once the model had loaded)."""
    stuck = unwritable(run_dir)
    if stuck is not None:
        raise UserError(f"run directory {run_dir} cannot be written ({stuck} is read-only or not yours); fix its "
                        "permissions, or choose another output_dir")
    for name, folder in RUN_FILES.items():  # (found by their first write: a traceback, config.yaml rewritten before it)
        path = Path(run_dir) / name
        if path.exists() and path.is_dir() != folder:
            raise UserError(f"{path} is a {'file' if folder else 'folder'}, where the run keeps its {name} "
                            f"{'folder' if folder else 'file'}; move it elsewhere, or choose another name (name=...)")
    restore_replaced(run_dir / "checkpoints")
    last = latest(run_dir / "checkpoints")
    if resume and last is None:
        raise UserError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; start the run without --resume")
    if not resume and last is not None:
        raise UserError(f"run directory {run_dir} already holds checkpoints; pass --resume to continue it, or choose another name (name=...)")
    return last


def withheld(directory: Path, step: int, streak: int) -> str:
    """The line for a run that ended in a streak of skipped updates, so wrote no checkpoint of its last step (a recipe
    that continues from step-N would not find it)."""
    newest = latest(directory)
    return (f"no checkpoint of the last step ({step}): its last {streak} update(s) were skipped (non-finite loss or "
            f"gradients); the newest checkpoint is {newest or 'none: none was written'}")


def load_state(path: Path) -> dict:
    with reading(path):
        return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)


@contextlib.contextmanager
def reading(path: Path):
    """A checkpoint that does not load (cut short by a copy or a full disk after it was saved, a disk error; a save
    itself is renamed into place only whole) is one line naming it, and the checkpoint to resume from instead."""
    from safetensors import SafetensorError

    from ponder.models import DamagedWeights

    try:
        yield
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError, DamagedWeights) as e:
        before = [p for p in list_checkpoints(path.parent) if p.name != path.name]
        then = f"--resume continues from {before[-1].name}" if before else "start the run again without --resume"
        reason = e.reason if isinstance(e, DamagedWeights) else str(e)
        raise UserError(f"checkpoint {path} cannot be read ({' '.join(reason.split())}); move it out of {path.parent} "
                        f"and {then}") from e


def saved_config(path: Path) -> dict | None:
    """The settings checkpoint `path` was written with (its trainer state's copy of config.yaml), or None. Mapped, not
    read: the state beside them holds the optimizer's (gigabytes for a large model)."""
    try:
        config = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False, mmap=True).get("config")
    except Exception:  # a damaged checkpoint: its loading says so
        return None
    return config if isinstance(config, dict) else None
