"""FLUX facts every command shares (DESIGN.md §2): the token size, the default model, FLUX.1-dev's shape, the
built-in tiny models and the per-model defaults (base resolution, sampling steps).

Constants only and no imports, so that any layer may read them (attention included) and help texts are built
from the same numbers the code runs with.
"""

from __future__ import annotations

from dataclasses import dataclass

PIXELS_PER_TOKEN = 16  # VAE /8, then 2x2 packing: 1024^2 px -> 64x64 tokens
DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"

# FLUX.1-dev's transformer and text length
D_MODEL = 3072
HEADS = 24
HEAD_DIM = D_MODEL // HEADS
TEXT_LEN = 512  # padded T5 length
BASE_RES = 1024  # the training resolution
TRAIN_SEQ_LEN = (BASE_RES // PIXELS_PER_TOKEN) ** 2 + TEXT_LEN  # joint sequence at 1024^2 (proportional attention)

TINY_MODELS = ("tiny", "tiny-random")  # the built-in tiny FLUX, trained and random (clear_cli/models/tiny.py)
TINY_BASE_RES = 128  # the size the built-in tiny FLUX trains at (docs/tiny.md)
RANDOM_MODELS = ("flux-dev-random",)  # FLUX.1-dev's architecture with seeded random weights (models/flux_dev.py)
QWEN_TINY_MODELS = ("qwen-image-tiny-random",)  # Qwen-Image's architecture at test size (models/qwen_image.py)
WAN_TINY_MODELS = ("wan-tiny-random",)  # Wan 2.1's architecture at test size, a video model (models/wan.py)
BUILTIN_MODELS = TINY_MODELS + RANDOM_MODELS + QWEN_TINY_MODELS + WAN_TINY_MODELS
# The built-in tiny Wan (a video model: WanPipeline, not FLUX), trained and random (clear_cli/models/tiny_wan.py)
TINY_VIDEO_MODELS = ("tiny-wan", "tiny-wan-random")
VIDEO_MODELS = WAN_TINY_MODELS + TINY_VIDEO_MODELS  # built-in names of video models (`clear gen --frames`)


@dataclass(frozen=True)
class ModelDefaults:
    """What a model samples with unless told otherwise."""

    base_res: int  # base (and default) resolution in px: its training size
    steps: int  # denoising steps of a base or direct stage
    refine_steps: int  # schedule length of SDEdit refinement stages


FLUX_DEFAULTS = ModelDefaults(base_res=BASE_RES, steps=28, refine_steps=20)  # 20: the authors' refinement
# 20 steps as the tiny model's own checks sample; refinement kept short so CPU runs stay quick
TINY_DEFAULTS = ModelDefaults(base_res=TINY_BASE_RES, steps=20, refine_steps=8)
WAN_TINY_DEFAULTS = ModelDefaults(base_res=64, steps=4, refine_steps=4)   # untrained: a few steps show the path
TINY_WAN_DEFAULTS = ModelDefaults(base_res=64, steps=20, refine_steps=8)   # the trained tiny Wan's checks sample so


def is_tiny(model: object) -> bool:
    return str(model) in TINY_MODELS


def model_defaults(model: object) -> ModelDefaults:
    if str(model) in WAN_TINY_MODELS:
        return WAN_TINY_DEFAULTS
    if str(model) in TINY_VIDEO_MODELS:
        return TINY_WAN_DEFAULTS
    return TINY_DEFAULTS if is_tiny(model) or str(model) in QWEN_TINY_MODELS else FLUX_DEFAULTS


def default_text(name: str, flux: str | None = None, tiny: str | None = None) -> str:
    """`28; tiny 20`: a ModelDefaults field as help texts show it (`flux` / `tiny` override the numbers' text)."""
    a = flux if flux is not None else str(getattr(FLUX_DEFAULTS, name))
    b = tiny if tiny is not None else str(getattr(TINY_DEFAULTS, name))
    return f"{a}; tiny {b}"
