"""The policy (and the KL reference) sharded across ranks with FSDP2, `torch.distributed.fsdp.fully_shard`.

`train.sharding` (ponder.config):
- `fsdp`: parameters, gradients and optimizer state sharded; each decoder layer's parameters are gathered
  for its forward, freed, gathered again for its backward, and its gradient reduce-scattered after every
  micro-batch. The least memory (a model of any size, given enough ranks) for the most traffic: about 1.5x
  plain data parallelism's bytes a micro-batch.
- `fsdp_noreshard`: gradients and optimizer state sharded, parameters gathered once at the first forward of
  an update and kept until its last backward, gradients summed locally over the micro-batches and
  reduce-scattered once. That is an all-gather plus a reduce-scatter an update: the bytes of DDP's one
  all-reduce, with the optimizer state sharded besides. So ponder has no DDP path: for models whose weights
  and gradients fit on one device this is DDP at the same traffic and less memory. Which of the two is
  faster for 0.5B-1.5B on GPUs is for the GPU session to measure (the default follows the measurement).
- `none`: no wrapping, one process (today's path). `auto`: none on one process, fsdp_noreshard on several.
`fsdp` on one process is how one device gets CPU offload of the weights and optimizer (`train.offload`).

Gradients: the loss is normalised by counts over all ranks, so the batch's gradient is the SUM of the
ranks' gradients. FSDP2 averages by default; `set_gradient_divide_factor(1.0)` with
`set_force_sum_reduction_for_comms(True)` makes it a plain SUM collective followed by a division by one
(gloo has no pre-multiplied sum, so the factor alone would fail on CPU).

Lockstep: every forward all-gathers, so every rank must run as many forward and backward passes as the others
(`lockstep` pads a rank's micro-batches with ones of weight zero). The policy pass calls the backbone and
the head, not the model's forward, so it runs through `forward`, which gives FSDP the root's hooks; the packed
pass calls each layer's pieces, so it runs each layer through the layer's `sharded_call`, which gives FSDP that
layer's hooks (and reads no other layer's weights: ponder.rl.packed).
Rollouts decode from `RolloutWeights`, a full copy (matrices in the rollout dtype) refreshed from the shards after
each update.
"""

from __future__ import annotations

import copy
import os
import types
import warnings

import torch
import torch.distributed as dist

from ponder.errors import UserError

MODES = ("none", "fsdp", "fsdp_noreshard")


def resolve(setting: str, world: int, offload: bool = False) -> str:
    """`train.sharding` for this run: auto is none on one process, fsdp_noreshard on several, and fsdp with
    train.offload (FSDP2's CPU offload is what offloads; unsharded, offload=true was ignored)."""
    if offload and setting in ("auto", "none"):
        if setting == "none":
            raise UserError("train.offload=true needs FSDP2 (train.sharding fsdp or auto), not train.sharding=none")
        return "fsdp"
    if setting == "auto":
        return "none" if world == 1 else "fsdp_noreshard"
    if setting == "none" and world > 1:
        raise UserError(f"train.sharding=none runs one process, but torchrun started {world}; use auto, fsdp or "
                        "fsdp_noreshard (gradients are reduced by FSDP2)")
    return setting


def join_single_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group, also for one process (fsdp on one device: CPU offload)."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)


def _fully_shard():
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        FSDPModule,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    return fully_shard, FSDPModule, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy


def shard(model, mode: str, device: torch.device, *, bf16: bool = False, offload: bool = False, frozen: bool = False):
    """Wrap `model` in place: each decoder layer (the model's `_no_split_modules`), then the root. On CUDA the
    mixed-precision policy computes in bfloat16 when `bf16` (the weights stay float32, gradients are reduced in
    float32); on CPU none, so CPU runs compute in float32 and match one process exactly. `frozen` (the KL
    reference, forward only): always resharded after forward, since no backward would free its gathered weights."""
    fully_shard, FSDPModule, MixedPrecisionPolicy, CPUOffloadPolicy, OffloadPolicy = _fully_shard()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False) if device.type == "cuda" else MixedPrecisionPolicy()
    kw = {"mp_policy": mp, "offload_policy": CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()}
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"train.sharding={mode}: found no decoder layers in {type(model).__name__} "
                        "(its _no_split_modules is empty); use train.sharding=none")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=frozen or mode == "fsdp", **kw)
    # the root (embeddings, final norm, head) stays gathered from forward to backward, which follows at once
    fully_shard(model, reshard_after_forward=frozen, **kw)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # SUM, not the mean: see the module docstring
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    # the policy pass calls the backbone and head itself (`forward` runs it between the root's hooks), and the
    # packed pass each layer's pieces (ponder.rl.packed runs each layer through its own sharded_call)
    for m in (*layers, model):
        _add_sharded_call(m)
    return model


