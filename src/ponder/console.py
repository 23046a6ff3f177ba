"""The console ponder's commands print to."""

from __future__ import annotations

from rich.console import Console


def make_console() -> Console:
    """Markup off: paths, run, task and model names are text (a run named `sweep[lr=3e-3]` lost its brackets, read as
    a style). Wide where the output is a log, not a terminal (rich's 80 columns cut the progress line's times off)."""
    probe = Console()
    return Console(markup=False, width=None if probe.is_terminal else max(probe.width, 160))
