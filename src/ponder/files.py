"""Files written whole or not at all: what a later reader (--resume, a report, a comparison) takes as finished."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    """A file written whole or not at all, as the next reader (--resume, a report) takes it: a stop (SIGTERM, Ctrl-C, a
    kill) between opening a file and writing it left it empty or cut (an empty eval_after.json was a finished evaluation,
    a cut config.yaml or stage marker a traceback). The text goes to a sibling, onto the disk (a machine that crashes
    just after the rename has the file's data, not an empty file under its name), then takes the name in one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
