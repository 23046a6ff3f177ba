"""User data as JSONL: one example per line with `prompt` and `answer` (plus any metadata columns)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ponder.errors import UserError
from ponder.files import read_user_text, text_encoding
from ponder.tasks import Task, answer_text, path_fix, register, setting


def read_jsonl(path: str | Path, required: tuple[str, ...] = ("prompt",), with_lines: bool = False,
               key: str | None = None) -> list:
    """The rows of a JSONL file (with their line numbers: (line, row) pairs); `required` fields must be
    present and neither null nor empty. `key`: the setting that named the file, for the error (a task's path)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"data file '{path}' is a directory; give a JSONL file in {key or setting('path')}")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative paths are from the working directory, {Path.cwd()})"
        raise UserError(f"data file '{path}' not found{where}; check {key or setting('path')}")
    try:
        return _rows(path, required, with_lines)
    except UnicodeDecodeError:  # found a chunk ahead of the line read: the whole file's decoding says where
        read_user_text(path)
        raise


def _rows(path: Path, required: tuple[str, ...], with_lines: bool) -> list:
    rows = []
    with path.open(encoding=text_encoding(path)) as f:  # (UTF-16 from PowerShell; a UTF-8 BOM is no part of line 1)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: each line must be a JSON object")
            missing = [k for k in required if k not in row]
            if missing:
                raise UserError(f"{path}:{lineno}: row has no '{missing[0]}' field; every row needs {', '.join(required)}")
            empty = [k for k in required if empty_value(row[k])]
            if empty:
                raise UserError(f"{path}:{lineno}: row has {no_value(row[empty[0]])} '{empty[0]}' field; every row needs "
                                f"{', '.join(required)}")
            part = next(((k, i) for k in required if isinstance(row[k], list)
                         for i, v in enumerate(row[k], 1) if empty_value(v)), None)
            if part:  # (the parts are joined by ", ": ["Paris", ""] would be the gold "Paris, ")
                raise UserError(f"{path}:{lineno}: row's '{part[0]}' list has an empty part (item {part[1]}); "
                                "fill it in or remove it")
            rows.append((lineno, row) if with_lines else row)
    return rows


def empty_value(value) -> bool:
    """null, NaN (a missing value as pandas writes one; its text "nan" would be a gold answer), a string of nothing
    but spaces, an empty object, or a list of none but such: no value (0 and False are values)."""
    if isinstance(value, list):
        return all(map(empty_value, value))
    return (value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())
            or (isinstance(value, dict) and not value))


def no_value(value) -> str:
    """What kind of empty value is: 'a null', 'a NaN' or 'an empty'."""
    return "a null" if value is None else "a NaN" if isinstance(value, float) else "an empty"


@register
class JsonlTask(Task):
    """Rows with `prompt` and `answer`; answers are compared by numeric or mathematical equivalence."""

    name = "jsonl"

    def load(self, split="train", n=None, seed=0, path=None, **_):
        if path is None:
            raise UserError(f"task 'jsonl' needs a path: {path_fix('jsonl')}")
        rows = []
        for line, row in read_jsonl(path, required=("prompt", "answer"), with_lines=True):
            try:
                row["answer"] = answer_text(row["answer"])
            except UserError as e:
                raise UserError(f"{path}:{line}: {e}") from None
            row["task"] = "jsonl"
            rows.append(row)
        return rows[:n] if n else rows
