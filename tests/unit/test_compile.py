"""The compiled step: the linearized tiny FLUX compiles block by block with fullgraph=True (no graph break), two
calls of one shape do not recompile, outputs match eager; `--compile` modes, the auto threshold and the fallback.

The default suite traces with the `aot_eager` backend (dynamo and AOTAutograd, no code generation: the graph-break
and recompile checks are dynamo's; `eager` where only the logic around it is tested); a slow test runs inductor's
CPU backend end to end.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.utils import counters

import clear_cli
from clear_cli.errors import ClearError, UsageError
from clear_cli.models import compile as comp
from tiny_flux_inputs import inputs


@pytest.fixture
def transformer():
    from clear_cli.models import load_pipeline

    dynamo.reset()
    tr = load_pipeline("tiny-random").transformer
    yield tr
    comp.uncompile_transformer(tr)
    dynamo.reset()


def _eager(tr, x):
    with torch.no_grad():
        return tr(**x).sample


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("window, down_factor, grid, text_len", [(2, 1, (4, 6), 5), (3, 2, (6, 4), 7)])
def test_clear_flux_compiles_fullgraph_without_recompiling(transformer, window, down_factor, grid, text_len):
    tr = transformer
    clear_cli.linearize(tr, window=window, down_factor=down_factor)
    x1, x2 = inputs(2, grid, text_len, seed=1), inputs(2, grid, text_len, seed=2)
    want1, want2 = _eager(tr, x1), _eager(tr, x2)
    clear_cli.unlinearize(tr)
    stock = _eager(tr, x1)
    clear_cli.linearize(tr, window=window, down_factor=down_factor)
    assert (want1 - stock).abs().max() > 1e-4   # the window is small enough that CLEAR differs from stock

    counters.clear()
    state = comp.compile_transformer(tr, "on", backend="aot_eager")
    assert state is not None and state.mode == "on"
    got1 = _eager(tr, x1)
    frames = counters["stats"]["unique_graphs"]
    assert _graph_breaks() == 0 and 2 <= frames <= 3   # double, single (+ the single block's strided first input)
    with dynamo.config.patch(error_on_recompile=True):
        got2 = _eager(tr, x2)
    assert counters["stats"]["unique_graphs"] == frames and _graph_breaks() == 0
    assert state.calls == {"compiled": 2, "eager": 0}
    torch.testing.assert_close(got1, want1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2, want2, atol=1e-5, rtol=1e-5)


def test_teacher_and_capture_passes_trace_too(transformer):
    """Distillation's passes (teacher mode, attention capture) run through the same compiled blocks."""
    from clear_cli.attention.linearize import capture_attention, teacher_mode

    tr = transformer
    clear_cli.linearize(tr, window=2, keep_teacher=True)
    x = inputs(1, (4, 6), 5)
    with torch.no_grad(), teacher_mode(tr):
        want_teacher = tr(**x).sample
    with torch.no_grad(), capture_attention(tr, [1, 2]) as cap_eager:
        want = tr(**x).sample
    comp.compile_transformer(tr, "on", backend="eager")
    with torch.no_grad(), teacher_mode(tr):
        torch.testing.assert_close(tr(**x).sample, want_teacher, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), capture_attention(tr, [1, 2]) as cap:
        torch.testing.assert_close(tr(**x).sample, want, atol=1e-5, rtol=1e-5)
    assert sorted(cap) == sorted(cap_eager) == [1, 2]
    for i in cap:
        torch.testing.assert_close(cap[i], cap_eager[i], atol=1e-5, rtol=1e-5)
    assert _graph_breaks() == 0


def test_modes_and_bad_values(transformer):
    tr = transformer
    for bad in ("yes", "maybe", ""):
        with pytest.raises(UsageError, match="auto, on, off") as e:
            comp.compile_transformer(tr, bad)
        assert e.value.exit_code == 2
    assert comp.check_compile(" ON ") == "on"
    assert comp.compile_transformer(tr, "auto") is None        # CPU: auto is off
    assert comp.compile_transformer(tr, "off") is None
    state = comp.compile_transformer(tr, "on", backend="eager")
    assert all(b._compiled_call_impl is not None for b in state.blocks)
    assert len(state.blocks) == tr.config.num_layers + tr.config.num_single_layers
    comp.compile_transformer(tr, "off")
    assert all(b._compiled_call_impl is None for b in state.blocks) and not hasattr(tr, comp.STATE_ATTR)
    assert "off" in comp.describe(None) and "on" in comp.describe(state)


def test_auto_compiles_from_the_threshold_only(transformer, monkeypatch):
    """auto: calls below the image-token threshold run eager, larger ones compiled (the device check is CUDA's)."""
    tr = transformer
    clear_cli.linearize(tr, window=2)
    monkeypatch.setattr(comp, "_device_type", lambda tr: "cuda")
    state = comp.compile_transformer(tr, "auto", backend="eager", min_tokens=30)
    assert "auto" in comp.describe(state)
    small, large = inputs(1, (4, 6), 5), inputs(1, (6, 6), 5)
    want_small, want_large = (comp.uncompile_transformer(tr), _eager(tr, small), _eager(tr, large))[1:]
    state = comp.compile_transformer(tr, "auto", backend="eager", min_tokens=30)
    counters.clear()
    torch.testing.assert_close(_eager(tr, small), want_small, atol=1e-5, rtol=1e-5)
    assert state.calls == {"compiled": 0, "eager": 1} and counters["stats"]["unique_graphs"] == 0
    torch.testing.assert_close(_eager(tr, large), want_large, atol=1e-5, rtol=1e-5)
    assert state.calls == {"compiled": 1, "eager": 1} and counters["stats"]["unique_graphs"] >= 2


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_compile_failure_falls_back_under_auto_and_fails_under_on(transformer, monkeypatch):
    tr = transformer
    clear_cli.linearize(tr, window=2)
    x = inputs(1, (4, 6), 5)
    want = _eager(tr, x)
    monkeypatch.setattr(comp, "_device_type", lambda tr: "cuda")
    said: list[str] = []
    state = comp.compile_transformer(tr, "auto", backend=_failing_backend, min_tokens=1, warn=said.append)
    torch.testing.assert_close(_eager(tr, x), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_eager(tr, x), want, atol=1e-6, rtol=1e-6)
    assert state.failed and len(said) == 1 and said[0].startswith("torch.compile failed")
    assert state.calls["eager"] >= 1
    dynamo.reset()
    comp.compile_transformer(tr, "on", backend=_failing_backend)
    with pytest.raises(ClearError, match="torch.compile of the .* blocks failed") as e:
        _eager(tr, x)
    assert "--compile off" in e.value.hint


def test_compiled_context_leaves_the_model_as_it_came(transformer):
    tr = transformer
    with comp.compiled(tr, "on") as state:
        assert getattr(tr, comp.STATE_ATTR) is state
        with comp.compiled(tr, "on") as inner:          # a job inside a job (eval -> gen): kept as is
            assert inner is state
        assert getattr(tr, comp.STATE_ATTR) is state
        with comp.compiled(tr, "off") as off:
            assert off is None and not hasattr(tr, comp.STATE_ATTR)
        assert getattr(tr, comp.STATE_ATTR).mode == "on"   # the outer mode is back
    assert not hasattr(tr, comp.STATE_ATTR)
    assert all(b._compiled_call_impl is None for b in state.blocks)
    with pytest.raises(UsageError):
        with comp.compiled(tr, "sometimes"):
            pass


@pytest.mark.slow
def test_inductor_cpu_step_matches_eager(transformer):
    """The real thing on CPU: inductor's C++ code for the linearized tiny FLUX (about a minute on 2 cores)."""
    tr = transformer
    clear_cli.linearize(tr, window=2, down_factor=2)
    x1, x2 = inputs(2, (6, 8), 5, seed=1), inputs(2, (6, 8), 5, seed=2)
    want1, want2 = _eager(tr, x1), _eager(tr, x2)
    counters.clear()
    comp.compile_transformer(tr, "on")
    got1 = _eager(tr, x1)
    with dynamo.config.patch(error_on_recompile=True):
        got2 = _eager(tr, x2)
    assert _graph_breaks() == 0
    torch.testing.assert_close(got1, want1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)


