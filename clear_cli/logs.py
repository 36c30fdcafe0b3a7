"""The one-line progress callbacks the Python API takes (`log=`), shared by every job module."""

from __future__ import annotations

import warnings
from typing import Callable

Log = Callable[[str], None]


def sayer(log: Log | None) -> Log:
    """The caller's log, or one that keeps quiet."""
    return log if log is not None else _quiet


def _quiet(_msg: str) -> None:
    pass


def warner(log: Log | None) -> Log:
    """Warnings go to the caller's log as `warning: ...` lines, or to `warnings.warn` when there is no log."""
    def warn(msg: str) -> None:
        if log is None:
            warnings.warn(msg, stacklevel=3)
        else:
            log(f"warning: {msg}")
    return warn


NOT_A_TERMINAL_INTERVAL = 30.0  # seconds between progress lines in a CI log, a pipe or nohup.out


def progress_bar(*args, **kw):
    """tqdm, as every job's progress bar: on a terminal as usual; when its stream is not a terminal (a pipe, CI, a
    log file) at most one update every 30 s, so a log holds a few lines rather than every frame."""
    import sys

    from tqdm.auto import tqdm

    stream = kw.get("file") or sys.stderr
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty:
        kw["mininterval"] = max(float(kw.get("mininterval") or 0.1), NOT_A_TERMINAL_INTERVAL)
        kw["dynamic_ncols"] = False
        kw.setdefault("ncols", 100)
    return tqdm(*args, **kw)
