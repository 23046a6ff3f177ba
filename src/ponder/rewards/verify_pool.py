"""Worker processes that run math verification under a hard wall-clock limit per item.

math-verify guards itself with `signal.alarm`, which only works on a main thread and cannot interrupt
long C-level work (a huge integer power). So ponder runs it in separate processes, each on its own
main thread, and kills any worker whose current item runs past the limit: that item scores as
timed out, the worker is replaced, and the rest of its chunk is handed out again.

Workers are plain `python -m ponder.rewards.verify_pool` subprocesses talking length-prefixed pickles
over stdin/stdout. Unlike multiprocessing's spawn/forkserver they never re-import the user's
`__main__`, and unlike fork they do not inherit the trainer's threads or CUDA state. They start on
first use, are reused, and are shut down at exit; a worker whose parent dies exits on its own.
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

TIMEOUT = object()  # result of an item that ran past the limit
STARTUP_LIMIT = 120.0  # seconds a fresh worker may take to import its libraries on a loaded machine
_HEADER = struct.Struct(">I")


def _write(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)) + data)
    f.flush()


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            raise EOFError("verification worker closed its pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read(fd: int):
    (n,) = _HEADER.unpack(_read_exact(fd, _HEADER.size))
    return pickle.loads(_read_exact(fd, n))


class _Worker:
    def __init__(self, preload: tuple[str, ...] = ()):
        src_root = str(Path(__file__).resolve().parents[2])  # the directory holding the ponder package
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ponder.rewards.verify_pool", *preload],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.ready = False  # set by the worker's first message, once its imports are done
        self.chunk: deque = deque()  # (index, func, args) sent and not yet answered, in order
        self.started = time.monotonic()  # when the item at the head of `chunk` began (or the worker started)

    def send(self, items: list) -> None:
        self.chunk.extend(items)
        self.started = time.monotonic()
        _write(self.proc.stdin, [(func, args) for _, func, args in items])

    def deadline(self, timeout: float) -> float:
        return self.started + (timeout if self.ready else STARTUP_LIMIT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def ask_to_stop(self) -> None:
        try:
            _write(self.proc.stdin, None)
        except (OSError, ValueError):
            pass

    def close(self, grace: float = 1.0) -> None:
        """Wait a moment for a clean exit (after ask_to_stop), then kill."""
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class VerifyPool:
    """Runs `module:function(*args)` calls in worker processes; each call gets `timeout` seconds."""

    def __init__(self, workers: int = 2, timeout: float = 5.0, chunk: int = 16, preload: tuple[str, ...] = ()):
        self.n_workers, self.timeout, self.chunk_size = max(1, workers), timeout, chunk
        self.preload = tuple(preload)  # `module:function`s each worker calls at start, to warm up while idle
        self.workers: list[_Worker] = []
        self.timeouts = 0  # items killed for running past the limit, since start
        self._failed_starts = 0  # workers in a row that died before they were ready
        self._retried: set[int] = set()  # items of the current map given a second try
        self._lock = threading.Lock()

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers]

    def start(self) -> None:
        """Start the workers now and wait until all are ready (map starts them lazily otherwise)."""
        with self._lock:
            while len(self.workers) < self.n_workers:
                self.workers.append(_Worker(self.preload))
            while True:
                waiting = [w for w in self.workers if not w.ready]
                if not waiting:
                    return
                wait = max(0.0, min(w.deadline(self.timeout) for w in waiting) - time.monotonic())
                readable, _, _ = select.select([w.fd for w in waiting], [], [], wait)
                for w in waiting:
                    if w.fd in readable:
                        try:
                            _read(w.fd)
                            w.ready, self._failed_starts = True, 0
                            continue
                        except (EOFError, OSError, pickle.UnpicklingError):
                            pass
                    elif time.monotonic() <= w.deadline(self.timeout):
                        continue
                    self._replace(w, [], deque(), None)  # died or stuck while starting

    def map(self, func: str, arglist: list[tuple]) -> list:
        """Results in order; an item past the limit gives TIMEOUT, one that raised gives the exception."""
        if not arglist:
            return []
        with self._lock:
            return self._map(func, arglist)

    def _map(self, func: str, arglist: list[tuple]) -> list:
        results: list = [None] * len(arglist)
        self._retried: set[int] = set()
        pending = deque((i, func, args) for i, args in enumerate(arglist))
        while len(self.workers) < self.n_workers:  # all at once: a spare keeps going while a killed one restarts
            self.workers.append(_Worker(self.preload))
        # Chunks small enough that every worker gets a share, large enough to save round trips.
        size = max(1, min(self.chunk_size, -(-len(arglist) // len(self.workers))))
        while True:
            for w in self.workers:
                if w.ready and pending and not w.chunk:
                    try:
                        w.send([pending.popleft() for _ in range(min(size, len(pending)))])
                    except OSError:  # it died between items
                        self._replace(w, results, pending, RuntimeError("verification worker died"), retry=True)
            watched = [w for w in self.workers if w.chunk or (pending and not w.ready)]
            if not watched:
                return results
            wait = max(0.0, min(w.deadline(self.timeout) for w in watched) - time.monotonic())
            readable, _, _ = select.select([w.fd for w in watched], [], [], wait)
            for w in watched:
                if w.fd in readable:
                    try:
                        message = _read(w.fd)
                    except (EOFError, OSError, pickle.UnpicklingError):
                        self._replace(w, results, pending, RuntimeError("verification worker died"), retry=True)
                        continue
                    if not w.ready:
                        w.ready, self._failed_starts = True, 0
                        continue
                    ok, value = message
                    i, _, _ = w.chunk.popleft()
                    results[i] = value if ok else RuntimeError(value)
                    w.started = time.monotonic()
                elif time.monotonic() > w.deadline(self.timeout):
                    if not w.ready:
                        self._replace(w, results, pending, None)
                        continue
                    self.timeouts += 1
                    self._replace(w, results, pending, TIMEOUT)

    def _replace(self, w: _Worker, results: list, pending: deque, outcome, retry: bool = False) -> None:
        """Kill `w`, give its current item `outcome`, requeue the rest of its chunk, start a fresh worker.

        With `retry` (the worker died rather than overran), the current item gets one more try
        elsewhere: a worker killed from outside must not cost an honest answer its reward.
        """
        w.kill()
        if not w.ready:
            self._failed_starts += 1
            if self._failed_starts >= 3:  # not bad luck: something is wrong with the environment
                self.close_all()
                raise RuntimeError(f"verification workers fail to start (exit code {w.proc.returncode}); run `python -m ponder.rewards.verify_pool` to see its error")
        if w.chunk:
            item = w.chunk.popleft()
            if retry and item[0] not in self._retried:
                self._retried.add(item[0])
                w.chunk.appendleft(item)
            else:
                results[item[0]] = outcome
        pending.extendleft(reversed(w.chunk))
        self.workers[self.workers.index(w)] = _Worker(self.preload)

    def close_all(self) -> None:
        for w in self.workers:
            w.ask_to_stop()
        deadline = time.monotonic() + 1.0  # one grace period for all of them
        for w in self.workers:
            w.close(max(0.0, deadline - time.monotonic()))
        self.workers = []

    def close(self) -> None:
        with self._lock:
            self.close_all()


_POOL: VerifyPool | None = None
_SETTINGS = {
    "workers": int(os.environ.get("PONDER_VERIFY_WORKERS", min(4, os.cpu_count() or 1))),
    "timeout": float(os.environ.get("PONDER_VERIFY_TIMEOUT", 5.0)),
    "preload": ("ponder.rewards.math:warm",),
}
WORKER_MEMORY = 2 << 30  # address-space limit of a worker: a runaway sympy computation fails, the host lives


def configure(workers: int | None = None, timeout: float | None = None) -> None:
    """Set the number of workers and the per-item limit (seconds); takes effect on the next start."""
    if workers is not None:
        _SETTINGS["workers"] = int(workers)
    if timeout is not None:
        _SETTINGS["timeout"] = float(timeout)
    if _POOL is not None:
        _POOL.n_workers, _POOL.timeout = _SETTINGS["workers"], _SETTINGS["timeout"]


def pool() -> VerifyPool:
    global _POOL
    if _POOL is None:
        _POOL = VerifyPool(**_SETTINGS)
    return _POOL


def shutdown() -> None:
    """Stop the workers (they start again on the next call)."""
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


atexit.register(shutdown)


# ---------------------------------------------------------------- worker side


def _die_with_parent() -> None:
    """Exit when the parent goes, even in the middle of a long item (stdin EOF covers an idle worker).

    A thread polls the parent's pid; the kernel's PR_SET_PDEATHSIG is not used because it fires when
    the *thread* that spawned the worker ends, which in a threaded trainer is not the parent's death.
    """
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _call(func: str, funcs: dict, args=()):
    if func not in funcs:
        mod, name = func.split(":")
        funcs[func] = getattr(importlib.import_module(mod), name)
    return funcs[func](*args)


def _serve(preload: list[str]) -> None:
    import resource
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    _die_with_parent()
    try:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY if hard == resource.RLIM_INFINITY else min(WORKER_MEMORY, hard), hard))
    except (ValueError, OSError):
        pass
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    inp = sys.stdin.buffer.fileno()
    funcs: dict = {}
    for func in preload:
        try:
            _call(func, funcs)
        except Exception:
            pass  # the same error shows, reported, on the first real call
    _write(out, "ready")
    while True:
        try:
            batch = _read(inp)
        except EOFError:
            return
        if batch is None:
            return
        for func, args in batch:
            try:
                answer = (True, _call(func, funcs, args))
            except Exception as e:  # MemoryError and RecursionError included: report, keep serving
                answer = (False, f"{type(e).__name__}: {e}"[:500])
            # Answer item by item so the parent's clock restarts for each item of the chunk.
            _write(out, answer)


if __name__ == "__main__":
    _serve(sys.argv[1:])
