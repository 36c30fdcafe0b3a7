"""Every CLEAR backend agrees with the dense reference (forward and backward), and bad input names its numbers."""

from __future__ import annotations

import random

import pytest
import torch

from clear_cli.attention import clear_attention
from clear_cli.attention.reference import dense_mask
from clear_cli.attention.tiled import tiled_attention

# (batch, H, W, text_len, window, down_factor, tile): non-square, ragged tiles, T = 0 and odd, r = 1 and r > image
CASES = [
    (1, 5, 7, 3, 2, 1, None),
    (2, 6, 8, 0, 1, 2, None),
    (1, 8, 8, 5, 20, 4, None),
    (2, 9, 13, 7, 3, 1, (4, 8)),
    (1, 12, 8, 1, 4, 2, (8, 8)),
    (1, 20, 24, 3, 3, 1, (4, 4)),
    (1, 16, 12, 9, 5, 4, (8, 16)),
    (3, 1, 9, 2, 2, 1, None),
]


def _inputs(b, h, w, t, f, seed=0, dtype=torch.float64, heads=3, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, heads, t + h * w, d, generator=g, dtype=dtype).unbind(0)
    dw = torch.rand(f, f, generator=g, dtype=dtype) if f > 1 else None
    return q, k, v, dw


def test_dense_mask_rule():
    m = dense_mask((3, 4), text_len=2, window=2, down_factor=2)
    assert m.shape == (14, 14 + 2)
    assert m[:2, :14].all() and not m[:2, 14:].any()      # text: everything but pooled keys
    assert m[2:, :2].all() and m[2:, 14:].all()            # image: all text and pooled keys
    # image query (1, 1) = token 2 + 5: sees d^2 < 4 -> itself and its 4 neighbours (not diagonals, d^2 = 2 < 4 yes)
    seen = {(i // 4, i % 4) for i in range(12) if m[2 + 5, 2 + i]}
    assert seen == {(y, x) for y in range(3) for x in range(4) if (y - 1) ** 2 + (x - 1) ** 2 < 4}
    assert (1, 3) not in seen  # d^2 = 4 is outside (strict)


@pytest.mark.parametrize("case", CASES)
def test_tiled_matches_reference_forward_backward(case):
    b, h, w, t, r, f, tile = case
    q, k, v, dw = _inputs(b, h, w, t, f)
    leaves = [q, k, v] + ([dw] if dw is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    out = tiled_attention(q, k, v, tile=tile, **kw)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    gout = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, leaves, gout)
    g_out = torch.autograd.grad(out, leaves, gout)
    for a, bb in zip(g_out, g_ref):
        torch.testing.assert_close(a, bb, atol=1e-9, rtol=0)


def test_tiled_random_sweep_fp32():
    rng = random.Random(3)
    for i in range(10):
        h, w = rng.randint(1, 14), rng.randint(1, 14)
        f = rng.choice([1, 1, 2, 4])
        h, w = max(f, h - h % f), max(f, w - w % f)
        t, r, b = rng.choice([0, 1, 4, 7]), rng.choice([1, 2, 3, 5, 9, 30]), rng.choice([1, 2])
        q, k, v, dw = _inputs(b, h, w, t, f, seed=i, dtype=torch.float32)
        kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
        ref = clear_attention(q, k, v, backend="reference", **kw)
        for backend in ("tiled", "auto"):
            torch.testing.assert_close(clear_attention(q, k, v, backend=backend, **kw), ref, atol=1e-5, rtol=0)


def test_down_weight_shapes_and_default():
    q, k, v, _ = _inputs(1, 8, 8, 3, 2)
    kw = dict(text_len=3, grid=(8, 8), window=2, down_factor=2)
    base = clear_attention(q, k, v, backend="tiled", **kw)
    w7 = torch.full((1, 1, 1, 2, 1, 2, 1), 0.25, dtype=q.dtype)
    torch.testing.assert_close(clear_attention(q, k, v, down_weight=w7, backend="tiled", **kw), base)
    torch.testing.assert_close(clear_attention(q, k, v, down_weight=w7, backend="reference", **kw), base)


def test_window_covering_grid_equals_full_attention_for_images():
    q, k, v, _ = _inputs(2, 4, 5, 3, 1)
    out = clear_attention(q, k, v, text_len=3, grid=(4, 5), window=100, backend="tiled")
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, full)


def test_grid_from_input_not_fixed():
    # one process, several geometries in a row: cached plans must not leak between them
    for h, w, t in ((4, 6, 2), (6, 4, 2), (4, 6, 5)):
        q, k, v, _ = _inputs(1, h, w, t, 1)
        kw = dict(text_len=t, grid=(h, w), window=3)
        torch.testing.assert_close(clear_attention(q, k, v, backend="tiled", **kw),
                                   clear_attention(q, k, v, backend="reference", **kw))


@pytest.mark.parametrize("kwargs, words", [
    (dict(text_len=3, grid=(4, 4), window=2), ["sequence length 23", "grid 4x4", "19"]),
    (dict(text_len=3, grid=(4, 5), window=0), ["window", "0"]),
    (dict(text_len=3, grid=(4, 5), window=2, down_factor=3), ["down_factor 3", "4x5"]),
    (dict(text_len=3, grid=(4, 5), window=2, backend="fast"), ["backend 'fast'"]),
])
def test_bad_input_names_numbers(kwargs, words):
    q, k, v, _ = _inputs(1, 4, 5, 3, 1)
    with pytest.raises(ValueError) as e:
        clear_attention(q, k, v, **kwargs)
    for word in words:
        assert word in str(e.value)


def test_bad_tensors():
    q, k, v, _ = _inputs(1, 4, 5, 3, 1)
    kw = dict(text_len=3, grid=(4, 5), window=2)
    with pytest.raises(ValueError, match="shapes differ"):
        clear_attention(q, k[:, :2], v, **kw)
    with pytest.raises(ValueError, match="dtypes differ"):
        clear_attention(q, k.float(), v, **kw)
    with pytest.raises(ValueError, match=r"\[batch, heads, tokens, head_dim\]"):
        clear_attention(q[0], k[0], v[0], **kw)
    q2, k2, v2, _ = _inputs(1, 4, 4, 3, 2)
    with pytest.raises(ValueError, match="expected 2x2"):
        clear_attention(q2, k2, v2, text_len=3, grid=(4, 4), window=2, down_factor=2, down_weight=torch.ones(3))
