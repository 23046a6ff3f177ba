"""Each fused piece runs only where it works: compiled or hand-written after a trial, the torch twin otherwise.

A compiler or Triton failure on some GPU or driver must cost speed, never a run: every piece here has a
torch twin with the same math, and the notice names what fell back.
"""

from __future__ import annotations

import sys
import types

import torch

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
    out, failed = {}, []
    for name, f in funcs.items():
        try:
            fn = torch.compile(own_code(f), dynamic=True, fullgraph=True)
            res = fn(*trials[name])
            if backward:
                sum(r.float().sum() for r in (res if isinstance(res, tuple) else (res,))).backward()
            out[name] = eager_after_failure(fn, f, name, who)
        except Exception:  # noqa: BLE001  (any compiler failure: that piece runs eagerly)
            out[name], failed = f, failed + [name]
    if failed:
        print(f"ponder: {who}: torch.compile failed for {', '.join(failed)}; those run unfused", file=sys.stderr)
    return out


def own_code(f):
    """f with a copy of its code object (the same function otherwise)."""
    g = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__doc__ = f.__kwdefaults__, f.__doc__
    return g


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
        if check():
            return True
    except Exception:  # noqa: BLE001  (any compiler or launch failure: the torch piece stays)
        pass
    print(f"ponder: {who}: {notice}", file=sys.stderr)
    return False