def _add_sharded_call(module) -> None:
    """`module.sharded_call(fn, *args)`: fn(*args) as the module's forward for FSDP: its parameters gathered
    before, resharded after (as the unit's reshard_after_forward says), and hooks on the tensors in `args` and
    in the result that gather again for backward and reduce the gradients after it."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    module.sharded_call = types.MethodType(lambda self, fn, *args: fn(*args), module)
    register_fsdp_forward_method(module, "sharded_call")


def is_sharded(model) -> bool:
    return isinstance(model, _fully_shard()[1])


def forward(model, fn):
    """fn() as the model's forward: on a sharded model the root's parameters (embeddings, final norm, head)
    are gathered before it and its gradients reduced after backward, as for `model(...)`."""
    return model.sharded_call(lambda: _not_views(fn())) if is_sharded(model) else fn()


def _not_views(out: tuple) -> tuple:
    """FSDP hooks the outputs' backward; on a view an in-place op would drop that hook (it warns), so the
    outputs are tensors of their own (a [B, T] copy)."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t for t in out)


def accumulate(model, last: bool, mode: str) -> None:
    """Before each micro-batch's backward. fsdp_noreshard: gradients stay local and parameters gathered until
    the update's last micro-batch, which reduces the sum once and frees the parameters (the optimizer then
    updates the shards, so gathered copies must not outlive the update). fsdp: every micro-batch reduces."""
    if mode == "fsdp_noreshard" and is_sharded(model):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)


def reshard(model) -> None:
    """Free every gathered parameter (a forward without backward, under no_grad, leaves them gathered when
    not resharding after forward)."""
    FSDPModule = _fully_shard()[1]
    for m in model.modules() if model is not None else ():
        if isinstance(m, FSDPModule):
            m.reshard()


def lockstep(batches: list, pad) -> tuple[list, int]:
    """(batches padded to the most any rank has, with `pad()` micro-batches; how many are real). Every rank must
    make the same forward and backward passes, since each all-gathers; a padding micro-batch weighs zero."""
    from ponder import distributed

    most = int(distributed.max_all(len(batches)))
    return batches + [pad() for _ in range(most - len(batches))], len(batches)


