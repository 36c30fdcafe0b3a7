"""Shared by the linearize tests: a seeded tiny FLUX transformer and its inputs on a token grid."""

from __future__ import annotations

import torch


def build_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    from clear_cli.models import tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**tiny.TRANSFORMER).eval()


def image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def inputs(batch: int = 2, grid: tuple[int, int] = (4, 6), text_len: int = 5, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    return dict(
        hidden_states=torch.randn(batch, h * w, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 64, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.rand(batch, generator=g), guidance=torch.full((batch,), 3.5),
        img_ids=image_ids(h, w), txt_ids=torch.zeros(text_len, 3),
    )
