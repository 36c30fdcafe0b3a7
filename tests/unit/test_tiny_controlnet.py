"""The tiny ControlNet (clear_cli/tiny/controlnet.py): grey control images, a short seeded training run that moves
the zero-initialised control projections and saves a folder stock diffusers loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clear_cli.tiny.controlnet import grey, train_controlnet


def test_grey_is_luminance_in_three_channels():
    x = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    g = grey(x)
    assert g.shape == x.shape and np.allclose(g[..., 0], g[..., 2])
    assert np.allclose(g[..., 0], 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2], atol=1e-6)


@pytest.mark.slow
def test_short_training_saves_a_loadable_controlnet(tmp_path):
    from diffusers import FluxControlNetModel

    info = train_controlnet(tmp_path / "cn", steps=3, batch=2, scenes=4, base="tiny-random")
    cn = FluxControlNetModel.from_pretrained(str(tmp_path / "cn"))
    assert len(cn.transformer_blocks) == 1 and len(cn.single_transformer_blocks) == 1
    # diffusers starts the control projections at zero; training moved them
    assert float(cn.controlnet_x_embedder.weight.abs().sum()) > 0
    assert float(cn.controlnet_blocks[0].weight.abs().sum()) > 0
    assert len(info["config"]) and info["loss_first_20"] > 0 and torch.isfinite(torch.tensor(info["loss_last_20"]))
