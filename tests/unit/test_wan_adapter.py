"""Wan through the model-adapter registry (adapters/wan.py) and the built-in `wan-tiny-random` pipeline: linearize
routes by adapter, a whole-volume window samples exactly what stock WanPipeline samples, small windows do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clear_cli
from clear_cli.attention.linearize import is_linearized
from clear_cli.attention.adapters import WAN, adapter_by_family, adapter_for, video_families
from clear_cli.attention.wan import ClearWanAttnProcessor

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def pipe():
    from clear_cli.models import load_pipeline

    return load_pipeline("wan-tiny-random")


def test_registry_knows_wan(pipe):
    tr = pipe.transformer
    assert adapter_for(tr) is WAN and adapter_by_family("wan") is WAN and video_families() == ["wan"]
    assert WAN.video and not adapter_for(torch.nn.Linear(1, 1))
    mods = WAN.attention_modules(tr)
    assert mods == [b.attn1 for b in tr.blocks] and len(mods) == 2
    # latent [B, C, F, H, W] with patch (1, 2, 2) -> (F, H/2, W/2)
    assert WAN.read_grid(tr, {"hidden_states": torch.zeros(1, 16, 3, 8, 10)}) == (3, 4, 5)
    with pytest.raises(ValueError, match="latent video"):
        WAN.read_grid(tr, {"hidden_states": torch.zeros(1, 16, 8)})


def test_linearize_goes_through_the_adapter(pipe):
    tr = pipe.transformer
    stock_cos = tr.rope.freqs_cos
    clear_cli.linearize(pipe, window=3, time_window=1, ntk_factor=4.0)
    try:
        assert is_linearized(pipe) and WAN.is_installed(tr)
        assert all(isinstance(b.attn1.processor, ClearWanAttnProcessor) for b in tr.blocks)
        assert not any(isinstance(b.attn2.processor, ClearWanAttnProcessor) for b in tr.blocks)
        assert WAN.rope_ntk_factor(tr) == 4.0 and not torch.equal(tr.rope.freqs_cos, stock_cos)
        with pytest.raises(ValueError, match="wan takes window, time_window"):
            clear_cli.linearize(pipe, window=3, time_window=1, keep_teacher=True)
    finally:
        clear_cli.unlinearize(pipe)
    assert not is_linearized(pipe) and WAN.rope_ntk_factor(tr) is None
    assert torch.equal(tr.rope.freqs_cos, stock_cos)
    with pytest.raises(ValueError, match="needs time_window"):
        clear_cli.linearize(pipe, window=3)


def test_whole_volume_window_samples_stock_wan_pipeline(pipe):
    from clear_cli.jobs.gen_video import sample_video

    args = dict(seed=3, frames=9, width=64, height=64, steps=2, guidance=2.0)   # guidance > 1: CFG path too
    stock = sample_video(pipe, "a red square moving left", **args)
    assert stock.shape == (9, 64, 64, 3)
    # tokens 3 x 4 x 4: every pair inside (2/4)^2 + (3^2 + 3^2)/8^2 < 1
    clear_cli.linearize(pipe, window=8, time_window=4, backend="tiled")
    try:
        whole = sample_video(pipe, "a red square moving left", **args)
        clear_cli.linearize(pipe, window=1, time_window=0)
        local = sample_video(pipe, "a red square moving left", **args)
    finally:
        clear_cli.unlinearize(pipe)
    assert np.abs(whole - stock).max() <= 1e-5
    assert np.abs(local - stock).max() > 1e-3   # a 1-token, same-frame window is not stock attention
