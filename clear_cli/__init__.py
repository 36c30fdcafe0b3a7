"""clear: CLEAR local attention for pre-trained diffusion transformers (FLUX), with distillation and export.

The Python API mirrors the commands; heavy modules are imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "clear_attention": "clear_cli.attention",
    "count_pairs": "clear_cli.attention",
    "load_pipeline": "clear_cli.models",
    "save_pipeline": "clear_cli.models",
    "linearize": "clear_cli.attention.linearize",
    "unlinearize": "clear_cli.attention.linearize",
    "generate": "clear_cli.jobs.generate",
    "load_attention_weights": "clear_cli.models.weights",
    "apply_attention_weights": "clear_cli.models.weights",
    "rebase": "clear_cli.models.rebase",
    "export": "clear_cli.jobs.export",
    "synth": "clear_cli.jobs.synth",
    "evaluate": "clear_cli.jobs.evaluate",
    "distill": "clear_cli.jobs.distill",
    "demo": "clear_cli.jobs.demo",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'clear_cli' has no attribute {name!r}")


__all__ = ["__version__", *_API]
