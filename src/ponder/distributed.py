"""Data parallelism across processes (torchrun), the same code path as one process with world size 1.

Each rank owns whole prompt groups, so advantages need no communication but batch_std's scale. What
crosses ranks: how many prompts are still wanted (dynamic sampling), batch_std's standard deviation, the
loss normalisers (sequence, token and micro-batch counts), how many micro-batches the busiest rank has, the
gradients (summed by FSDP2: ponder.sharding, which also shards the weights and optimizer state), and the
step's figures (averaged). Rank 0 writes files; every rank writes its shards of a checkpoint. A rank that stops on
an error says why and leaves; the others, whose next collective then fails, say only that another rank stopped
(teardown, another_rank_stopped).

Start with `torchrun --nproc-per-node N -m ponder train RECIPE`; gloo on CPU, NCCL on GPUs. Several machines:
the same command on each with `--nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id RUN` (or
`--node-rank R --master-addr HOST --master-port PORT`). `train.sharding` chooses how the policy is sharded:
fsdp_noreshard (the default on several processes: weights gathered once an update, DDP's traffic, optimizer
state sharded) for models that fit one device, fsdp (weights gathered layer by layer, least memory) for
those that do not; ponder.sharding says why there is no separate DDP path.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

# set in the process group's store (torchrun's, which outlives the ranks) by a rank that leaves on an error; one key
# a restart, as torchrun starts the ranks afresh
_RESTART = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
_MARKS = {"error": f"ponder/stopped/{_RESTART}", "sigterm": f"ponder/terminated/{_RESTART}"}


def launched() -> int:
    """The processes torchrun started (its WORLD_SIZE), whether or not they joined a group yet; 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def say_once(line: str) -> None:
    """`line` on stderr; under torchrun once per machine for all ranks that say the same (a config mistake is raised
    by every rank at once: N copies of one line): the first rank to claim the line in the temporary directory says it.
    A line one rank alone says is said."""
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if launched() > 1 and run:
        digest = hashlib.sha1(f"{run}\n{os.getppid()}\n{line}".encode()).hexdigest()[:20]
        try:
            os.close(os.open(os.path.join(tempfile.gettempdir(), f"ponder-said-{digest}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        except OSError:
            pass  # no temporary directory to claim it in: every rank says it
    print(line, file=sys.stderr, flush=True)


def setup(timeout_minutes: float = 180.0) -> tuple[int, int]:
    """(rank, world size); joins the process group that torchrun describes in the environment. A rank waits at
    most `timeout_minutes` in one collective (while rank 0 writes a checkpoint or a report, the others wait)."""
    if launched() == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            # a launcher that shows each rank its own GPU alone (CUDA_VISIBLE_DEVICES) still numbers LOCAL_RANK 0..N-1
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return dist.get_rank(), dist.get_world_size()


def teardown(clean: bool = True, why: str = "error") -> None:
    """Leave the process group before the interpreter exits: left to shutdown, gloo's threads were sometimes
    destroyed while running and the process aborted ("terminate called without an active exception", exit -6)
    after a finished run. `clean`: every rank got here (a barrier first). Else this rank stops, on an error or
    (`why="sigterm"`) a SIGTERM: it tells the others why (another_rank_stopped) and leaves without waiting for them,
    which ends the collective they wait in at once (gloo: the connection closes; torchrun also stops them once this
    process exits)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    store, n = _store(), dist.get_world_size()
    if clean:
        dist.barrier()
    elif active():
        try:  # before leaving: a rank whose collective fails on our leaving finds the mark there
            store.add(_MARKS[why], 1)
        except (RuntimeError, ValueError):
            pass  # no store to tell: the others' collectives fail all the same, only less quietly
    dist.destroy_process_group()
    gc.collect()  # what still holds a group (a device mesh in a reference cycle) lets it go now, not at exit
    if clean and n > 1:
        _leave_together(store, n)


def _leave_together(store, n: int, timeout: float = 60.0) -> None:
    """Wait (through the store, the group gone) until every rank has left its group: a rank that exited while
    another still tore its group down made that one abort now and then ("terminate called without an active
    exception", exit -6, one run in about thirty of the tests' two-rank runs on a loaded machine)."""
    key, end = f"ponder/left/{_RESTART}", time.monotonic() + timeout
    try:
        store.add(key, 1)
        while store.add(key, 0) < n and time.monotonic() < end:
            time.sleep(0.01)
    except (RuntimeError, ValueError):
        pass  # the store went with a rank that left first: nothing left to wait for


def another_rank_stopped() -> str | None:
    """Why another rank left the run (teardown(clean=False)): "error", "sigterm", or None; ask before this rank's own
    teardown. Then what this rank got, a failed collective (gloo: "Connection closed by peer") or torchrun's SIGTERM
    once that rank exited, is that rank's leaving: its message says why, this rank's own line would mislead and its
    traceback would bury it. An error wins over a SIGTERM (torchrun stops the others after one rank's error)."""
    if not active():
        return None
    try:
        return next((why for why, key in _MARKS.items() if _store().add(key, 0) > 0), None)
    except (RuntimeError, ValueError):
        return None  # cannot tell: what this rank got stands as it is


def _store():
    return dist.distributed_c10d._get_default_store()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def _reduce(value: float, op) -> float:
    if not active():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=op)
    return t.item()


def sum_all(value: float) -> float:
    return _reduce(value, dist.ReduceOp.SUM) if active() else value


def max_all(value: float) -> float:
    return _reduce(value, dist.ReduceOp.MAX) if active() else value


def std_all(values: torch.Tensor) -> float:
    """Population standard deviation of every rank's values together (the mean first, then the squares:
    no cancellation)."""
    values = values.double()
    n = sum_all(values.numel())
    mean = sum_all(values.sum().item()) / max(n, 1)
    return math.sqrt(sum_all(((values - mean) ** 2).sum().item()) / max(n, 1))


def broadcast(obj):
    """Rank 0's `obj` on every rank (any picklable object)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_metrics(metrics: dict, weights: dict | None = None) -> dict:
    """Every rank's figures combined as one process would compute them on the whole batch, so rank 0 logs it: a mean
    over samples, groups or tokens weighted by each rank's count of them (`weights`: key -> this rank's count; ranks
    hold different numbers of tokens, and of samples with dynamic sampling: an equal weight a rank logged 0.042 for
    a batch's 10 right of 256), max for maxima, sums for the loss's shares and throughput."""
    if not active():
        return metrics
    pairs = gather_all((metrics, weights or {}))
    gathered, counts = [m for m, _ in pairs], [w for _, w in pairs]
    out = {}
    # every rank's keys: a rank whose groups hold one task of a mix has no figures for the others (curves had gaps)
    for key in dict.fromkeys(k for g in gathered for k in g):
        value = metrics.get(key, next(g[key] for g in gathered if key in g))
        values = [g.get(key) for g in gathered if isinstance(g.get(key), (int, float))]
        if not values:
            out[key] = value
        elif key.endswith("/max") or key.startswith("time/"):
            out[key] = max(values)
        elif key in ("groups_generated", "loss", "tokens_per_s"):
            # each rank's loss is its share of the batch's (normalised by counts over every rank); each rank
            # decodes its own prompts at once: summed, as one process on the whole batch would log them
            out[key] = sum(values)
        elif key == "skipped_updates":  # skipping is decided by all ranks together: one skip, not one a rank
            out[key] = max(values)
        else:
            # a rank that counted none (no token measured) weighs nothing, its NaN too
            weighed = [(g[key], w.get(key)) for g, w in zip(gathered, counts)
                       if isinstance(g.get(key), (int, float)) and w.get(key) != 0]
            if weighed and all(n is not None for _, n in weighed):
                out[key] = sum(v * n for v, n in weighed) / sum(n for _, n in weighed)
            else:
                out[key] = sum(values) / len(values)
    return out


def gather_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (picklable objects)."""
    if not active():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
