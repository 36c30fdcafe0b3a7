"""Loading pipelines (hub id, local dir, built-in tiny FLUX) and saving them."""

from clear_cli.models.pipeline import DEFAULT_MODEL, FluxPipeline, load_pipeline, save_pipeline, text_len

__all__ = ["DEFAULT_MODEL", "FluxPipeline", "load_pipeline", "save_pipeline", "text_len"]
