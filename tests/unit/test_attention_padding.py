"""Text key padding (a [B, T] bool of valid text keys) through every CLEAR backend, against the dense reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clear_cli.attention import clear_attention, flex
from clear_cli.attention.cpu_bands import band_attention
from clear_cli.attention.kernels import MASK_ROUTE, choose_backend
from clear_cli.attention.reference import dense_mask
from clear_cli.attention.tiled import tiled_attention

# (batch, H, W, text_len, window, down_factor, padding): non-square, ragged, window 1 and over the grid, T = 0
CASES = [
    (2, 5, 7, 4, 2, 1, "some"),
    (3, 6, 8, 5, 1, 2, "all-but-one"),
    (2, 8, 8, 6, 20, 4, "some"),
    (2, 9, 13, 7, 3, 1, "mixed"),
    (1, 12, 8, 3, 4, 2, "none"),
    (2, 3, 9, 0, 2, 1, "none"),
    (2, 10, 6, 9, 5, 1, "all-but-one"),
    (1, 1, 9, 2, 2, 1, "some"),
]


def _mask(b: int, t: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.ones(b, t, dtype=torch.bool)
    if t == 0 or kind == "none":
        return m
    for i in range(b):
        if kind == "all-but-one":
            m[i] = False
            m[i, int(torch.randint(t, (1,), generator=g))] = True
        elif kind == "some":
            m[i, t - 1 - i % t:] = False     # trailing padding of different lengths per element
        else:  # mixed: a scattered pattern, and one element without padding
            m[i] = torch.rand(t, generator=g) > 0.5 if i else True
            m[i, 0] = True
    return m


def _inputs(b, h, w, t, f, seed=0, dtype=torch.float64, heads=2, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, heads, t + h * w, d, generator=g, dtype=dtype).unbind(0)
    dw = torch.rand(f, f, generator=g, dtype=dtype) if f > 1 else None
    return q, k, v, dw


def _oracle(q, k, v, t, grid, r, f, dw, mask):
    """Independent of the kernels: per element, the dense rule with padded text key columns cut."""
    from clear_cli.attention.geometry import pool_tokens, pool_weight
    outs = []
    for i in range(q.shape[0]):
        qi, ki, vi = q[i:i + 1], k[i:i + 1], v[i:i + 1]
        if f > 1:
            wt = pool_weight(dw, f, ki)
            ki = torch.cat([ki, pool_tokens(ki[:, :, t:], grid, f, wt)], 2)
            vi = torch.cat([vi, pool_tokens(vi[:, :, t:], grid, f, wt)], 2)
        m = dense_mask(grid, t, r, f).clone()
        m[:, :t] &= mask[i][None, :]
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=m))
    return torch.cat(outs)


@pytest.mark.parametrize("case", CASES)
def test_reference_and_shortcut_apply_padding(case):
    b, h, w, t, r, f, kind = case
    q, k, v, dw = _inputs(b, h, w, t, f)
    m = _mask(b, t, kind)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw, text_mask=m)
    want = _oracle(q, k, v, t, (h, w), r, f, dw, m)
    torch.testing.assert_close(clear_attention(q, k, v, backend="reference", **kw), want, atol=1e-12, rtol=0)
    if (h - 1) ** 2 + (w - 1) ** 2 < r * r:   # auto takes the exact dense shortcut
        torch.testing.assert_close(clear_attention(q, k, v, **kw), want, atol=1e-12, rtol=0)
    if kind != "none" and t:
        unmasked = clear_attention(q, k, v, backend="reference", **{**kw, "text_mask": None})
        assert (unmasked - want).abs().max() > 1e-3   # the mask changes the result


@pytest.mark.parametrize("case", CASES)
def test_tiled_and_bands_match_reference_with_padding(case):
    b, h, w, t, r, f, kind = case
    q, k, v, dw = _inputs(b, h, w, t, f, seed=1)
    m = _mask(b, t, kind, seed=1)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw, text_mask=m)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    with torch.no_grad():
        torch.testing.assert_close(band_attention(q, k, v, **kw), ref, atol=1e-10, rtol=0)
        torch.testing.assert_close(clear_attention(q, k, v, backend="tiled", **kw), ref, atol=1e-10, rtol=0)
    # the differentiable path (compacted per mask group), forward and backward
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)] + ([dw.clone().requires_grad_(True)] if f > 1 else [])
    kw_g = {**kw, "down_weight": leaves[3] if f > 1 else None}
    out = tiled_attention(*leaves[:3], **kw_g)
    ref_g = clear_attention(*leaves[:3], backend="reference", **kw_g)
    torch.testing.assert_close(out, ref_g, atol=1e-10, rtol=0)
    gout = torch.randn_like(out)
    for a, c in zip(torch.autograd.grad(out, leaves, gout), torch.autograd.grad(ref_g, leaves, gout)):
        torch.testing.assert_close(a, c, atol=1e-9, rtol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layout", ["64x64", "128x64t"])
def test_flex_mask_mod_applies_padding(case, layout):
    b, h, w, t, r, f, kind = case
    q, k, v, dw = _inputs(b, h, w, t, f, seed=2, dtype=torch.float32)
    m = _mask(b, t, kind, seed=2)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    ref = clear_attention(q, k, v, backend="reference", text_mask=m, **kw)
    out = flex.flex_attention_clear(q, k, v, layout=layout, text_mask=m if t else None, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_kernel_without_mask_support_runs_compacted(monkeypatch):
    """The triton route: the kernel is called without a mask, on each group's valid text keys only."""
    from clear_cli.attention import kernels
    calls = []

    def fake(q, k, v, **kw):
        assert "text_mask" not in kw
        calls.append((q.shape[0], kw["text_len"]))
        return clear_attention(q, k, v, backend="reference", **kw)

    monkeypatch.setattr(kernels, "_triton_kernel", lambda: fake)
    monkeypatch.setattr(kernels, "check_backend", lambda *a: None)
    q, k, v, _ = _inputs(3, 6, 7, 5, 1, seed=3)
    m = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    kw = dict(text_len=5, grid=(6, 7), window=3, text_mask=m)
    out = clear_attention(q, k, v, backend="triton", **kw)
    torch.testing.assert_close(out, clear_attention(q, k, v, backend="reference", **kw), atol=1e-12, rtol=0)
    assert sorted(calls) == [(1, 5), (2, 2)]   # two groups of equal masks, padding dropped


def test_bad_mask_and_route_reason():
    q, k, v, _ = _inputs(2, 4, 4, 3, 1)
    with pytest.raises(ValueError, match=r"text_mask must be a \[batch, text_len\] = \[2, 3\]"):
        clear_attention(q, k, v, text_len=3, grid=(4, 4), window=2, text_mask=torch.ones(2, 4, dtype=torch.bool))
    name, why = choose_backend("cpu", torch.float32, tuple(q.shape), (4, 4), 3, 2, padded=True)
    assert name == "tiled" and why.endswith("text padding: " + MASK_ROUTE["tiled"])
    assert set(MASK_ROUTE) >= {"reference", "tiled", "flex", "triton", "sdpa"}
