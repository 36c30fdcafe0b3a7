"""3-D CLEAR in a tiny random WanTransformer3DModel (diffusers' test-sized config): a whole-volume window is stock
Wan, small windows agree across backends forward and backward, only self-attention changes, unlinearize restores."""

from __future__ import annotations

import pytest
import torch

import clear_cli
from clear_cli.attention.wan import ClearWanAttnProcessor, is_wan_linearized, linearize_wan, unlinearize_wan

diffusers = pytest.importorskip("diffusers")

CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
              text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(**CONFIG).eval()


def _inputs(frames=3, height=10, width=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, frames, height, width, generator=g), torch.tensor([500]),
            torch.randn(1, 7, 16, generator=g))


@pytest.mark.parametrize("backend", ["auto", "tiled", "reference"])
def test_whole_volume_window_is_stock_wan(wan, backend):
    x = _inputs()   # latent 3 x 10 x 12, patch 1x2x2 -> tokens 3 x 5 x 6
    with torch.no_grad():
        stock = wan(*x).sample
        # every pair inside: (2/4)^2 + (4^2 + 5^2)/10^2 < 1 (r = 8, r_t = 3 would not be: 1.08)
        clear_cli.linearize(wan, window=10, time_window=4, backend=backend)
        try:
            got = wan(*x).sample
        finally:
            clear_cli.unlinearize(wan)
        back = wan(*x).sample
    assert (got - stock).abs().max() <= 1e-5
    assert torch.equal(back, stock)


def test_small_windows_change_the_output_and_backends_agree(wan):
    x = _inputs(frames=4, height=8, width=14)
    with torch.no_grad():
        stock = wan(*x).sample
    outs, grads = {}, {}
    try:
        for backend in ("reference", "tiled"):
            linearize_wan(wan, window=2, time_window=1, backend=backend)
            params = [p for blk in wan.blocks for p in blk.attn1.parameters()]
            for p in wan.parameters():
                p.grad = None
            out = wan(*x).sample
            out.square().mean().backward()
            outs[backend] = out.detach()
            grads[backend] = [p.grad.clone() for p in params]
    finally:
        unlinearize_wan(wan)
        wan.zero_grad(set_to_none=True)
    assert (outs["reference"] - stock).abs().max() > 1e-2          # the window matters
    assert torch.allclose(outs["tiled"], outs["reference"], atol=1e-5)
    for a, b in zip(grads["tiled"], grads["reference"]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_same_frame_only_ignores_other_frames(wan):
    """r_t = 0: a change in frame 2 of the latent reaches frame 0's output only through cross-attention-free paths,
    i.e. not at all (patch 1 in time; FFN, norms and cross-attention are per token)."""
    x, ts, ctx = _inputs(frames=3)
    y = x.clone()
    y[:, :, 2] += 1.0
    try:
        linearize_wan(wan, window=3, time_window=0)
        with torch.no_grad():
            a, b = wan(x, ts, ctx).sample, wan(y, ts, ctx).sample
    finally:
        unlinearize_wan(wan)
    assert torch.equal(a[:, :, 0], b[:, :, 0]) and not torch.equal(a[:, :, 2], b[:, :, 2])
    with torch.no_grad():   # stock attention mixes the frames
        a, b = wan(x, ts, ctx).sample, wan(y, ts, ctx).sample
    assert not torch.equal(a[:, :, 0], b[:, :, 0])


def test_only_self_attention_changes(wan):
    try:
        clear_cli.linearize(wan, window=4, time_window=2)
        from clear_cli.attention.linearize import is_linearized
        assert is_wan_linearized(wan) and is_linearized(wan)
        assert all(isinstance(b.attn1.processor, ClearWanAttnProcessor) for b in wan.blocks)
        assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in wan.blocks)
        clear_cli.linearize(wan, window=5, time_window=0)   # again: settings replaced, one hook
        assert wan.blocks[0].attn1.processor._state.window == 5 and len(wan._forward_pre_hooks) == 1
    finally:
        clear_cli.unlinearize(wan)
    assert not is_wan_linearized(wan) and len(wan._forward_pre_hooks) == 0
    assert all(type(b.attn1.processor).__name__ == "WanAttnProcessor" for b in wan.blocks)


def test_linearize_options_are_checked(wan):
    with pytest.raises(ValueError, match="needs time_window"):
        clear_cli.linearize(wan, window=4)
    with pytest.raises(ValueError, match="window, time_window, backend and ntk_factor only"):
        clear_cli.linearize(wan, window=4, time_window=1, down_factor=2)
    with pytest.raises(ValueError, match="time_window must be"):
        clear_cli.linearize(wan, window=4, time_window=-1)
    from diffusers import FluxTransformer2DModel

    from clear_cli.models import tiny
    flux = FluxTransformer2DModel(**tiny.TRANSFORMER)
    with pytest.raises(ValueError, match="video models"):
        clear_cli.linearize(flux, window=4, time_window=1)
    assert not is_wan_linearized(wan)


def test_calling_blocks_without_the_transformer_says_why(wan):
    try:
        linearize_wan(wan, window=2, time_window=1)
        attn = wan.blocks[0].attn1
        with pytest.raises(ValueError, match="no token grid"):
            attn(torch.randn(1, 10, 24))
    finally:
        unlinearize_wan(wan)


def test_rope_ntk_factor_scales_and_restores(wan):
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    rope = wan.rope
    stock = rope.freqs_cos.clone(), rope.freqs_sin.clone()
    x = _inputs()
    try:
        clear_cli.linearize(wan, window=10, time_window=4, ntk_factor=1.0)   # factor 1: the stock tables
        assert torch.allclose(rope.freqs_cos, stock[0]) and torch.allclose(rope.freqs_sin, stock[1])
        with torch.no_grad():
            base = wan(*x).sample
        clear_cli.linearize(wan, window=10, time_window=4, ntk_factor=10.0)
        want, _ = get_1d_rotary_pos_embed(rope.t_dim, rope.max_seq_len, 100000.0, use_real=True,
                                          repeat_interleave_real=True, freqs_dtype=stock[0].dtype)
        assert torch.allclose(rope.freqs_cos[:, :rope.t_dim], want)          # theta x 10 on the frame axis
        with torch.no_grad():
            assert (wan(*x).sample - base).abs().max() > 1e-3
        clear_cli.linearize(wan, window=10, time_window=4)                   # None: stock again
        assert torch.equal(rope.freqs_cos, stock[0])
        clear_cli.linearize(wan, window=10, time_window=4, ntk_factor=4.0)
    finally:
        clear_cli.unlinearize(wan)
    assert torch.equal(rope.freqs_cos, stock[0]) and torch.equal(rope.freqs_sin, stock[1])
