"""Model adapters: one file per family of diffusion transformers (see base.py and docs/models.md).

`adapter_for(transformer)` returns the first adapter in `ADAPTERS` (image families, more specific first) or
`VIDEO_ADAPTERS` that matches; `families()` lists the image families, `video_families()` the video ones;
`adapter_by_family(name)` looks one up in either (ValueError listing them).
"""

from __future__ import annotations

from torch import nn

from clear_cli.attention.adapters.base import ModelAdapter, ModelFacts, VideoAdapter
from clear_cli.attention.adapters.chroma import ChromaAdapter
from clear_cli.attention.adapters.flux import FluxAdapter
from clear_cli.attention.adapters.qwen_image import QwenImageAdapter
from clear_cli.attention.adapters.wan import WanAdapter

# Order matters: Chroma is built of FluxAttention too, so it is asked before FLUX.
ADAPTERS: tuple[ModelAdapter, ...] = (QwenImageAdapter(), ChromaAdapter(), FluxAdapter())
FLUX = ADAPTERS[-1]
VIDEO_ADAPTERS: tuple[VideoAdapter, ...] = (WanAdapter(),)
WAN = VIDEO_ADAPTERS[0]

__all__ = ["ADAPTERS", "FLUX", "VIDEO_ADAPTERS", "WAN", "ModelAdapter", "ModelFacts", "VideoAdapter", "adapter_for",
           "adapter_by_family", "families", "video_families", "all_families"]


def families() -> list[str]:
    """The image families."""
    return [a.family for a in ADAPTERS]


def video_families() -> list[str]:
    return [a.family for a in VIDEO_ADAPTERS]


def all_families() -> list[str]:
    return families() + video_families()


def adapter_for(transformer: nn.Module) -> ModelAdapter | None:
    """The adapter of `transformer`'s family, or None when no family knows it."""
    for adapter in (*ADAPTERS, *VIDEO_ADAPTERS):
        if adapter.matches(transformer):
            return adapter
    return None


def adapter_by_family(name: str) -> ModelAdapter:
    for adapter in (*ADAPTERS, *VIDEO_ADAPTERS):
        if adapter.family == name:
            return adapter
    raise ValueError(f"no model adapter for family {name!r}; families: {', '.join(families())}; "
                     f"video: {', '.join(video_families())}")
