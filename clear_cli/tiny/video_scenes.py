"""Procedural clips for the tiny Wan teacher: one coloured shape moving in a straight line on black.

Caption: `a small red circle moving left`. What varies: colour (8), shape (4), size (2), direction (4), start
position and speed (1.4-2.2 px a frame at 64 px, so the shape travels 17-26 px over 13 frames and stays
inside the frame). Deterministic by seed, any size and frame count; drawn with numpy signed-distance masks
vectorised over the batch and the frames. The held-out rule is the image teacher's (`clear_cli.tiny`):
training draws seeds below TRAIN_SEEDS, checks start at HELD_OUT_SEED.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clear_cli.tiny import HELD_OUT_SEED, TRAIN_SEEDS

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (0.95, 0.9, 0.1), "green": (0.1, 0.75, 0.2),
    "cyan": (0.1, 0.85, 0.9), "blue": (0.15, 0.25, 0.95), "purple": (0.6, 0.2, 0.8), "pink": (1.0, 0.5, 0.75),
}
COLOR_NAMES = list(COLORS)
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.10, "large": 0.16}  # radius as a fraction of the frame side
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy)
SPEED = (0.022, 0.034)  # fraction of the frame side per frame (at 13 frames: 0.29-0.44 of the frame in all)
REF_FRAMES = 13  # the speed range is chosen so that a clip of this many frames stays inside the frame


@dataclass(frozen=True)
class Clip:
    color: str
    shape: str
    size: str
    direction: str
    x0: float  # start centre, fractions of the frame side
    y0: float
    speed: float  # fraction of the frame side per frame


def sample_clip(seed: int, frames: int = REF_FRAMES) -> Clip:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, 0x57A])
    color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    speed = float(rng.uniform(*SPEED)) * (REF_FRAMES - 1) / max(1, frames - 1)
    r = SIZES[size] + 0.02
    travel = speed * (frames - 1)
    dx, dy = DIRECTIONS[direction]
    # the whole path stays inside [r, 1 - r] on the moving axis; the other axis is free within the margins
    lo, hi = r, 1.0 - r
    a = float(rng.uniform(lo, hi - travel))
    b = float(rng.uniform(lo, hi))
    if dx:
        x0, y0 = (a if dx > 0 else 1.0 - a), b
    else:
        x0, y0 = b, (a if dy > 0 else 1.0 - a)
    return Clip(color, shape, size, direction, x0, y0, speed)


def caption(clip: Clip) -> str:
    return f"a {clip.size} {clip.color} {clip.shape} moving {clip.direction}"


def centers(clip: Clip, frames: int) -> np.ndarray:
    """[frames, 2] (x, y) centre of the shape in each frame, fractions of the frame side."""
    t = np.arange(frames, dtype=np.float64)
    dx, dy = DIRECTIONS[clip.direction]
    return np.stack([clip.x0 + dx * clip.speed * t, clip.y0 + dy * clip.speed * t], axis=1)


def _sdf(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (negative inside) of a shape of radius r centred at 0; x, y in frame fractions."""
    if shape == "circle":
        return np.sqrt(x * x + y * y) - r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.8 * r
    if shape == "diamond":
        return (np.abs(x) + np.abs(y)) / np.sqrt(2.0) - 0.75 * r
    # triangle pointing up: intersection of three half-planes
    k = np.sqrt(3.0)
    return np.maximum(np.maximum(-y - 0.5 * r, (k * x + y) / 2.0 - 0.5 * r), (-k * x + y) / 2.0 - 0.5 * r)


def render(clips: Sequence[Clip], size: int = 64, frames: int = REF_FRAMES) -> np.ndarray:
    """float32 [B, frames, size, size, 3] in [0, 1], anti-aliased over one pixel."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    out = np.zeros((len(clips), frames, size, size, 3), dtype=np.float32)
    px = 1.0 / size
    for i, c in enumerate(clips):
        cx = centers(c, frames)  # [F, 2]
        x = coords[None, None, :] - cx[:, 0, None, None]
        y = coords[None, :, None] - cx[:, 1, None, None]
        alpha = np.clip(0.5 - _sdf(c.shape, x, y, SIZES[c.size]) / px, 0.0, 1.0)
        out[i] = (alpha[..., None] * np.asarray(COLORS[c.color], dtype=np.float64)).astype(np.float32)
    return out


def make_batch(seeds: Sequence[int], size: int = 64, frames: int = REF_FRAMES) -> tuple[np.ndarray, list[str]]:
    clips = [sample_clip(int(s), frames) for s in seeds]
    return render(clips, size, frames), [caption(c) for c in clips]


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of the nearest palette colour for each [..., 3] pixel."""
    pal = np.asarray(list(COLORS.values()), dtype=np.float32)
    return ((rgb[..., None, :] - pal) ** 2).sum(-1).argmin(-1)


def held_out_clips(n: int, start: int = HELD_OUT_SEED, frames: int = REF_FRAMES) -> list[Clip]:
    """Held-out clip i is scene seed `start + i` (training draws below TRAIN_SEEDS)."""
    assert start >= TRAIN_SEEDS or start + n <= TRAIN_SEEDS
    return [sample_clip(start + i, frames) for i in range(n)]
