"""Synth datasets: prompts, the on-disk layout (manifest, shards, card), resume/verify, and a reader.

`SynthDataset(dir)` and `dataset_card(dir)` are what training reads; docs/dataset.md describes the format.
Names are imported on first use so that `clear --help` never pays for torch.
"""

from __future__ import annotations

_EXPORTS = {
    "SynthDataset": "clear_cli.data.reader",
    "dataset_card": "clear_cli.data.reader",
    "model_latents": "clear_cli.data.reader",
    "builtin_prompts": "clear_cli.data.prompts",
    "load_prompts": "clear_cli.data.prompts",
    "parse_res": "clear_cli.data.layout",
    "sample_seed": "clear_cli.data.layout",
    "find_images": "clear_cli.data.images",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'clear_cli.data' has no attribute {name!r}")


__all__ = list(_EXPORTS)
