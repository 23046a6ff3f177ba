"""Where the figures of a run go: metrics.jsonl, samples.jsonl, TensorBoard and the console."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

DEFAULT_REFLECTION_WORDS = ("wait", "verify", "check", "mistake", "however", "recheck")


def reflection_pattern(words) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def reflection_rate(texts: list[str], words=DEFAULT_REFLECTION_WORDS) -> float:
    """Share of texts with at least one reflection word (the R1 paper's 'wait', 'check', ...)."""
    if not texts:
        return 0.0
    pat = reflection_pattern(words)
    return sum(1 for t in texts if pat.search(t)) / len(texts)


def mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    """Appends one JSON line per step; mirrors scalars to TensorBoard. Resumable (truncates later steps)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True, enabled: bool = True):
        self.run_dir, self.enabled = run_dir, enabled
        if not enabled:  # ranks other than 0 of a data-parallel run write nothing
            return
        self.metrics_path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        if resume_step is not None:  # steps after the checkpoint will be recomputed
            for path in (self.metrics_path, self.samples_path):
                _truncate_after(path, resume_step)
        self._metrics = self.metrics_path.open("a", encoding="utf-8")
        self._samples = self.samples_path.open("a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # TensorBoard is optional; metrics.jsonl holds everything
                self.tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
            self.tb.flush()

    def samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        for r in rows:
            self._samples.write(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n")
        self._samples.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._metrics.close()
        self._samples.close()
        if self.tb is not None:
            self.tb.close()


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows
