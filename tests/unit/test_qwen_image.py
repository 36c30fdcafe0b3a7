"""Qwen-Image through its model adapter, on the built-in `qwen-image-tiny-random`: whole-grid CLEAR reproduces stock
(with text padding), the kernels agree with `reference` on its layout, distillation trains only the image branch
and lowers the loss, and the LoRA export loads with diffusers' own QwenImage loader."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import clear_cli
from clear_cli.attention.adapters import adapter_for
from clear_cli.attention.adapters.qwen_image import ClearQwenAttnProcessor, NTKQwenEmbedRope
from clear_cli.attention.linearize import (
    capture_attention, clear_processors, default_attention_layers, teacher_mode, trainable_attention_parameters,
)

PROMPTS = ["a red circle", "a big blue square on the left of a green star"]   # different lengths: padding


@pytest.fixture(scope="module")
def pipe():
    return clear_cli.load_pipeline("qwen-image-tiny-random")


def _inputs(pipe, h: int, w: int, seed: int = 0):
    """One transformer call as QwenImagePipeline makes it: packed latents, prompt embeddings + mask, img_shapes."""
    with torch.no_grad():
        emb, mask = pipe.encode_prompt(PROMPTS, device="cpu")
    assert mask is not None and not bool(mask.all())      # the two prompts pad differently
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(PROMPTS), h * w, pipe.transformer.config.in_channels, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=emb, encoder_hidden_states_mask=mask,
                timestep=torch.full((len(PROMPTS),), 0.6), img_shapes=[[(1, h, w)]] * len(PROMPTS),
                return_dict=False)


def _run(tr, kw):
    with torch.no_grad():
        return tr(**kw)[0]


def test_adapter_knows_qwen_image(pipe):
    tr = pipe.transformer
    adapter = adapter_for(tr)
    assert adapter.family == "qwen-image" and adapter.kwargs_argument == "attention_kwargs"
    assert len(adapter.attention_modules(tr)) == tr.config.num_layers
    names = set(trainable_attention_parameters(tr))
    assert names and all(".attn.to_" in n and "add_out" not in n for n in names), sorted(names)[:4]
    assert {n.rsplit(".", 2)[-2] for n in names} == {"to_q", "to_k", "to_v", "0"}
    assert default_attention_layers(tr) == [0, 1]   # fewer than 10 layers: every one
    assert adapter.attention_loss_layers(list(range(60))) == list(range(5, 60, 6))


@pytest.mark.parametrize("backend", ["auto", "reference", "tiled"])
def test_whole_grid_window_reproduces_stock_with_padding(pipe, backend):
    tr = copy.deepcopy(pipe.transformer)
    kw = _inputs(pipe, 5, 7)
    stock = _run(tr, kw)
    clear_cli.linearize(tr, window=16, backend=backend)   # (5-1)^2 + (7-1)^2 < 16^2: every pair inside
    assert all(isinstance(p, ClearQwenAttnProcessor) for p in clear_processors(tr))
    torch.testing.assert_close(_run(tr, kw), stock, atol=1e-5, rtol=0)
    # the padding matters: without the mask the same call differs
    assert (_run(tr, {**kw, "encoder_hidden_states_mask": None}) - stock).abs().max() > 1e-4
    clear_cli.unlinearize(tr)
    torch.testing.assert_close(_run(tr, kw), stock, atol=0, rtol=0)


def test_pipeline_whole_grid_reproduces_stock(pipe):
    p = copy.copy(pipe)
    p.transformer = copy.deepcopy(pipe.transformer)
    call = dict(prompt=PROMPTS, height=80, width=112, num_inference_steps=2, output_type="latent")
    stock = p(generator=torch.Generator().manual_seed(1), **call).images
    clear_cli.linearize(p, window=12)
    out = p(generator=torch.Generator().manual_seed(1), **call).images
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=0)


@pytest.mark.parametrize("window, grid", [(1, (6, 9)), (2, (8, 5)), (3, (7, 10))])
def test_kernels_agree_with_reference_on_its_layout(pipe, window, grid):
    tr = copy.deepcopy(pipe.transformer)
    kw = _inputs(pipe, *grid, seed=window)
    stock = _run(tr, kw)
    outs = {}
    for backend in ("reference", "tiled", "flex"):
        clear_cli.linearize(tr, window=window, backend=backend)
        outs[backend] = _run(tr, kw)
    torch.testing.assert_close(outs["tiled"], outs["reference"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["flex"], outs["reference"], atol=1e-5, rtol=0)
    assert (outs["reference"] - stock).abs().max() > 1e-4   # the window is local: CLEAR differs from stock


def test_ntk_rope_scales_theta_and_restores(pipe):
    tr = copy.deepcopy(pipe.transformer)
    original = tr.pos_embed
    kw = _inputs(pipe, 4, 6)
    stock = _run(tr, kw)
    clear_cli.linearize(tr, window=16, ntk_factor=10.0)
    assert isinstance(tr.pos_embed, NTKQwenEmbedRope) and tr.pos_embed.inner.theta == original.theta * 10
    assert tr.pos_embed.inner.scale_rope   # still centred
    assert (_run(tr, kw) - stock).abs().max() > 1e-5
    clear_cli.linearize(tr, window=16)
    assert tr.pos_embed is original
    torch.testing.assert_close(_run(tr, kw), stock, atol=1e-5, rtol=0)


def test_distillation_lowers_the_loss_and_trains_only_the_image_branch(pipe):
    tr = copy.deepcopy(pipe.transformer)
    kw = _inputs(pipe, 6, 8)
    stock = _run(tr, kw)
    clear_cli.linearize(tr, window=2, keep_teacher=True)
    with teacher_mode(tr):
        torch.testing.assert_close(_run(tr, kw), stock, atol=1e-5, rtol=0)   # the one-copy teacher is stock
    before = {k: v.detach().clone() for k, v in tr.state_dict().items()}
    params = trainable_attention_parameters(tr, freeze_others=True)
    opt = torch.optim.Adam(params.values(), lr=3e-3)
    layers = default_attention_layers(tr)
    losses = []
    for _ in range(12):
        with torch.no_grad(), teacher_mode(tr), capture_attention(tr, layers) as att_t:
            v_t = tr(**kw)[0]
        with capture_attention(tr, layers) as att_s:
            v_s = tr(**kw)[0]
        loss = F.mse_loss(v_s, v_t) + 0.5 * torch.stack([F.mse_loss(att_s[i], att_t[i]) for i in layers]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    after = tr.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= set(params), sorted(changed - set(params))[:4]
    assert not any("add_" in k or "to_add_out" in k for k in changed)
    with teacher_mode(tr):   # the frozen copies did not move
        torch.testing.assert_close(_run(tr, kw), stock, atol=1e-5, rtol=0)


def test_lora_export_loads_with_the_stock_qwen_image_loader(pipe, tmp_path):
    from diffusers import QwenImagePipeline

    from clear_cli.jobs.export import export
    from clear_cli.models.weights import save_attention_weights

    tr = copy.deepcopy(pipe.transformer)
    clear_cli.linearize(tr, window=2)
    g = torch.Generator().manual_seed(3)
    params = trainable_attention_parameters(tr)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    student = {k: p.detach().clone() for k, p in params.items()}
    src = save_attention_weights(tmp_path / "clear_attn.safetensors", student,
                                 {"window": 2, "down_factor": 1, "base_model": "qwen-image-tiny-random"})
    res = export(src, format="lora", rank=48, out=str(tmp_path / "clear_lora.safetensors"), device="cpu",
                 progress=False)
    stock = clear_cli.load_pipeline("qwen-image-tiny-random")
    assert isinstance(stock, QwenImagePipeline)
    stock.load_lora_weights(str(res.path))   # diffusers' own QwenImage LoRA loader
    stock.fuse_lora()
    fused = stock.transformer.state_dict()
    for k, v in student.items():
        key = k if k in fused else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        torch.testing.assert_close(fused[key], v, atol=1e-5, rtol=0)


def test_saved_tiny_reloads_and_draws_the_same(pipe, tmp_path):
    from clear_cli.models.pipeline import save_pipeline

    save_pipeline(pipe, tmp_path / "q")
    again = clear_cli.load_pipeline(str(tmp_path / "q"))
    assert again.prompt_template_encode_start_idx == 0   # the tiny tokenizer's conventions came back
    call = dict(prompt="a red circle", height=64, width=64, num_inference_steps=2, output_type="latent")
    a = pipe(generator=torch.Generator().manual_seed(0), **call).images
    b = again(generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
