"""Each fused piece runs only where it works: compiled or hand-written after a trial, the torch twin otherwise.

A compiler or Triton failure on some GPU or driver must cost speed, never a run: every piece here has a
torch twin with the same math, and the notice names what fell back.
"""

from __future__ import annotations

import sys
import types

import torch
import torch.utils.checkpoint

try:
    import triton  # only whether it is there: a Triton piece is tried only then
except ImportError:
    triton = None


def compile_each(funcs: dict, trials: dict, who: str, backward: bool = False) -> dict:
    """Each function compiled (dynamic shapes, one graph) when a call on its trial arguments runs, and with
    `backward` its backward too; the eager function otherwise, with one notice naming those. A compiled one
    that fails on a later call goes eager from then on (eager_after_failure). Each is compiled from a copy of
    its function with a code object of its own: torch keeps a function's graphs, and counts them against its
    recompile limit, per code object, so the engine's rms and the packed pass's would share one budget (on one
    H100, OLMo 2's engine and update calls together passed it)."""
    out, failed, first = {}, [], ""
    for name, f in funcs.items():
        try:
            fn = torch.compile(own_code(f), dynamic=True, fullgraph=True)
            # the backward is part of the trial, whatever grad mode the first call came in: chosen inside a
            # no-grad scoring pass (a reference model, old log-probs), every piece failed and ran unfused all run
            with torch.enable_grad():
                res = fn(*trials[name])
                if backward:
                    sum(r.float().sum() for r in (res if isinstance(res, tuple) else (res,))).backward()
            out[name] = eager_after_failure(fn, f, name, who)
        except Exception as e:  # noqa: BLE001  (any compiler failure: that piece runs eagerly)
            out[name], failed, first = f, failed + [name], first or why(e)
    if failed:
        print(f"ponder: {who}: torch.compile failed for {', '.join(failed)} ({first}); those run unfused", file=sys.stderr)
    return out


def why(e: BaseException, width: int = 160) -> str:
    """An exception as one short line for a notice: its type and the first line of its message. Compiler
    errors run to pages; the first line names the cause (a missing compiler, a bad cache file, no memory)."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__
    return text if len(text) <= width else text[: width - 3] + "..."


def own_code(f):
    """f with a copy of its code object (the same function otherwise)."""
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__doc__ = f.__kwdefaults__, f.__doc__
    return g


# Non-reentrant activation checkpointing ends a layer's recomputation in backward by raising this from the hook that
# saves its last tensor, which may be inside a compiled piece (the layer's last norm): control flow, not a failure.
# Taken for one, the piece ran again eagerly in the stopped recomputation and the update ended in torch's
# "Unexpected state: target_frame.early_stop is set" (the 7B shape on an H100, whose plan checkpoints the layers).
CONTROL_FLOW = tuple(c for c in (getattr(torch.utils.checkpoint, "_StopRecomputationError", None),) if c is not None)


def eager_after_failure(compiled, eager, name: str, who: str):
    """`compiled`, until a call of it fails where `eager` runs; `eager` from then on, with one notice. Each new
    dtype, grad mode or input flag a piece meets is a graph of its own, and past torch's recompile limit (8)
    fullgraph=True makes the next one an error, not a quiet fallback: several models in one process (or a
    policy, a frozen reference and no-grad scoring of a model whose norms see float32 and bf16) reach it."""
    current = [compiled]

    def call(*args):
        if current[0] is eager:
            return eager(*args)
        try:
            return compiled(*args)
        except CONTROL_FLOW:
            raise
        except Exception as e:  # noqa: BLE001  (a fault of the inputs raises again below, and stays the caller's)
            out = eager(*args)
            current[0] = eager
            print(f"ponder: {who}: the compiled {name} failed on a new kind of call ({type(e).__name__}); "
                  "it runs unfused from now on", file=sys.stderr)
            return out

    return call


def trial(check, notice: str, who: str = "fast engine") -> bool:
    """Whether `check()` (a Triton piece run beside its torch twin) runs and agrees; one notice if not."""
    if triton is None:
        return False
    try:
        with torch.enable_grad():  # trials check gradients too, whatever grad mode the first call came in
            if check():
                return True
        cause = "it did not agree with its torch twin"
    except Exception as e:  # noqa: BLE001  (any compiler or launch failure: the torch piece stays)
        cause = why(e)
    print(f"ponder: {who}: {notice} ({cause})", file=sys.stderr)
    return False
