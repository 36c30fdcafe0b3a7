"""Procedural captioned scenes: 1-3 simple objects on plain or textured backgrounds, drawn with numpy.

    scene = sample_scene(seed)                 # a Scene (a plain description, deterministic by seed)
    caption(scene)   -> "a small red circle at the top left on a blue background"
    render([scene, ...], size=128) -> float32 array [B, size, size, 3] in [0, 1]
    make_batch(seeds, size) -> (images, captions)
    held_out_prompts(n)  -> captions of scenes no training ever draws (seeds: clear_cli/tiny/__init__.py)

Drawing is vectorised over the batch (every shape's mask is a soft signed-distance test on one coordinate
grid), so a batch of 64 images at 128 px takes a few milliseconds. Every caption word is in the tiny
tokenizers' vocabulary (`clear_cli.models.vocab`), and captions stay within 31 words so that they fit the
tiny model's 32 T5 tokens with the end token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from clear_cli.tiny import HELD_OUT_SEED, TRAIN_SEEDS  # noqa: F401  (the seed rule lives there)

# Named colours, far enough apart that a nearest-colour test can tell them apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (245, 225, 40), "green": (30, 160, 50),
    "blue": (30, 70, 225), "purple": (130, 40, 180), "pink": (250, 140, 200), "white": (245, 245, 245),
    "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (115, 65, 25), "cyan": (40, 215, 225),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle", "star", "ring", "stripes", "cross", "diamond"]
# Half-extent of an object as a fraction of the image side.
SIZES = {"small": 0.09, "medium": 0.13, "large": 0.18}
# 3x3 grid cells: (phrase, centre x, centre y) as fractions of the image side.
POSITIONS: dict[str, tuple[str, float, float]] = {
    "top left": ("at the top left", 1 / 6, 1 / 6), "top": ("at the top", 0.5, 1 / 6),
    "top right": ("at the top right", 5 / 6, 1 / 6), "left": ("at the left", 1 / 6, 0.5),
    "center": ("in the center", 0.5, 0.5), "right": ("at the right", 5 / 6, 0.5),
    "bottom left": ("at the bottom left", 1 / 6, 5 / 6), "bottom": ("at the bottom", 0.5, 5 / 6),
    "bottom right": ("at the bottom right", 5 / 6, 5 / 6),
}
POSITION_NAMES = list(POSITIONS)
TEXTURES = ["plain", "checkered", "striped", "dotted", "gradient", "noisy"]
JITTER = 0.03  # random offset of an object's centre, fraction of the side


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    position: str
    dx: float = 0.0  # jitter of the centre, fraction of the side
    dy: float = 0.0
    angle: float = 0.0  # rotation of stars / stripes, radians (not captioned)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    texture: str = "plain"
    seed: int = 0  # drives the texture noise only
    extra: dict = field(default_factory=dict, compare=False)


def sample_scene(seed: int, n_objects: int | None = None, texture: str | None = None) -> Scene:
    """A random scene, fully determined by `seed` (and the optional fixed object count / texture)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5CE7E])
    n = int(n_objects) if n_objects is not None else int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1-3, got {n}")
    tex = texture if texture is not None else str(rng.choice(TEXTURES, p=[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]))
    if tex not in TEXTURES:
        raise ValueError(f"texture must be one of {TEXTURES}, got {tex!r}")
    bg = str(rng.choice(COLOR_NAMES))
    cells = rng.choice(len(POSITION_NAMES), size=n, replace=False)
    others = [c for c in COLOR_NAMES if c != bg]
    objs = []
    for cell in cells:
        objs.append(Obj(
            shape=str(rng.choice(SHAPES)), color=str(rng.choice(others)), size=str(rng.choice(list(SIZES))),
            position=POSITION_NAMES[int(cell)], dx=float(rng.uniform(-JITTER, JITTER)),
            dy=float(rng.uniform(-JITTER, JITTER)), angle=float(rng.uniform(0, 2 * np.pi)),
        ))
    return Scene(objects=tuple(objs), background=bg, texture=tex, seed=int(seed))


def caption(scene: Scene) -> str:
    """'a small red circle at the top left and ... on a (checkered) blue background'."""
    parts = [f"a {o.size} {o.color} {o.shape} {POSITIONS[o.position][0]}" for o in scene.objects]
    tex = "" if scene.texture == "plain" else scene.texture + " "
    return " and ".join(parts) + f" on a {tex}{scene.background} background"


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLORS[name], dtype=np.float32) / 255.0


def _soft(sdf: np.ndarray, px: float) -> np.ndarray:
    """Coverage from a signed distance (negative inside), antialiased over one pixel."""
    return np.clip(0.5 - sdf / px, 0.0, 1.0)


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, r: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Approximate signed distance of every pixel to one shape; x, y centred [B, S, S], r and angle [B, 1, 1]."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return np.sqrt(x * x + y * y) - r
    if shape == "ring":
        return np.abs(np.sqrt(x * x + y * y) - 0.75 * r) - 0.25 * r
    if shape in ("square", "stripes"):
        return np.maximum(ax, ay) - 0.85 * r
    if shape == "diamond":
        return (ax + ay) / np.sqrt(2.0) - 0.75 * r
    if shape == "cross":
        w = 0.32 * r
        return np.minimum(np.maximum(ax - r, ay - w), np.maximum(ax - w, ay - r))
    if shape == "triangle":  # upright equilateral, centred on its centroid
        k = np.sqrt(3.0)
        yy = -y - 0.1 * r  # image rows grow downwards: flip so the apex points up
        return np.maximum((k * ax + yy) / 2.0, -yy) - 0.5 * r
    if shape == "star":  # five points: radius a triangle wave of the angle
        theta = np.arctan2(y, x) - angle
        t = np.abs(np.mod(5.0 * theta / (2 * np.pi), 1.0) - 0.5) * 2.0  # 0 at a point, 1 between points
        rad = r * (1.0 - 0.55 * t)
        return (np.sqrt(x * x + y * y) - rad) * 0.6
    raise ValueError(f"unknown shape {shape!r}")


