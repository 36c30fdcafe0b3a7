"""Conditioned generation for `clear gen --image / --mask / --control`: the stock diffusers FLUX pipeline that takes
those inputs, built from the loaded FluxPipeline's components (`from_pipe`: no second copy), run linearized.

Which pipeline (`choose`):

    --image                    FluxImg2ImgPipeline (SDEdit from the image, --strength)
    --image --kontext          FluxKontextPipeline (the image is a reference; FLUX.1-Kontext models)
    --image --mask             FluxInpaintPipeline, or FluxFillPipeline when the transformer is FLUX.1-Fill's
                               (in_channels 384: latents + masked image + mask)
    --control [--image [--mask]]  FluxControlNetPipeline / ...Img2Img / ...Inpaint with --controlnet MODEL

These run one direct stage at the target size (no cascade). The ControlNet is linearized with the transformer (its
attention runs at the image's size too); CLEAR weights are the transformer's (a ControlNet has its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clear_cli.errors import UsageError

FILL_IN_CHANNELS = 384  # FLUX.1-Fill: 64 latent + 64 masked-image + 256 mask channels (packed 2x2)


@dataclass(frozen=True)
class Conditioning:
    """The conditioning inputs of one `clear gen` call (paths as given)."""

    image: str | None = None
    mask: str | None = None
    control: str | None = None
    controlnet: str | None = None
    kontext: bool = False

    @property
    def any(self) -> bool:
        return bool(self.image or self.mask or self.control)


def check(c: Conditioning, *, parallel: str = "none") -> None:
    """One line for each combination that has no pipeline, before any work."""
    if c.mask and not c.image:
        raise UsageError("--mask needs --image (the picture whose masked part is repainted)", "add --image FILE")
    if c.kontext and not c.image:
        raise UsageError("--kontext makes --image a reference image: pass --image FILE")
    if c.kontext and (c.mask or c.control):
        raise UsageError("--kontext takes --image only (no --mask or --control)",
                         "drop --mask/--control, or --kontext for inpainting / ControlNet")
    if c.control and not c.controlnet:
        raise UsageError("--control needs --controlnet MODEL (a FLUX ControlNet: hub id or local folder)")
    if c.controlnet and not c.control:
        raise UsageError("--controlnet needs --control FILE (the control image)")
    if c.any and parallel != "none":
        raise UsageError(f"--parallel {parallel} runs text-to-image only", "drop --parallel with --image/--mask/"
                         "--control")
    for name, path in (("--image", c.image), ("--mask", c.mask), ("--control", c.control)):
        if path and not Path(path).is_file():
            raise UsageError(f"{name} {path}: no such file", "pass a PNG or JPEG")


def read_image(path: str, name: str, mode: str = "RGB"):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise UsageError(f"{name} {path}: not an image ({type(e).__name__})", "pass a PNG or JPEG") from None


def target_size(c: Conditioning, images: dict) -> tuple[int, int] | None:
    """(w, h) of the first input image, floored to multiples of 16 (FLUX's token size), or None."""
    for key in ("image", "control"):
        im = images.get(key)
        if im is not None:
            w, h = im.size
            if w < 16 or h < 16:
                raise UsageError(f"--{key} is {w}x{h} px: FLUX needs at least 16x16", "pass a larger image or --res")
            return w // 16 * 16, h // 16 * 16
    return None


def choose(c: Conditioning, transformer) -> str:
    """The diffusers pipeline class name for these inputs."""
    fill = int(getattr(transformer.config, "in_channels", 64)) == FILL_IN_CHANNELS
    if c.control:
        if fill:
            raise UsageError("--control with a FLUX.1-Fill model has no diffusers pipeline",
                             "use a FLUX.1-dev model with --control")
        return "FluxControlNetInpaintPipeline" if c.mask else (
            "FluxControlNetImg2ImgPipeline" if c.image else "FluxControlNetPipeline")
    if c.mask:
        return "FluxFillPipeline" if fill else "FluxInpaintPipeline"
    if fill:
        raise UsageError("this model is FLUX.1-Fill (in_channels 384): it needs --image and --mask")
    return "FluxKontextPipeline" if c.kontext else "FluxImg2ImgPipeline"


def load_controlnet(model: str, device, dtype):
    """A FluxControlNetModel from a hub id or local folder (`tiny-random`: a seeded one for the tiny model)."""
    import torch
    from diffusers import FluxControlNetModel

    from clear_cli.flux import TINY_MODELS

    if model == "tiny-random" or model in TINY_MODELS:
        from clear_cli.models import tiny

        cfg = {k: v for k, v in tiny.TRANSFORMER.items() if k != "out_channels"}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(5)
            cn = FluxControlNetModel(**{**cfg, "num_layers": 1, "num_single_layers": 1}).eval()
            for p in cn.parameters():  # zero-initialised output blocks: make the control visible
                if p.abs().sum() == 0:
                    torch.nn.init.normal_(p, std=0.05)
        return cn.to(device=device, dtype=dtype)
    try:
        return FluxControlNetModel.from_pretrained(model, torch_dtype=dtype).to(device)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UsageError(f"--controlnet {model}: cannot load a FluxControlNetModel "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                         "pass a hub id or a local folder with config.json + weights") from None


def build(pipe, name: str, controlnet=None):
    """The pipeline `name`, sharing `pipe`'s components."""
    import diffusers

    cls = getattr(diffusers, name)
    extra = {"controlnet": controlnet} if controlnet is not None else {}
    variant = cls.from_pipe(pipe, **extra)
    variant.set_progress_bar_config(disable=True)
    return variant


def call_kwargs(name: str, images: dict, *, width: int, height: int, strength: float, tiny: bool) -> dict:
    """The pipeline call's conditioning arguments."""
    kw: dict = {"width": width, "height": height}
    if "image" in images:
        kw["image"] = images["image"]
    if "mask" in images:
        kw["mask_image"] = images["mask"]
    if "control" in images:
        kw["control_image"] = images["control"]
    if name in ("FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxControlNetImg2ImgPipeline",
                "FluxControlNetInpaintPipeline"):
        kw["strength"] = strength
    if name == "FluxKontextPipeline":
        # the target at --res exactly; Kontext's preferred reference sizes are the real model's training sizes,
        # not the tiny model's (128 px)
        kw["max_area"] = width * height
        kw["_auto_resize"] = not tiny
    return kw
