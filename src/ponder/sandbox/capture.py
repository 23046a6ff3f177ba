"""Run one child process with a wall-clock deadline, capped output and a private report pipe."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Finished:
    returncode: int
    stdout: bytes
    stderr: bytes
    report: bytes
    killed: str | None  # "timeout" or "output" when the run was cut short
    seconds: float


def run_captured(
    argv_for: Callable[[int], list[str]],
    stdin: bytes,
    timeout: float,
    max_output: int,
    env: dict[str, str],
    cwd: str | None = None,
    max_report: int = 4 << 20,
) -> Finished:
    """Run `argv_for(report_fd)`; the child writes its report to that fd, which nothing else holds.

    The whole process group is killed at the deadline, when stdout or stderr pass `max_output`
    bytes, and in any case once the child is done, so nothing it started outlives the run.
    """
    start = time.monotonic()
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen(
            argv_for(report_w), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=(report_w,), start_new_session=True, env=env, cwd=cwd,
        )  # fmt: skip
    finally:
        os.close(report_w)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), report_r: bytearray()}
    caps = {out_fd: max_output, err_fd: max_output, report_r: max_report}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    sel.register(stdin_fd, selectors.EVENT_WRITE)
    pending = memoryview(stdin)
    deadline = start + timeout
    drain_until = None  # set once the grader is done: stragglers get a moment to flush, no more
    killed = None
    open_reads = len(bufs)
    try:
        while open_reads:
            now = time.monotonic()
            stop = min(deadline, drain_until) if drain_until else deadline
            if now >= stop:
                killed = "timeout" if drain_until is None else None
                break
            for key, _ in sel.select(stop - now):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        n = os.write(fd, pending[:65536])
                    except (BrokenPipeError, BlockingIOError) as e:
                        n = 0 if isinstance(e, BlockingIOError) else len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    open_reads -= 1
                    if fd == report_r and drain_until is None:
                        drain_until = time.monotonic() + 0.2
                    continue
                buf = bufs[fd]
                room = caps[fd] - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    killed = "output"
                    break
            if killed:
                break
    finally:
        sel.close()
        _kill_group(proc)
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if not f.closed:
                f.close()
        os.close(report_r)
    seconds = time.monotonic() - start
    return Finished(proc.returncode, bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[report_r]), killed, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
