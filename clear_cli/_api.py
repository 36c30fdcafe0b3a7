"""Make a job module callable, so `clear_cli.synth(...)` works whether or not `clear_cli.synth` was imported.

The Python API names the five jobs after their modules (synth, distill, evaluate, export, generate). Importing
`clear_cli.generate` binds the *module* to the package attribute, shadowing the lazily exported function;
a module whose class has `__call__` keeps `clear_cli.generate(...)` working either way.
"""

from __future__ import annotations

import sys
import types


def callable_module(module_name: str, func_name: str) -> None:
    """Calling module `module_name` calls its function `func_name` (same signature and docs)."""
    module = sys.modules[module_name]
    func = getattr(module, func_name)

    class _CallableModule(types.ModuleType):
        __doc__ = func.__doc__

        def __call__(self, *args, **kwargs):
            return getattr(self, func_name)(*args, **kwargs)

    module.__class__ = _CallableModule
