"""Loading pipelines (hub id, local dir, built-in tiny FLUX) and saving them.

The names below load `clear_cli.models.pipeline` (and with it diffusers) on first use, so that the torch-only
modules here (`weights`, the attention-weight reader; `rope`) import without diffusers: the ComfyUI node needs them.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MODEL", "FluxPipeline", "load_pipeline", "save_pipeline", "text_len"]


def __getattr__(name: str):
    if name in __all__:
        from clear_cli.models import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'clear_cli.models' has no attribute {name!r}")