def _background(scenes: Sequence[Scene], size: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    b = len(scenes)
    base = np.stack([_rgb(s.background) for s in scenes])[:, None, None, :]  # [B,1,1,3]
    # The second tone of a texture: darker for light colours, lighter for dark ones.
    lum = base.mean(-1, keepdims=True)
    other = np.where(lum > 0.45, base * 0.62, base * 0.55 + 0.45)
    img = np.broadcast_to(base, (b, size, size, 3)).copy()
    for tex in set(s.texture for s in scenes):
        idx = np.asarray([i for i, s in enumerate(scenes) if s.texture == tex])
        if tex == "plain":
            continue
        if tex == "checkered":
            m = ((np.floor(u * 8) + np.floor(v * 8)) % 2)[None]
        elif tex == "striped":
            m = ((np.floor((u + v) * 8)) % 2)[None]
        elif tex == "dotted":
            fu, fv = (u * 8) % 1 - 0.5, (v * 8) % 1 - 0.5
            m = (fu * fu + fv * fv < 0.06).astype(np.float32)[None]
        elif tex == "gradient":
            m = ((u + v) / 2)[None]
        elif tex == "noisy":
            m = np.stack([np.random.default_rng([s.seed & 0xFFFFFFFF, 7]).random((size, size), dtype=np.float32)
                          for s in (scenes[i] for i in idx)]) * 0.6
        m = np.broadcast_to(m, (len(idx), size, size))[..., None]
        img[idx] = base[idx] * (1 - m) + other[idx] * m
    return img


def render(scenes: Sequence[Scene], size: int = 128) -> np.ndarray:
    """Draw scenes: float32 [B, size, size, 3] in [0, 1]; later objects are drawn over earlier ones."""
    if size < 8:
        raise ValueError(f"size must be at least 8 px, got {size}")
    scenes = list(scenes)
    b = len(scenes)
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    v, u = np.meshgrid(c, c, indexing="ij")  # v: row (y), u: column (x), both in (0, 1)
    img = _background(scenes, size, u, v)
    px = 1.0 / size
    n_max = max(len(s.objects) for s in scenes)
    for k in range(n_max):
        rows = [i for i, s in enumerate(scenes) if len(s.objects) > k]
        for shape in SHAPES:
            sel = [i for i in rows if scenes[i].objects[k].shape == shape]
            if not sel:
                continue
            objs = [scenes[i].objects[k] for i in sel]
            cx = np.asarray([POSITIONS[o.position][1] + o.dx for o in objs], np.float32)[:, None, None]
            cy = np.asarray([POSITIONS[o.position][2] + o.dy for o in objs], np.float32)[:, None, None]
            r = np.asarray([SIZES[o.size] for o in objs], np.float32)[:, None, None]
            ang = np.asarray([o.angle for o in objs], np.float32)[:, None, None]
            x, y = u[None] - cx, v[None] - cy
            alpha = _soft(_shape_sdf(shape, x, y, r, ang), px)
            if shape == "stripes":  # a square of stripes in the object colour, background between them
                ca, sa = np.cos(ang), np.sin(ang)
                alpha = alpha * (np.cos((x * ca + y * sa) / r * 2.2 * np.pi) > -0.1)
            col = np.stack([_rgb(o.color) for o in objs])[:, None, None, :]
            a = alpha[..., None]
            img[sel] = img[sel] * (1 - a) + col * a
    return img.astype(np.float32, copy=False)


def make_batch(seeds: Sequence[int], size: int = 128, n_objects: int | None = None,
               texture: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Images [B, size, size, 3] in [0, 1] and their captions, one scene per seed."""
    scenes = [sample_scene(int(s), n_objects=n_objects, texture=texture) for s in seeds]
    return render(scenes, size), [caption(s) for s in scenes]


def nearest_color(rgb: np.ndarray) -> np.ndarray:
    """Index into COLOR_NAMES of the nearest named colour, for float RGB in [0, 1] of shape [..., 3]."""
    pal = np.stack([_rgb(n) for n in COLOR_NAMES])
    d = ((rgb[..., None, :] - pal) ** 2).sum(-1)
    return d.argmin(-1)


def object_center_px(obj: Obj, size: int) -> tuple[int, int]:
    """(row, column) pixel of an object's centre."""
    _, fx, fy = POSITIONS[obj.position]
    return int((fy + obj.dy) * size), int((fx + obj.dx) * size)


def held_out_prompts(n: int, start: int = HELD_OUT_SEED) -> list[str]:
    """Captions of the held-out scenes start, start + 1, ...: prompts no training saw (prompt i is scene start + i)."""
    if start < HELD_OUT_SEED:
        raise ValueError(f"held-out scene seeds start at {HELD_OUT_SEED}, got {start}")
    return [caption(sample_scene(start + i)) for i in range(n)]
