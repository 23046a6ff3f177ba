"""Plumbing every training command shares: the device, the seed, the precision and the resolved-config dump.

The GRPO trainer (ponder.rl), the SFT trainer (ponder.sft), pretraining and sampling all need these, and
none of them owns them: each imports them from here.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from ponder.errors import UserError


def set_seed(seed: int) -> None:
    """One seed for Python's, NumPy's and torch's generators (initialisation, data order, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA when visible), cuda (the current CUDA device; a user error without one), or
    any device torch names."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """`train.precision`: bf16 always, or auto (bf16 autocast on CUDA, fp32 on CPU)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; nothing elsewhere (CPU runs stay float32, so they repeat bit for bit)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def dump_yaml(data: dict) -> str:
    """A resolved config as YAML, keys in the config's own order (the run directory's config.yaml)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
