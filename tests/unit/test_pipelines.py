"""Every FLUX pipeline runs linearized on the tiny model: a whole-grid window reproduces the stock pipeline within
1e-5, a small window changes the result (CLEAR really runs), and `unlinearize` gives the stock result back.

64x96 px -> a 4x6 token grid; window 8 covers it ((4-1)^2 + (6-1)^2 < 8^2). Kontext's reference is 48x64 px
(3x4 tokens: another size than the target). Two steps, latents out (the VAE is not what is tested).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import clear_cli
from clear_cli.attention.linearize import attention_modules
from clear_cli.attention.processors import ClearFluxAttnProcessor
from clear_cli.models import tiny

TOL = 1e-5
SIZE = dict(height=64, width=96)
STEPS = dict(num_inference_steps=2, output_type="latent")


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask_picture(w: int = 96, h: int = 64) -> Image.Image:
    m = np.zeros((h, w), dtype=np.uint8)
    m[16:48, 32:80] = 255  # repaint a box in the middle
    return Image.fromarray(m)


def components(**transformer) -> dict:
    comps = tiny.build_components(seed=0)
    if transformer:
        from diffusers import FluxTransformer2DModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            comps["transformer"] = FluxTransformer2DModel(**{**tiny.TRANSFORMER, **transformer}).eval()
    return comps


def tiny_controlnet(**extra):
    from diffusers import FluxControlNetModel

    cfg = {k: v for k, v in tiny.TRANSFORMER.items() if k != "out_channels"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        cn = FluxControlNetModel(**{**cfg, "num_layers": 1, "num_single_layers": 1, **extra}).eval()
        for p in cn.parameters():  # its zero-initialised output blocks would make the residuals vanish
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.05)
    return cn


def check(pipe, **call):
    """Stock vs whole-grid window (reference and tiled kernels) vs a small window vs unlinearized."""
    pipe.set_progress_bar_config(disable=True)

    def go():
        out = pipe(**call, **STEPS, generator=torch.Generator().manual_seed(0))
        return out.images

    stock = go()
    for backend in ("reference", "tiled"):
        clear_cli.linearize(pipe, window=8, backend=backend)
        assert (go() - stock).abs().max() < TOL, backend
    clear_cli.linearize(pipe, window=1, backend="tiled")
    assert (go() - stock).abs().max() > 1e-4
    clear_cli.unlinearize(pipe)
    assert torch.equal(go(), stock)
    return stock


def test_flux_pipeline():
    from diffusers import FluxPipeline

    check(FluxPipeline(**components()), prompt="a red circle", max_sequence_length=tiny.TEXT_LEN, **SIZE)


def test_img2img_pipeline():
    from diffusers import FluxImg2ImgPipeline

    check(FluxImg2ImgPipeline(**components()), prompt="a red circle", image=picture(96, 64, 1), strength=0.7,
          max_sequence_length=tiny.TEXT_LEN, **SIZE)


def test_inpaint_pipeline_with_a_mask():
    from diffusers import FluxInpaintPipeline

    check(FluxInpaintPipeline(**components()), prompt="a red circle", image=picture(96, 64, 1),
          mask_image=mask_picture(), strength=0.9, max_sequence_length=tiny.TEXT_LEN, **SIZE)


def test_fill_pipeline():
    from diffusers import FluxFillPipeline

    # FLUX.1-Fill: the transformer takes latents, the masked image and the mask (64 + 64 + 256 channels)
    pipe = FluxFillPipeline(**components(in_channels=384, out_channels=64))
    check(pipe, prompt="a red circle", image=picture(96, 64, 1), mask_image=mask_picture(),
          max_sequence_length=tiny.TEXT_LEN, **SIZE)


def test_controlnet_pipeline_with_a_control_image():
    from diffusers import FluxControlNetPipeline

    pipe = FluxControlNetPipeline(**components(), controlnet=tiny_controlnet())
    call = dict(prompt="a red circle", control_image=picture(96, 64, 2), controlnet_conditioning_scale=1.0,
                max_sequence_length=tiny.TEXT_LEN, **SIZE)
    stock = check(pipe, **call)
    # linearize(pipe) linearizes the ControlNet too (its attention runs at the image's size as well) ...
    clear_cli.linearize(pipe, window=1, backend="tiled")
    assert all(isinstance(m.processor, ClearFluxAttnProcessor) for m in attention_modules(pipe.controlnet))
    both = pipe(**call, **STEPS, generator=torch.Generator().manual_seed(0)).images
    # ... and its processors really run CLEAR although its blocks get no joint_attention_kwargs
    clear_cli.unlinearize(pipe.controlnet)
    only_transformer = pipe(**call, **STEPS, generator=torch.Generator().manual_seed(0)).images
    assert (both - only_transformer).abs().max() > 1e-5
    clear_cli.unlinearize(pipe)
    # the control image matters
    other = pipe(**{**call, "control_image": picture(96, 64, 3)}, **STEPS,
                 generator=torch.Generator().manual_seed(0)).images
    assert (other - stock).abs().max() > 1e-4


def test_controlnet_union_mode_token():
    """ControlNet-Union prepends a mode token to the text inside its forward: the text part grows by one."""
    from diffusers import FluxControlNetPipeline

    pipe = FluxControlNetPipeline(**components(), controlnet=tiny_controlnet(num_mode=3))
    check(pipe, prompt="a red circle", control_image=picture(96, 64, 2), control_mode=1,
          max_sequence_length=tiny.TEXT_LEN, **SIZE)


def test_multi_controlnet_pipeline():
    from diffusers import FluxControlNetPipeline, FluxMultiControlNetModel

    multi = FluxMultiControlNetModel([tiny_controlnet(), tiny_controlnet()])
    pipe = FluxControlNetPipeline(**components(), controlnet=multi)
    check(pipe, prompt="a red circle", control_image=[picture(96, 64, 2), picture(96, 64, 3)],
          controlnet_conditioning_scale=[1.0, 0.5], max_sequence_length=tiny.TEXT_LEN, **SIZE)
    clear_cli.linearize(pipe, window=1)   # every ControlNet of the group
    assert all(isinstance(m.processor, ClearFluxAttnProcessor) for n in multi.nets for m in attention_modules(n))
    clear_cli.unlinearize(pipe)
    assert not any(isinstance(m.processor, ClearFluxAttnProcessor) for n in multi.nets for m in attention_modules(n))


@pytest.mark.parametrize("name", ["FluxControlNetImg2ImgPipeline", "FluxControlNetInpaintPipeline"])
def test_controlnet_img2img_and_inpaint_pipelines(name):
    import diffusers

    pipe = getattr(diffusers, name)(**components(), controlnet=tiny_controlnet())
    call = dict(prompt="a red circle", image=picture(96, 64, 1), control_image=picture(96, 64, 2), strength=0.9,
                max_sequence_length=tiny.TEXT_LEN, **SIZE)
    if "Inpaint" in name:
        call["mask_image"] = mask_picture()
    check(pipe, **call)


def test_kontext_pipeline_with_a_reference_of_another_size():
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**components())
    # _auto_resize=False keeps the 48x64 reference and max_area the 64x96 target (Kontext would resize both to
    # ~1 megapixel)
    call = dict(prompt="a red circle", image=picture(64, 48, 1), _auto_resize=False, max_area=64 * 96,
                max_sequence_length=tiny.TEXT_LEN, **SIZE)
    stock = check(pipe, **call)
    # the reference takes part: another reference changes the result under CLEAR too
    clear_cli.linearize(pipe, window=2, backend="tiled")
    a = pipe(**call, **STEPS, generator=torch.Generator().manual_seed(0)).images
    b = pipe(**{**call, "image": picture(64, 48, 4)}, **STEPS, generator=torch.Generator().manual_seed(0)).images
    assert a.shape == stock.shape == (1, 24, 64) and (a - b).abs().max() > 1e-4
    seen = pipe.transformer._clear_state.last_call.layout
    assert seen.target.shape == (4, 6) and [g.shape for g in seen.references] == [(3, 4)]
    clear_cli.unlinearize(pipe)


def tiny_redux(comps: dict):
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        enc = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8)).eval()
        embedder = ReduxImageEncoder(redux_dim=32, txt_in_features=tiny.TRANSFORMER["joint_attention_dim"]).eval()
    proc = SiglipImageProcessor(size={"height": 32, "width": 32})
    return FluxPriorReduxPipeline(image_encoder=enc, feature_extractor=proc, image_embedder=embedder,
                                  text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                                  text_encoder_2=comps["text_encoder_2"], tokenizer_2=comps["tokenizer_2"])


def test_prior_redux_feeds_a_linearized_pipeline():
    from diffusers import FluxPipeline

    comps = components()
    redux = tiny_redux(comps)
    with pytest.raises(ValueError, match="FluxPriorReduxPipeline, which has no transformer .* linearize the "
                                         "FluxPipeline you pass its output to"):
        clear_cli.linearize(redux)
    with torch.no_grad():
        prior = redux(image=picture(64, 64, 1), prompt="a red circle")
    # Redux's image tokens are appended to the text: a longer global part (512 T5 + 16 image tokens here)
    assert prior.prompt_embeds.shape[1] == 512 + 16
    pipe = FluxPipeline(**{**comps, "text_encoder": None, "text_encoder_2": None, "tokenizer": None,
                           "tokenizer_2": None})
    check(pipe, prompt_embeds=prior.prompt_embeds, pooled_prompt_embeds=prior.pooled_prompt_embeds, **SIZE)


def test_unknown_pipelines_and_models_name_what_was_found():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**tiny.VAE)
    with pytest.raises(ValueError, match="linearize found a AutoencoderKL .no FluxAttention modules.; it supports "
                                         "FluxPipeline, FluxImg2ImgPipeline"):
        clear_cli.linearize(vae)

    class StableDiffusion3Pipeline:  # a pipeline whose transformer is not FLUX's
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="found a StableDiffusion3Pipeline whose transformer is Linear"):
        clear_cli.linearize(StableDiffusion3Pipeline())