def test_whole_model_compile_and_chunked_tiles_trace(transformer, monkeypatch):
    """Several attention calls in one graph (the whole forward compiled at once, four calls of one geometry) and a
    tiled kernel cut into many chunks (one mask constant each) trace too: constants never collide."""
    from clear_cli.attention import tiled

    tr = transformer
    monkeypatch.setattr(tiled, "CHUNK_BYTES", 1)   # one tile per chunk
    clear_cli.linearize(tr, window=2)
    x = inputs(1, (4, 6), 5)
    want = _eager(tr, x)
    counters.clear()
    forward = tr.forward
    tr.forward = torch.compile(forward, fullgraph=True, backend="aot_eager")   # the pre-hook stays eager
    try:
        torch.testing.assert_close(_eager(tr, x), want, atol=1e-5, rtol=1e-5)
    finally:
        tr.forward = forward
    assert _graph_breaks() == 0 and counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
def test_training_step_compiled_matches_eager(transformer):
    """Distillation's step compiled: gradient checkpointing, a teacher pass and captured attention, then backward;
    the trained parameters get the same gradients as eager (~45 s: AOT traces the backward too)."""
    from clear_cli.attention.linearize import capture_attention, teacher_mode, trainable_attention_parameters

    tr = transformer
    clear_cli.linearize(tr, window=2, down_factor=2, keep_teacher=True)
    params = trainable_attention_parameters(tr, freeze_others=True)
    tr.enable_gradient_checkpointing()
    x = inputs(2, (4, 6), 5)

    def step():
        for p in params.values():
            p.grad = None
        with torch.no_grad(), teacher_mode(tr), capture_attention(tr, [2]) as t_cap:
            t_out = tr(**x).sample
        with capture_attention(tr, [2]) as s_cap:
            s_out = tr(**x).sample
        loss = (s_out - t_out).square().mean() + (s_cap[2] - t_cap[2]).square().mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in params.items()}

    want = step()
    comp.compile_transformer(tr, "on", backend="aot_eager")
    got = step()
    assert _graph_breaks() == 0 and set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_cuda_compiled_step_matches_eager(backend):
    """On CUDA the compiled blocks run the GPU kernel inside the graph (inductor), fp32, no recompile."""
    from clear_cli.models import load_pipeline

    dynamo.reset()
    tr = load_pipeline("tiny-random").transformer.to("cuda")
    clear_cli.linearize(tr, window=3, down_factor=2, backend=backend)
    x1, x2 = ({k: v.to("cuda") for k, v in inputs(2, (16, 24), 7, seed=s).items()} for s in (1, 2))
    want1, want2 = _eager(tr, x1), _eager(tr, x2)
    counters.clear()
    comp.compile_transformer(tr, "on")
    got1 = _eager(tr, x1)
    with dynamo.config.patch(error_on_recompile=True):
        got2 = _eager(tr, x2)
    assert _graph_breaks() == 0
    torch.testing.assert_close(got1, want1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got2, want2, atol=1e-4, rtol=1e-4)
    comp.uncompile_transformer(tr)
    dynamo.reset()


def test_kontext_layout_compiles_fullgraph(transformer):
    """A target with a reference image (global rule: the permutation to kernel order) traces without a break."""
    tr = transformer
    x = inputs(2, (4, 6), 5, seed=3)
    ref = torch.zeros(3, 4, 3)
    ref[..., 0] = 1
    ref[..., 1] = torch.arange(3)[:, None]
    ref[..., 2] = torch.arange(4)[None, :]
    x["img_ids"] = torch.cat([x["img_ids"], ref.reshape(12, 3)])
    x["hidden_states"] = torch.randn(2, 36, 64, generator=torch.Generator().manual_seed(4))
    clear_cli.linearize(tr, window=2)
    want = _eager(tr, x)
    counters.clear()
    comp.compile_transformer(tr, "on", backend="aot_eager")
    got = _eager(tr, x)
    assert _graph_breaks() == 0
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
