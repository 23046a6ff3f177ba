"""SIGTERM (a cluster scheduler's stop, `kill PID`) ends a command as Ctrl-C does, except inside a section that must
finish whole, such as a checkpoint being written: there the stop waits for the section's end.

Without a handler the process died at once, silent, and a stop in the middle of a save lost that checkpoint (or,
between removing a step-N it replaces and renaming the new one into place, both).
"""

from __future__ import annotations

import contextlib
import os
import signal


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, as Ctrl-C raises KeyboardInterrupt: the same clean-up runs on the way
    out, and no `except Exception` on the way swallows it."""


_depth = 0  # whole sections open
_pending = False  # a SIGTERM came inside one
_stopping = False  # Terminated is on its way out: a second SIGTERM must not interrupt the clean-up


@contextlib.contextmanager
def whole():
    """A section a SIGTERM does not cut: one that comes meanwhile is raised as Terminated when the section ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
    if _depth == 0 and _pending and not _stopping:
        _raise()


def handle(signum, frame) -> None:
    """The SIGTERM handler (installed by ponder.cli.main for the command's run)."""
    global _pending
    if os.getpid() != _owner:  # a forked child (a sandboxed program): it dies of it, as it did before
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    elif _depth:
        _pending = True
    elif not _stopping:
        _raise()


def leaving() -> None:
    """The command has said why it stops (an error's line, or another rank's) and is on its way out: a SIGTERM now,
    torchrun's once another rank has exited, finds nothing to stop. Raised, it cut the group's teardown with a
    traceback, or ran inside a weak reference's callback during its garbage collection ("Exception ignored in")."""
    global _stopping
    _stopping = True


def _raise():
    global _stopping, _pending
    _stopping, _pending = True, False
    raise Terminated()


@contextlib.contextmanager
def sigterm_stops():
    """SIGTERM raises Terminated while the block runs (main thread only: elsewhere the default stays)."""
    global _owner, _stopping, _pending
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _owner, _stopping, _pending = os.getpid(), False, False
    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        _stopping = True  # a SIGTERM deferred by a section that ended with the command is moot: the run is complete
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


_owner = os.getpid()
