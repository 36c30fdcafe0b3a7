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
