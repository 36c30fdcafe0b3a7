"""The CLEAR processors on CUDA: every backend inside the linearized tiny FLUX, fp32 and bf16, teacher exactness.

Marked `gpu` (skipped without CUDA): `pytest -m gpu tests/unit/test_processors_gpu.py`.
"""

from __future__ import annotations

import pytest
import torch

import clear_cli
from clear_cli.attention.linearize import teacher_mode, trainable_attention_parameters

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def build(dtype: torch.dtype = torch.float32, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    from clear_cli.models import tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**tiny.TRANSFORMER).eval().to("cuda", dtype)


def inputs(batch: int, grid: tuple[int, int], text_len: int, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    x = dict(
        hidden_states=torch.randn(batch, h * w, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, 64, generator=g),
        pooled_projections=torch.randn(batch, 64, generator=g),
        timestep=torch.rand(batch, generator=g), guidance=torch.full((batch,), 3.5),
        img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3),
    )
    return {k: v.to("cuda", dtype if v.is_floating_point() and "ids" not in k else v.dtype) for k, v in x.items()}


def backends() -> list[str]:
    """The backends besides `reference` that run here: auto and flex only where the flex module exists."""
    from clear_cli.attention import BACKENDS

    names = [b for b in BACKENDS if b not in ("auto", "reference", "flex")]
    if "flex" in BACKENDS:
        try:
            from clear_cli.attention.flex import flex_available
        except ImportError:
            return names
        names.append("auto")
        if flex_available(torch.device("cuda")):
            names.append("flex")
    return names


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_whole_grid_window_matches_stock_on_cuda(dtype, tol):
    tr = build(dtype)
    x = inputs(2, (12, 20), 7, dtype)
    with torch.no_grad():
        stock = tr(**x).sample.float()
        for backend in ["reference", *backends()]:
            clear_cli.linearize(tr, window=40, backend=backend)
            err = float((tr(**x).sample.float() - stock).abs().max())
            assert err < tol, f"{backend} {dtype}: {err}"


@pytest.mark.parametrize("window,f", [(3, 1), (5, 2), (2, 4)])
def test_backends_agree_inside_the_model_on_cuda(window, f):
    tr = build()
    x = inputs(2, (16, 12), 9)
    with torch.no_grad():
        clear_cli.linearize(tr, window=window, down_factor=f, backend="reference")
        ref = tr(**x).sample
        for backend in backends():
            clear_cli.linearize(tr, window=window, down_factor=f, backend=backend)
            err = float((tr(**x).sample - ref).abs().max())
            assert err < 1e-4, f"{backend} r={window} f={f}: {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_exact_and_student_trains_on_cuda(dtype):
    tr = build(dtype)
    x = inputs(2, (8, 12), 5, dtype)
    with torch.no_grad():
        original = tr(**x).sample
    clear_cli.linearize(tr, window=3, down_factor=2, backend=backends()[-1], keep_teacher=True)
    params = trainable_attention_parameters(tr, freeze_others=True)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.01)
    tr.enable_gradient_checkpointing()
    with teacher_mode(tr):
        assert torch.equal(tr(**x).sample, original)
    student = tr(**x).sample
    student.float().square().mean().backward()
    assert {n for n, p in tr.named_parameters() if p.grad is not None} == set(params)
