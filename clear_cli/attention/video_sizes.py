"""Wan 2.1's video token grids and model shapes (facts the video bench and the Wan processor share; no imports).

Wan's VAE compresses 4x in time (frames = 4k + 1 -> k + 1 latent frames) and 8x8 in space; its transformer patchifies
the latent by (1, 2, 2). So one token is 1 latent frame x 16 x 16 pixels: 81 frames at 1280x720 -> 21 x 45 x 80 =
75,600 tokens of self-attention per layer; at 832x480 -> 21 x 30 x 52 = 32,760.
"""

from __future__ import annotations

VAE_TIME, VAE_SPACE = 4, 8
PATCH = (1, 2, 2)
FRAMES = 81
SIZES = {"480p": (832, 480), "720p": (1280, 720)}          # (width, height) in pixels
TEXT_LEN = 512                                            # UMT5 tokens of the cross-attention
# name: (d_model, heads, layers, ffn_dim)
MODELS = {"1.3b": (1536, 12, 30, 8960), "14b": (5120, 40, 40, 13824)}


def latent_frames(frames: int) -> int:
    """Latent frames of a clip of `frames` pixel frames (4k + 1)."""
    if frames < 1 or (frames - 1) % VAE_TIME:
        raise ValueError(f"Wan takes 4k + 1 frames (1, 5, ..., 81), got {frames}")
    return (frames - 1) // VAE_TIME + 1


def wan_token_grid(frames: int, width: int, height: int) -> tuple[int, int, int]:
    """(T, H, W) self-attention token grid of a Wan 2.1 clip."""
    step = VAE_SPACE * PATCH[1]
    for name, side in (("width", width), ("height", height)):
        if side < step or side % step:
            raise ValueError(f"Wan's {name} must be a multiple of {step} pixels (VAE /{VAE_SPACE}, patch "
                             f"{PATCH[1]}), got {side}")
    return latent_frames(frames) // PATCH[0], height // step, width // step


def layer_linear_flops(d_model: int, ffn: int, text_len: int = TEXT_LEN) -> tuple[float, float]:
    """(FLOPs per video token, FLOPs per clip) of one Wan block outside self-attention: self q/k/v/out and cross q/out
    projections and the FFN per token plus cross-attention scores over the text; the text's k/v projections per clip."""
    per_token = 2.0 * (4 * d_model * d_model + 2 * d_model * d_model + 2 * d_model * ffn) + 4.0 * d_model * text_len
    return per_token, 2.0 * 2 * d_model * d_model * text_len
