"""The forward-only CPU band path agrees with the dense reference, and `tiled` routes to it only without autograd."""

from __future__ import annotations

import random

import pytest
import torch

import clear_cli.attention.cpu_bands as cpu_bands
from clear_cli.attention import clear_attention
from clear_cli.attention.cpu_bands import band_attention, band_plan, band_work
from clear_cli.attention.tiled import tiled_attention

# (batch, H, W, text_len, window, down_factor, tile): interior and border tile runs, ragged edge tiles, T = 0 and odd,
# r = 1, r larger than the image, pooled keys with and without text, tiles taller/wider than the grid
CASES = [
    (1, 24, 19, 5, 4, 1, (2, 8)),
    (2, 20, 16, 0, 3, 2, (4, 8)),
    (1, 16, 16, 7, 5, 4, None),
    (1, 9, 13, 3, 1, 1, (3, 5)),
    (2, 6, 10, 1, 30, 2, (4, 8)),
    (1, 1, 9, 2, 2, 1, None),
    (1, 12, 12, 0, 2, 1, (1, 1)),
    (3, 5, 3, 4, 6, 1, (8, 16)),
]


def _inputs(b, h, w, t, f, seed=0, dtype=torch.float64, heads=3, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, heads, t + h * w, d, generator=g, dtype=dtype).unbind(0)
    dw = torch.rand(f, f, generator=g, dtype=dtype) if f > 1 else None
    return q, k, v, dw


@pytest.mark.parametrize("case", CASES)
def test_band_matches_reference(case):
    b, h, w, t, r, f, tile = case
    q, k, v, dw = _inputs(b, h, w, t, f)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    out = band_attention(q, k, v, tile=tile, **kw)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_band_random_sweep_fp32_and_scale():
    rng = random.Random(11)
    for i in range(12):
        f = rng.choice([1, 1, 2, 4])
        h, w = rng.randint(1, 18), rng.randint(1, 18)
        h, w = max(f, h - h % f), max(f, w - w % f)
        t, r = rng.choice([0, 1, 6]), rng.choice([1, 2, 3, 7, 12, 40])
        q, k, v, dw = _inputs(rng.choice([1, 2]), h, w, t, f, seed=i, dtype=torch.float32)
        kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw, scale=0.3)
        ref = clear_attention(q, k, v, backend="reference", **kw)
        torch.testing.assert_close(band_attention(q, k, v, **kw), ref, atol=1e-5, rtol=0)


def test_tiled_uses_bands_only_without_autograd(monkeypatch):
    calls = []
    real = cpu_bands.band_attention
    monkeypatch.setattr(cpu_bands, "band_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, _ = _inputs(1, 12, 10, 3, 1)
    kw = dict(text_len=3, grid=(12, 10), window=4)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    with torch.no_grad():
        torch.testing.assert_close(clear_attention(q, k, v, backend="auto", **kw), ref)
    assert calls == [1]
    # training: the differentiable path, gradients as the reference's
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = tiled_attention(*leaves, **kw)
    assert calls == [1] and out.grad_fn is not None
    ref = clear_attention(*leaves, backend="reference", **kw)
    gout = torch.randn_like(ref)
    for a, bb in zip(torch.autograd.grad(out, leaves, gout), torch.autograd.grad(ref, leaves, gout)):
        torch.testing.assert_close(a, bb, atol=1e-9, rtol=0)


def test_scratch_buffers_do_not_leak_between_geometries():
    # the same geometry twice (reused, zero-framed scratch), others in between, and inference mode vs no_grad
    runs = [((12, 16), 3, 5), ((16, 12), 3, 5), ((12, 16), 3, 5), ((12, 16), 0, 2), ((12, 16), 3, 5)]
    for i, ((h, w), t, r) in enumerate(runs):
        q, k, v, _ = _inputs(1, h, w, t, 1, seed=i)
        kw = dict(text_len=t, grid=(h, w), window=r)
        ctx = torch.inference_mode() if i == 2 else torch.no_grad()
        with ctx:
            out = band_attention(q, k, v, **kw)
        torch.testing.assert_close(out, clear_attention(q, k, v, backend="reference", **kw), atol=1e-10, rtol=0)


def test_bf16_runs_close_to_fp32():
    q, k, v, _ = _inputs(1, 16, 16, 5, 1, dtype=torch.float32, heads=2, d=16)
    kw = dict(text_len=5, grid=(16, 16), window=4)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    out = band_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


def test_plan_runs_and_work_count():
    plan = band_plan((32, 32), 5, (2, 8), torch.device("cpu"))
    # pad 4 rows: tile rows 0-1 and 14-15 are border runs around one interior run
    assert plan.segments == ((0, 2), (2, 14), (14, 16))
    assert plan.halo == (10, 16)
    total, img = band_work((32, 32), 7, 5)
    assert img == 32 * 32 * 10 * 16
    assert total == 7 * (7 + 1024) + 1024 * 7 + img


def test_diffusers_layout_inputs():
    # diffusers hands over [B, N, heads, d] tensors transposed to [B, heads, N, d] (non-contiguous)
    x = torch.randn(3, 2, 5 + 12 * 10, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    q, k, v = (t.transpose(1, 2) for t in x.unbind(0))
    kw = dict(text_len=5, grid=(12, 10), window=4, down_factor=2)
    torch.testing.assert_close(band_attention(q, k, v, **kw), clear_attention(q, k, v, backend="reference", **kw),
                               atol=1e-10, rtol=0)
