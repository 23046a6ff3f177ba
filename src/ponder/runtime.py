"""Plumbing every training command shares: the device, the seed, the CPU threads, the precision and the
resolved-config dump.

The GRPO trainer (ponder.rl), the SFT trainer (ponder.sft), pretraining and sampling all need these, and
none of them owns them: each imports them from here.

`train.precision` (every trainer):
- fp32: float32 weights, gradients, AdamW state and compute; no autocast, on CUDA either. CPU runs repeat
  bit for bit.
- mixed: float32 master weights, gradients and AdamW state (16 bytes a parameter); forward and backward
  under bf16 autocast (bf16 matrix products, float32 residual stream and reductions). With LoRA, the frozen
  base's matrices are stored in bf16 (ponder.models.narrow_frozen_matrices: what autocast would cast them to
  at every product, bit for bit), the adapters, embeddings and norms in float32; auto still decides by the
  float32 base (FROZEN_BYTES), so the choice does not move.
- bf16: bfloat16 weights and gradients, and KahanAdamW (ponder.optim), which keeps the part of each update
  that bf16 rounding drops; no autocast (the products are bf16 because the weights are). 14 bytes a
  parameter, 10 with optim.moment_dtype=bf16.
- auto: fp32 on CPU. On CUDA mixed when the float32 weights, gradients and AdamW state fit in the part of
  the device memory that rollouts and activations leave (HEADROOM), else bf16; the run prints which and why.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ponder.errors import UserError

GIB = 2**30
# Of the device memory, the share `auto` leaves for what grows with the workload rather than with the model:
# the rollout engine's KV cache (up to kv_fraction of what is free) and the update's activations (the token
# budget is planned from what is left: ponder.rl.memory_plan). Both shrink to fit, and steps slow down as they
# do; 30% of an H200 is 42 GiB. A judgement, not a measurement: train.precision=mixed or bf16 overrides it.
HEADROOM = 0.30
MIXED_BYTES = 16  # a trained parameter in float32: weight 4, gradient 4, AdamW's two moments 8
FROZEN_BYTES = 4  # a frozen float32 parameter (LoRA's base): the weight only
BF16_BYTES = 14  # bf16 weight 2, gradient 2, float32 moments 8, Kahan compensation 2 (ponder.optim)
BF16_MOMENTS_BYTES = 10  # the same with bf16 moments (optim.moment_dtype=bf16): 4 for the two


def set_seed(seed: int) -> None:
    """One seed for Python's, NumPy's and torch's generators (initialisation, data order, dropout)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(requested: int = 0, key: str = "train.threads") -> int:
    """torch's CPU threads for this process, returned: `requested` (train.threads) where set; else, with several
    processes on this machine (torchrun --nproc-per-node N: LOCAL_WORLD_SIZE), the cores divided among them, unless the
    user set OMP_NUM_THREADS; else torch's default (OMP_NUM_THREADS, or every core). Each of N processes on every core
    would oversubscribe the machine N times over, and torchrun's own default, OMP_NUM_THREADS=1 in each process
    where the user set none, leaves all but N cores idle."""
    local = local_processes()
    cores = os.cpu_count() or 1
    if requested > cores:  # more threads than cores never helps (2,000 on two cores segfaulted in backward)
        print(f"ponder: {key}={requested} is more than this machine's {cores} cores; using {cores}", file=sys.stderr)
        requested = cores
    if requested:
        torch.set_num_threads(requested)
    elif local > 1 and not _user_set_omp_threads():
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
        torch.set_num_threads(max(1, usable // local))
    return torch.get_num_threads()


def _user_set_omp_threads() -> bool:
    """Whether OMP_NUM_THREADS is the user's: torchrun sets it to 1 for its processes where it was unset, so this
    process's environment cannot tell, but torchrun's (the parent's) as it started can."""
    if "OMP_NUM_THREADS" not in os.environ:
        return False
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # another launcher: set by the user or for them
        return True
    try:
        with open(f"/proc/{os.getppid()}/environ", "rb") as f:
            return any(v.startswith(b"OMP_NUM_THREADS=") for v in f.read().split(b"\0"))
    except OSError:  # no /proc (not Linux): take it as the user's, as torch does
        return True


def keep_freed_memory() -> bool:
    """CPU training: freed tensors stay in the process's heap (glibc malloc: no mmap for large blocks, no trim)
    instead of going back to the system, so the next step's tensors of the same sizes reuse pages already
    mapped. By default glibc maps each large tensor afresh and unmaps it when freed; a step then pays a page
    fault per 4 KiB it touches, a system call each (on the cpu_step workload about 12,000 a step, 10-40% of
    the update, and the spread between steps). Memory held follows the step's peak, which it holds anyway.
    True where set (Linux with glibc); elsewhere nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) & bool(mallopt(m_mmap_threshold, 2**30))


def pick_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA when visible), cuda (the current CUDA device; a user error without one), or
    any device torch names."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device("cuda", torch.cuda.current_device()) if name == "cuda" else torch.device(name)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the GPU: a copy from pageable memory would first wait for
    every queued kernel (a stall per micro-batch, or at each of the rollout engine's host checks); a pinned one
    queues behind them."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class Precision:
    """`train.precision` resolved: fp32, mixed or bf16, and why (auto's reason; empty when the recipe chose)."""

    name: str
    why: str = ""
    moments: str = "fp32"  # KahanAdamW's moments under optim.moment_dtype auto: bf16 where 14 bytes a parameter do not fit

    @property
    def dtype(self) -> torch.dtype:
        """The trainable weights' dtype."""
        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def autocast(self) -> bool:
        """Whether the passes run under bf16 autocast (mixed only: bf16 weights compute in bf16 as they are)."""
        return self.name == "mixed"

    def line(self) -> str:
        return f"train.precision auto -> {self.name} ({self.why})"


def _count(n: int) -> str:
    """A parameter count as the line prints it: 7.6B, 0.5B, 1.0M."""
    return f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def choose_precision(requested: str, device_type: str, n_params: int = 0, device_memory: int | None = None,
                     frozen: bool = False, shards: int = 1, offload: bool = False) -> Precision:
    """`train.precision` for a model of `n_params` parameters on a device of `device_memory` bytes. auto: fp32
    on CPU; elsewhere mixed when float32 weights, gradients and AdamW state (`frozen`, LoRA: the float32 base
    weights alone; the adapters are a rounding error) fit in (1 - HEADROOM) of the device memory, else bf16.
    `shards`: the ranks FSDP2 spreads that state over (train.sharding), each holding its share. `offload`
    (train.offload): that state lives in host memory, which is what offload is for: mixed."""
    if requested != "auto":
        return Precision(requested)
    if device_type == "cpu" or device_memory is None:  # no device memory to plan by
        return Precision("fp32", f"on {device_type}: float32 weights and compute")
    if offload:
        return Precision("mixed", "train.offload: float32 weights, gradients and AdamW state in host memory, bf16 "
                                  "compute on the device; set train.precision=bf16 for bf16 weights")
    what = "float32 base weights" if frozen else "float32 weights, gradients and AdamW state"
    need = n_params * (FROZEN_BYTES if frozen else MIXED_BYTES) / shards
    room = (1 - HEADROOM) * device_memory
    ranks = f" sharded over {shards} ranks" if shards > 1 else ""
    size = f"{_count(n_params)} parameters{ranks}: {what} need {need / GIB:.1f} GiB{' a rank' if ranks else ''}"
    if need <= room:
        return Precision("mixed", f"{size}, within {1 - HEADROOM:.0%} of the {device_memory / GIB:.0f} GiB device; "
                                  f"set train.precision=bf16 for bf16 weights")
    why = f"{size}, more than {1 - HEADROOM:.0%} of the {device_memory / GIB:.0f} GiB device"
    moments = "fp32"
    if not frozen:
        bf16 = n_params * BF16_BYTES / shards
        why += f"; bf16 weights with KahanAdamW need {bf16 / GIB:.1f} GiB"
        if bf16 > room:  # the 7B shape on one H200: 99 GiB would leave 40 for rollouts and activations
            moments = "bf16"
            why += (f", more than {1 - HEADROOM:.0%} too: with bf16 moments (optim.moment_dtype auto -> bf16) "
                    f"{n_params * BF16_MOMENTS_BYTES / shards / GIB:.1f}")
    return Precision("bf16", f"{why}; set train.precision=mixed to force it", moments)


def free_cuda_memory(device) -> float:
    """A CUDA device's free memory plus what torch's caching allocator holds unused (this process's to reuse)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def local_processes() -> int:
    """Processes torchrun started on this machine (LOCAL_WORLD_SIZE), 1 without it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory on a CUDA device; None elsewhere (a CPU's memory is not what bounds its runs)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


class PrecisionChooser:
    """Resolves `train.precision` once the model is loaded (auto needs its size) and before its weights are
    cast and moved: pass it as models.load_trainable's `precision`. Prints auto's choice on CUDA (`announce`).
    Resuming (`resumed`: the checkpoint), auto keeps a bf16 run bf16 whatever the device: its optimizer state
    is KahanAdamW's, which AdamW over float32 weights cannot take up."""

    def __init__(self, requested: str, device: torch.device, frozen: bool = False, announce: bool = True, resumed=None,
                 shards: int = 1, offload: bool = False):
        self.requested, self.device, self.frozen, self.announce, self.shards = requested, device, frozen, announce, shards
        self.offload = offload
        self.resumed = resumed
        self.chosen: Precision | None = None
        # bf16 asked for: loaded as bf16 (half the host memory); otherwise float32, which a cast loses nothing from
        self.load_dtype = torch.bfloat16 if requested == "bf16" else torch.float32

    def __call__(self, model) -> torch.dtype:
        n = sum(p.numel() for p in model.parameters())
        if self.requested == "auto" and self.resumed is not None and _saved_dtype(self.resumed) == "bfloat16":
            # the moments as the run chose them: by the same rule, for the same model on this device
            moments = (choose_precision("auto", "cuda", n, device_memory(self.device), shards=self.shards).moments
                       if self.device.type == "cuda" else "fp32")
            self.chosen = Precision("bf16", "as the run being resumed: its checkpoint holds bf16 weights", moments)
        else:
            self.chosen = choose_precision(self.requested, self.device.type, n, device_memory(self.device), self.frozen,
                                           self.shards, self.offload)
        if self.announce and self.requested == "auto" and self.device.type != "cpu":
            print(f"ponder: {self.chosen.line()}", file=sys.stderr)
        return self.chosen.dtype


def _saved_dtype(checkpoint) -> str | None:
    """The weights' dtype a Hugging Face model directory records (config.json: dtype, formerly torch_dtype)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on the device when asked (train.precision=mixed); nothing otherwise."""
    if enabled:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def rng_kept(model):
    """The random state (CPU, and the model's GPU) as it was before the block: draws made inside are not the run's."""
    param = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    device = param.device if param is not None else torch.device("cpu")
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def probing(model):
    """A look at what the model computes that leaves no trace: eval mode (no dropout), no gradients, the random state
    and the training mode restored after. Yields the model's device."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), rng_kept(model):
            yield next(model.parameters()).device
    finally:
        model.train(was)


def dump_yaml(data: dict) -> str:
    """A resolved config as YAML, keys in the config's own order (the run directory's config.yaml)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
