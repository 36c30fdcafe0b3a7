"""Optional dependencies: every import of an extra goes through `require`, which answers a missing one with the
`pip install` line that brings it (one line on stderr, not a ModuleNotFoundError traceback)."""

from __future__ import annotations

import importlib
from types import ModuleType

from clear_cli.errors import ClearError

# module -> the pip requirement that provides it (an extra of ours where there is one)
EXTRAS = {
    "torchmetrics": "clear-dit[eval]",
    "scipy": "clear-dit[eval]",
    "prodigyopt": "clear-dit[prodigy]",
    "tensorboard": "tensorboard",
    "wandb": "wandb",
}


class MissingExtra(ClearError):
    """An optional package is not installed; the hint is the pip line."""


def install_line(module: str) -> str:
    return f"pip install '{EXTRAS.get(module.split('.')[0], module.split('.')[0])}'"


def require(module: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or one MissingExtra naming `purpose` and the pip line."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the package is there but one of its own imports is broken: not ours to hide
        raise MissingExtra(f"{purpose} needs the optional package {top}, which is not installed",
                           install_line(top)) from None


def available(module: str) -> bool:
    """Whether an optional package can be imported (checks before a run, without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