def full_tensor(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank calls it), or `t` itself. Shards
    offloaded to CPU are gathered on `device` (NCCL reads device memory only)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if device is not None and t.device != device:
        t = DTensor.from_local(t.to_local().to(device), t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
    return t.full_tensor()


def grad_norm(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s total norm; over DTensor gradients it is a DTensor, whose full value every rank reads."""
    return full_tensor(norm)


def rollout_dtype(engine: str, options: dict, device: torch.device) -> torch.dtype:
    """The dtype of the rollout copy's matrices: the fast engine's (`rollout.engine_options.dtype`; auto:
    bfloat16 on CUDA, float32 elsewhere, so CPU runs decode exactly as unsharded ones), so that it decodes from
    the copy as it is; float32 for the hf engine, which runs the float32 model as it is."""
    if engine != "fast":
        return torch.float32
    from ponder.rollout.fast import DTYPES

    return DTYPES.get(options.get("dtype", "auto")) or (torch.bfloat16 if device.type == "cuda" else torch.float32)


class RolloutWeights:
    """The policy's full weights on every rank, for the rollout engine to decode from (and rank 0 to evaluate
    between steps): the linear layers' matrices and biases (the output head's included, a matrix of its own where
    it is tied to the embedding) in `dtype`, every other parameter (embeddings, norms) and buffer as trained.
    So it costs `dtype`'s bytes a parameter of the matrices and 4 for the rest: with bfloat16 (CUDA) about
    2.1 bytes a parameter of a 7B model (16 GB; the embedding's 0.5B stay float32), where a float32 copy and
    the fast engine's bfloat16 copy of it cost 6 (45 GB). The fast engine takes this layout as it is, under
    autocast (ponder.rollout.shadow_dtype): what RolloutCopy makes for a float32 model, with no second copy.
    With float32 (CPU) it is a plain copy and rollouts are those of the unsharded model bit for bit.

    Made before the policy is sharded; refreshed from the shards after every change of the weights (an update,
    a checkpoint load, a rollback), one parameter at a time: the transient full float32 tensor of one parameter
    is all a refresh adds. It stays allocated between steps, so its addresses do not move and the fast engine
    keeps its KV cache and CUDA graphs. Parameters are matched by name at each refresh: the fast engine joins
    q/k/v into one buffer, which replaces the copy's parameter objects with views.

    LoRA (a peft model): the copy is the peft model, its adapters (lora_A, lora_B) float32 as trained, the base's
    matrices in `dtype`. On CPU the engine runs the adapter layers as they are; on CUDA its RolloutCopy merges each
    into one bf16 matrix (base + scaling * B @ A) at the first rollout after a refresh, into storage of its own. The
    frozen base is copied at the first refresh only: later ones gather the trainable parameters (the adapters).

    Not done: for models whose rollout copy and the engine's idle KV cache crowd the update, both could be freed
    for the update and made again for the next rollout (at the price of capturing the engine's graphs again)."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and embedding is not None and head.weight is embedding.weight
        adapters = {id(p) for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
                    for p in m.parameters() if p is not m.base_layer.weight}  # LoRA's A and B stay as trained
        # narrower only: bf16 weights (train.precision=bf16) stay bf16 where the rollout dtype is float32 (CPU), as
        # the engine runs them unsharded (widened matrices beside bf16 norms would not even run)
        # (biases too: autocast would cast them at every product)
        narrow = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
                  for m in model.modules() if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias)
                  if p is not None and p.is_floating_point() and p.itemsize > dtype.itemsize
                  and not (tied and p is embedding.weight) and id(p) not in adapters}
        self.model = copy.deepcopy(model, memo=dict(narrow))  # the matrices made narrow once, not copied wide first
        if tied and head.weight.itemsize > dtype.itemsize:  # the embedding's rows stay as they are; the head gets its matrix
            self.model.get_output_embeddings().weight = torch.nn.Parameter(head.weight.detach().to(dtype), requires_grad=False)
        self.model.requires_grad_(False)
        # each parameter's names (a tied one has two; a sharded model's named_parameters gives the first)
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self.aliases = {ns[0]: ns for ns in names.values()}
        self.frozen_copied = False  # frozen parameters (a LoRA base) never change: copied at the first refresh only

    @torch.no_grad()
    def refresh(self, sharded, device: torch.device) -> None:
        reshard(sharded)
        mine = dict(self.model.named_parameters(remove_duplicate=False))
        for name, p in sharded.named_parameters():  # the same order on every rank: each gather a collective
            if not p.requires_grad and self.frozen_copied:
                continue
            full = full_tensor(p.detach(), device)
            for alias in self.aliases.get(name, (name,)):
                mine[alias].copy_(full)
        self.frozen_copied = True


# ------------------------------------------------------------------------------------------- checkpoints
SHARDED_DIR = "sharded"  # inside checkpoints/step-N: the DCP training state (model and optimizer)


def save_state(path, model, optimizer) -> None:
    """Model and optimizer through torch.distributed.checkpoint: each rank writes its shards (every rank calls)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=os.fspath(path))


def load_state(path, model, optimizer) -> None:
    """The inverse of save_state, into a model sharded over any number of ranks, or not sharded at all: DCP
    reads each rank's part of every tensor from whichever files hold it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optimizer": osd}
    with warnings.catch_warnings():  # one process reading the shards: what DCP then assumes, and says
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=os.fspath(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full_optimizer(model, optimizer, saved: dict) -> None:
    """An unsharded run's optimizer state (torch's state dict: keyed by the position of each trainable parameter
    in the model's order) into the optimizer of the sharded `model`, each rank taking its shard of every tensor:
    how a one-process run continues on several (every rank calls)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(ids) != len(names):
        raise UserError(f"the checkpoint's optimizer has {len(ids)} parameters and this model {len(names)} trainable "
                        "ones; resume with the settings the run was saved with (model.lora among them)")
    name = dict(zip(ids, names))
    by_name = {"state": {name[i]: v for i, v in saved["state"].items()},
               "param_groups": [{**g, "params": [name[i] for i in g["params"]]} for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def load_full_state(model, state: dict) -> None:
    """A full (unsharded) state dict, which every rank holds, into `model`, sharded or not."""
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def full_model_state(model) -> dict:
    """The whole model's state dict on rank 0's CPU, for the Hugging Face export (every rank calls)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
