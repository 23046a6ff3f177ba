"""Files written whole or not at all: what a later reader (--resume, a report, a comparison) takes as finished."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ponder.errors import UserError


def write_atomic(path: str | Path, text: str) -> None:
    """A file written whole or not at all, as the next reader (--resume, a report) takes it: a stop (SIGTERM, Ctrl-C, a
    kill) between opening a file and writing it left it empty or cut (an empty eval_after.json was a finished evaluation,
    a cut config.yaml or stage marker a traceback). The text goes to a sibling, onto the disk (a machine that crashes
    just after the rename has the file's data, not an empty file under its name), then takes the name in one rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # (a full disk or an immutable file left the sibling behind)
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename = str(path)  # the file meant, not its sibling (gone now), nor none (a write's own error)
        raise


def text_encoding(path: str | Path) -> str:
    """How to read a user's text file: UTF-16 where it starts with UTF-16's byte-order mark (what Windows PowerShell's
    `>` and Notepad's "Unicode" write), else UTF-8, a leading BOM dropped (Notepad's and Excel's UTF-8)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return "utf-16" if head in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"


def not_text(path: str | Path, e: UnicodeDecodeError, line: int | None = None) -> UserError:
    """The one line for a file that is not text in its encoding: where, the byte, and the fix."""
    at = f"{path}:{line}" if line is not None else f"'{path}'"
    return UserError(f"{at}: not {e.encoding.upper().replace('-SIG', '')} text (byte 0x{e.object[e.start]:02x}); save the file as UTF-8")


def read_user_text(path: str | Path) -> str:
    """A user's whole text file (a recipe), decoded as text_encoding says; a file that is not text is one line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode(text_encoding(path))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1 if e.encoding.startswith("utf-8") else None
        raise not_text(path, e, line) from None


def blocking_file(path: str | Path) -> Path | None:
    """The file that stands where `path` or one of its parent directories would be (None: nothing in the way)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def blocked(path: str | Path, key: str) -> UserError:
    return UserError(f"{key} '{path}' cannot be a directory: '{blocking_file(path) or path}' is a file; choose another {key}")


def make_dir(path: str | Path, key: str) -> Path:
    """mkdir -p, or one line naming the setting `key` where a file stands in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise blocked(path, key) from None
    return path


def writable_dir(path: str | Path, key: str) -> Path:
    """make_dir, then a file tried in it: a read-only directory (or one of another user) is one line now, not a
    traceback at the first write (after a model has loaded, or a whole training)."""
    path = make_dir(path, key)
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise UserError(f"{key} '{path}' cannot be written: {e.strerror}; fix its permissions or choose another {key}") from None
    return path


def check_writable(path: str | Path, key: str) -> None:
    """One line now, before the work whose results go to `path` (a directory made later, or a file in one): a file
    where a directory must be, or a directory that cannot be written (a file tried in the nearest one that exists).
    Makes nothing."""
    if (blocker := blocking_file(path)) is not None:
        raise UserError(f"{key} '{path}' cannot be written: '{blocker}' is a file, not a directory; choose another {key}")
    here = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists())
    why = None if os.access(here, os.W_OK | os.X_OK) else "read-only or not yours"
    if why is None:  # root passes os.access where an immutable directory or a read-only mount still refuses
        try:
            tempfile.TemporaryFile(dir=here).close()
        except OSError as e:
            why = e.strerror
    if why is not None:
        raise UserError(f"{key} '{path}' cannot be written ('{here}': {why}); fix its permissions or choose another {key}")


def unwritable(path: str | Path) -> Path | None:
    """The directory that keeps `path` from being written (itself or, not there yet, the nearest one above it that is,
    where it would be made), or None. Read-only file systems refuse root too."""
    for p in (Path(path), *Path(path).absolute().parents):
        if p.is_dir():
            return None if os.access(p, os.W_OK | os.X_OK) else p
    return None


def replace_dir(tmp: Path, final: Path) -> None:
    """The written directory `tmp` renamed to `final`, its files on disk first (a machine that crashes just after the
    rename has their data). An old `final` is set aside (TMP-replaced) and removed after the new one took its name: a
    kill between the two renames leaves it whole beside the new one (checkpoint.restore_replaced puts a step-N back)."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = tmp.with_name(tmp.name + "-replaced") if final.exists() else None
    if old is not None:
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(directory: Path) -> None:
    """A directory's entries (a rename) on disk."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
