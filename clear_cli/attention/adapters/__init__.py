"""Model adapters: one file per family of diffusion transformers (see base.py and docs/models.md).

`adapter_for(transformer)` returns the first adapter in `ADAPTERS` that matches (more specific families first);
`families()` lists their names; `adapter_by_family(name)` looks one up (ValueError listing the families).
"""

from __future__ import annotations

from torch import nn

from clear_cli.attention.adapters.base import ModelAdapter, ModelFacts
from clear_cli.attention.adapters.chroma import ChromaAdapter
from clear_cli.attention.adapters.flux import FluxAdapter
from clear_cli.attention.adapters.qwen_image import QwenImageAdapter

# Order matters: Chroma is built of FluxAttention too, so it is asked before FLUX.
ADAPTERS: tuple[ModelAdapter, ...] = (QwenImageAdapter(), ChromaAdapter(), FluxAdapter())
FLUX = ADAPTERS[-1]

__all__ = ["ADAPTERS", "FLUX", "ModelAdapter", "ModelFacts", "adapter_for", "adapter_by_family", "families"]


def families() -> list[str]:
    return [a.family for a in ADAPTERS]


def adapter_for(transformer: nn.Module) -> ModelAdapter | None:
    """The adapter of `transformer`'s family, or None when no family knows it."""
    for adapter in ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    return None


def adapter_by_family(name: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.family == name:
            return adapter
    raise ValueError(f"no model adapter for family {name!r}; families: {', '.join(families())}")
