"""Geometry of CLEAR attention: input checks, circle offsets, down-sampling (pooling) of keys/values.

Token layout everywhere: `[text_len text tokens][H*W image tokens, row-major]`, plus (for down_factor f > 1) the
(H/f)(W/f) pooled key/value tokens that the kernels append themselves. An image query at (y, x) sees image key
(y', x') iff (y-y')^2 + (x-x')^2 < r^2 (strict; circle simply cut at the border).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


def check_geometry(grid: tuple[int, int], window: int, down_factor: int = 1, text_len: int = 0) -> tuple[int, int]:
    """Validate (grid, window, down_factor, text_len); return grid as a tuple of ints. ValueError names the numbers."""
    try:
        h, w = (int(grid[0]), int(grid[1]))
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"grid must be (H, W) token counts, got {grid!r}") from None
    if len(tuple(grid)) != 2 or h < 1 or w < 1:
        raise ValueError(f"grid must be two positive token counts (H, W), got {tuple(grid)!r}")
    if int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1 (radius in tokens), got {window!r}")
    if int(down_factor) != down_factor or down_factor < 1:
        raise ValueError(f"down_factor must be an integer >= 1, got {down_factor!r}")
    if h % down_factor or w % down_factor:
        raise ValueError(f"down_factor {down_factor} does not divide the token grid {h}x{w} "
                         f"(use a resolution whose token grid is a multiple of {down_factor})")
    if int(text_len) != text_len or text_len < 0:
        raise ValueError(f"text_len must be an integer >= 0, got {text_len!r}")
    return h, w


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, grid: tuple[int, int],
              window: int, down_factor: int, down_weight: torch.Tensor | None) -> tuple[int, int]:
    """Validate tensors against the geometry; return (H, W)."""
    h, w = check_geometry(grid, window, down_factor, text_len)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, tokens, head_dim], got {t.dim()} dims {tuple(t.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v shapes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "(batch, heads, tokens and head_dim must match)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    n = q.shape[2]
    if n != text_len + h * w:
        raise ValueError(f"sequence length {n} != text_len {text_len} + grid {h}x{w} = {text_len + h * w}")
    if down_weight is not None and down_factor > 1:
        if down_weight.numel() != down_factor * down_factor:
            raise ValueError(f"down_weight has {down_weight.numel()} elements ({tuple(down_weight.shape)}), "
                             f"expected {down_factor}x{down_factor} for down_factor {down_factor}")
    return h, w


@lru_cache(maxsize=64)
def circle_offsets(window: int) -> tuple[tuple[int, int], ...]:
    """All (dy, dx) with dy^2 + dx^2 < window^2 (the interior circle), row-major."""
    r = int(window)
    return tuple((dy, dx) for dy in range(-r + 1, r) for dx in range(-r + 1, r) if dy * dy + dx * dx < r * r)


def circle_size(window: int) -> int:
    """K_r: image keys an interior query sees (193 / 793 / 3205 for r = 8 / 16 / 32)."""
    return len(circle_offsets(window))


def row_half_widths(window: int) -> list[int]:
    """For dy in [-(r-1), r-1] (index dy + r - 1): the largest |dx| with dy^2 + dx^2 < r^2."""
    r = int(window)
    return [math.isqrt(r * r - dy * dy - 1) for dy in range(-r + 1, r)]


def pool_weight(down_weight: torch.Tensor | None, f: int, ref: torch.Tensor) -> torch.Tensor:
    """The f x f pooling weight as a [f, f] tensor in ref's dtype/device (default 1/f^2); keeps autograd."""
    if down_weight is None:
        return torch.full((f, f), 1.0 / (f * f), dtype=ref.dtype, device=ref.device)
    return down_weight.reshape(f, f).to(device=ref.device, dtype=ref.dtype)


def pool_tokens(x_img: torch.Tensor, grid: tuple[int, int], f: int, weight: torch.Tensor) -> torch.Tensor:
    """Pool image tokens [B, heads, H*W, D] over f x f patches -> [B, heads, (H/f)(W/f), D] (pooled grid row-major)."""
    b, nh, _, d = x_img.shape
    h, w = grid
    x = x_img.reshape(b, nh, h // f, f, w // f, f, d)
    return torch.einsum("bnyaxcd,ac->bnyxd", x, weight).reshape(b, nh, (h // f) * (w // f), d)


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def tile_order(grid: tuple[int, int], tile: tuple[int, int], device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tile-major order of the image tokens, edge tiles padded (ragged grids).

    Returns (slot_to_token [tiles*a*b] with H*W marking a pad slot, token_to_slot [H*W], tile_origin [tiles, 2]).
    Tiles run row-major over the tile grid; inside a tile, tokens run row-major.
    """
    h, w = grid
    a, b = tile
    ty, tx = -(-h // a), -(-w // b)
    oy = torch.arange(ty, device=device).repeat_interleave(tx) * a
    ox = torch.arange(tx, device=device).repeat(ty) * b
    iy = torch.arange(a, device=device).repeat_interleave(b)
    ix = torch.arange(b, device=device).repeat(a)
    y = oy[:, None] + iy[None, :]
    x = ox[:, None] + ix[None, :]
    inside = (y < h) & (x < w)
    slot_to_token = torch.where(inside, y * w + x, torch.full_like(y, h * w)).reshape(-1)
    token_to_slot = torch.empty(h * w, dtype=torch.long, device=device)
    slots = torch.arange(slot_to_token.numel(), device=device)
    token_to_slot[slot_to_token[inside.reshape(-1)]] = slots[inside.reshape(-1)]
    return slot_to_token, token_to_slot, torch.stack([oy, ox], dim=1)


@lru_cache(maxsize=256)
def tile_key_offsets(tile: tuple[int, int], window: int) -> tuple[tuple[int, int], ...]:
    """Offsets (relative to the tile origin) of the image keys that some query of an a x b tile sees: the union of
    the queries' circles, row-major. Trimming the halo rectangle to this union saves its corners."""
    a, b = tile
    r = int(window)
    out = []
    for dy in range(-r + 1, a + r - 1):
        # nearest query row to key row dy, then the widest dx reach from that row
        qy = min(max(dy, 0), a - 1)
        m = math.isqrt(max(r * r - (dy - qy) ** 2 - 1, 0)) if (dy - qy) ** 2 < r * r else -1
        if m < 0:
            continue
        out.extend((dy, dx) for dx in range(-m, b - 1 + m + 1))
    return tuple(out)
