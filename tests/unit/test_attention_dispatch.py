"""The dispatcher: the exact whole-grid shortcut, `auto`'s per-shape fallback, and backends a device cannot run."""

from __future__ import annotations

import warnings

import pytest
import torch

from clear_cli.attention import clear_attention, kernels
from clear_cli.attention.kernels import SHORTCUT, check_backend, choose_backend, covers_grid


def _inputs(b, h, w, t, f, seed=0, dtype=torch.float64, heads=2, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, heads, t + h * w, d, generator=g, dtype=dtype).unbind(0)
    dw = torch.rand(f, f, generator=g, dtype=dtype) if f > 1 else None
    return q, k, v, dw


def test_covers_grid_is_strict():
    assert not covers_grid((4, 5), 5)        # the corner pair is at distance exactly 5: outside the circle
    assert covers_grid((4, 5), 6)
    assert covers_grid((1, 1), 1)
    assert not covers_grid((1, 2), 1)


@pytest.mark.parametrize("b, h, w, t, r, f", [(2, 4, 5, 3, 6, 1), (1, 4, 4, 0, 5, 2), (2, 8, 4, 5, 40, 4),
                                              (1, 4, 6, 1, 100, 2)])
def test_whole_grid_shortcut_is_exact_forward_and_backward(b, h, w, t, r, f):
    q, k, v, dw = _inputs(b, h, w, t, f)
    leaves = [q, k, v] + ([dw] if dw is not None else [])
    for x in leaves:
        x.requires_grad_(True)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    assert choose_backend(q.device, q.dtype, tuple(q.shape), (h, w), t, r, f)[0] == SHORTCUT
    out = clear_attention(q, k, v, **kw)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    gout = torch.randn_like(ref)
    for a, bb in zip(torch.autograd.grad(out, leaves, gout), torch.autograd.grad(ref, leaves, gout)):
        torch.testing.assert_close(a, bb, atol=1e-11, rtol=0)


def test_window_just_short_of_the_grid_is_not_shortcut():
    q, k, v, _ = _inputs(1, 4, 5, 3, 1)
    name, why = choose_backend(q.device, q.dtype, tuple(q.shape), (4, 5), 3, 5)
    assert name == "tiled" and "cpu" in why
    kw = dict(text_len=3, grid=(4, 5), window=5)
    torch.testing.assert_close(clear_attention(q, k, v, **kw), clear_attention(q, k, v, backend="reference", **kw))


def test_triton_on_cpu_without_interpreter_names_the_choices(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import sys
    mod = sys.modules.get("clear_cli.attention.triton_clear")
    if mod is not None and mod.INTERPRET:
        pytest.skip("this process defined the Triton kernels for the interpreter")
    q, k, v, _ = _inputs(1, 4, 5, 3, 1)
    with pytest.raises(ValueError) as e:
        clear_attention(q, k, v, text_len=3, grid=(4, 5), window=2, backend="triton")
    msg = str(e.value)
    assert "\n" not in msg and "triton" in msg and "auto, reference, tiled, flex" in msg
    with pytest.raises(ValueError, match="not one of"):
        check_backend("fast", "cpu")
    check_backend("tiled", "cpu")


def test_auto_falls_back_for_the_failing_shape_only(monkeypatch):
    calls = []

    def fake_triton(q, k, v, **kw):
        calls.append(kw["grid"])
        if kw["grid"] == (4, 5):
            raise RuntimeError("does not compile\nsecond line")
        return kernels._tiled(q, k, v, **kw)

    monkeypatch.setitem(kernels.AUTO_ORDER, "cpu", ("triton", "tiled"))
    monkeypatch.setitem(kernels._RUN, "triton", fake_triton)
    monkeypatch.setattr(kernels, "_usable", lambda name, *a: (True, ""))
    monkeypatch.setattr(kernels, "_BROKEN", set())
    monkeypatch.setattr(kernels, "_FALLBACKS", {})
    bad, good = _inputs(1, 4, 5, 3, 1), _inputs(1, 5, 4, 3, 1)
    kw_bad, kw_good = dict(text_len=3, grid=(4, 5), window=2), dict(text_len=3, grid=(5, 4), window=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = clear_attention(*bad[:3], **kw_bad)
            torch.testing.assert_close(out, clear_attention(*bad[:3], backend="reference", **kw_bad))
            clear_attention(*good[:3], **kw_good)
    assert calls == [(4, 5), (5, 4), (5, 4)]          # the failing shape is tried once, the other keeps triton
    msgs = [str(w.message) for w in caught if "CLEAR attention" in str(w.message)]
    assert len(msgs) == 1 and "grid 4x5" in msgs[0] and "using tiled for this shape" in msgs[0]
    assert "second line" not in msgs[0]
    q = bad[0]
    name, why = choose_backend(q.device, q.dtype, tuple(q.shape), (4, 5), 3, 2)
    assert name == "tiled" and "triton failed for this shape" in why
    assert kernels.fallback_reason(q.device, q.dtype, tuple(q.shape), (4, 5), 3, 2) == msgs[0]
    assert choose_backend(q.device, q.dtype, tuple(good[0].shape), (5, 4), 3, 2)[0] == "triton"


def test_explicit_backend_failure_propagates(monkeypatch):
    def broken(q, k, v, **kw):
        raise RuntimeError("boom")

    monkeypatch.setitem(kernels._RUN, "tiled", broken)
    q, k, v, _ = _inputs(1, 4, 5, 3, 1)
    with pytest.raises(RuntimeError, match="boom"):
        clear_attention(q, k, v, text_len=3, grid=(4, 5), window=2, backend="tiled")


def test_cli_refuses_triton_without_cuda(cli, tmp_path, monkeypatch):
    import sys
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mod = sys.modules.get("clear_cli.attention.triton_clear")
    if torch.cuda.is_available() or (mod is not None and mod.INTERPRET):
        pytest.skip("triton can run here")
    code, _, err = cli("gen", "a red circle", "--model", "tiny-random", "--device", "cpu", "--backend", "triton",
                       "--out", str(tmp_path / "out"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--backend" in err and "triton" in err and "auto, reference, tiled, flex" in err
    assert not (tmp_path / "out").exists()
    code, _, err = cli("bench", "attention", "--backends", "tiled,triton", "--device", "cpu", "--no-timing")
    assert code == 2 and "--backends" in err and "auto, reference, tiled, flex" in err
