"""Chroma through its adapter: a tiny random ChromaTransformer2DModel (as diffusers' tests build it), linearized,
with its text padding mask merged with CLEAR's rule."""

from __future__ import annotations

import copy

import pytest
import torch

import clear_cli
from clear_cli.attention.adapters import adapter_for
from clear_cli.attention.adapters.chroma import ClearChromaAttnProcessor
from clear_cli.attention.linearize import clear_processors

CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
              approximator_hidden_dim=16, approximator_layers=1)
T = 7
VALID = (3, 6)   # prompt tokens (+ the first padding token Chroma keeps) per batch element


@pytest.fixture(scope="module")
def transformer():
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(0)
    return ChromaTransformer2DModel(**CONFIG).eval()


def _call(h: int, w: int, t: int = T, valid=VALID, mask_dtype=torch.float32, seed: int = 0):
    """A call as ChromaPipeline makes it: a float 0/1 text mask (tokens up to the first padding one), image ones."""
    from diffusers import FluxPipeline

    g = torch.Generator().manual_seed(seed)
    b = len(valid)
    text = torch.zeros(b, t, dtype=mask_dtype)
    for i, n in enumerate(valid):
        text[i, :n] = 1
    mask = torch.cat([text, torch.ones(b, h * w, dtype=torch.bool)], 1)   # ChromaPipeline._prepare_attention_mask
    return dict(hidden_states=torch.randn(b, h * w, CONFIG["in_channels"], generator=g),
                encoder_hidden_states=torch.randn(b, t, CONFIG["joint_attention_dim"], generator=g),
                timestep=torch.full((b,), 0.5), img_ids=FluxPipeline._prepare_latent_image_ids(b, h, w, "cpu",
                                                                                            torch.float32),
                txt_ids=torch.zeros(t, 3), attention_mask=mask, return_dict=False)


def _run(tr, kw):
    with torch.no_grad():
        return tr(**kw)[0]


def test_chroma_has_its_own_adapter(transformer):
    assert adapter_for(transformer).family == "chroma"
    tr = copy.deepcopy(transformer)
    clear_cli.linearize(tr, window=4)
    assert len(clear_processors(tr)) == 4 and all(isinstance(p, ClearChromaAttnProcessor)
                                                  for p in clear_processors(tr))


@pytest.mark.parametrize("backend", ["auto", "reference", "tiled"])
def test_whole_grid_reproduces_stock_with_its_mask(transformer, backend):
    """The float mask ChromaPipeline passes, exactly as diffusers 0.42 applies it (additively)."""
    tr = copy.deepcopy(transformer)
    kw = _call(5, 6)
    stock = _run(tr, kw)
    clear_cli.linearize(tr, window=16, backend=backend)
    torch.testing.assert_close(_run(tr, kw), stock, atol=1e-5, rtol=0)
    assert (_run(tr, {**kw, "attention_mask": None}) - stock).abs().max() > 1e-4   # the mask matters


def test_bool_mask_is_padding_proper(transformer):
    """A bool mask drops the padded text keys for every query: the image output equals stock on the prompt alone."""
    tr = copy.deepcopy(transformer)
    valid = (4,)
    kw = _call(4, 6, valid=valid, mask_dtype=torch.bool)
    short = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"][:, :valid[0]],
             "txt_ids": kw["txt_ids"][:valid[0]], "attention_mask": None}
    stock_short = _run(tr, short)
    clear_cli.linearize(tr, window=16, backend="reference")
    torch.testing.assert_close(_run(tr, kw), stock_short, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window", [1, 2, 3])
def test_kernels_agree_with_reference_on_chroma(transformer, window):
    tr = copy.deepcopy(transformer)
    kw = _call(6, 7, seed=window)
    outs = {}
    for backend in ("reference", "tiled", "flex"):
        clear_cli.linearize(tr, window=window, backend=backend)
        outs[backend] = _run(tr, kw)
    torch.testing.assert_close(outs["tiled"], outs["reference"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["flex"], outs["reference"], atol=1e-5, rtol=0)
