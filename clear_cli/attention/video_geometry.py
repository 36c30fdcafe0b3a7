"""CLEAR in space and time: the 3-D rule on a (T, H, W) token grid, its checks, the dense reference and exact counts.

Token layout: `[text_len global tokens][T*H*W video tokens, frame-major: t, then row y, then column x]` (what a video
DiT gets by flattening its patchified latent [B, C, T, H, W]; Wan's self-attention has no global tokens, so
text_len = 0 there, but the kernels take any number, like the 2-D ones). A video query at (t, y, x) sees a video key
at (t', y', x') iff

    (dt / r_t)^2 + (dy / r)^2 + (dx / r)^2 < 1        (strict, cut at the borders of the volume)

with r = `window` and r_t = `time_window` in tokens (frames); r_t = 0 means the same frame only. Global tokens see
every key and are seen by every query. With T = 1 (or r_t = 0 inside one frame) this is the 2-D rule exactly.

In integers: A dt^2 + B (dy^2 + dx^2) < C with (A, B, C) = (r^2, r_t^2, r^2 r_t^2), or (r^2, 1, r^2) for r_t = 0
(then any dt != 0 gives A dt^2 >= C). Kernels and counts all use `ellipsoid_coeffs`, so they agree by construction.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale

MAX_REFERENCE_TOKENS = 20_000
MAX_WINDOW = 2**15   # keeps A dt^2 + B (dy^2 + dx^2) inside int64; far beyond any volume
Grid3 = tuple[int, int, int]


def check_video_geometry(grid: Grid3, window: int, time_window: int, text_len: int = 0) -> Grid3:
    """Validate (grid, window, time_window, text_len); return grid as three ints. ValueError names the numbers."""
    try:
        t, h, w = (int(grid[0]), int(grid[1]), int(grid[2]))
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"video grid must be (T, H, W) token counts, got {grid!r}") from None
    if len(tuple(grid)) != 3 or min(t, h, w) < 1:
        raise ValueError(f"video grid must be three positive token counts (T, H, W), got {tuple(grid)!r}")
    if int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1 (spatial radius in tokens), got {window!r}")
    if int(time_window) != time_window or time_window < 0:
        raise ValueError(f"time_window must be an integer >= 0 (radius in frames; 0 = same frame), "
                         f"got {time_window!r}")
    if window > MAX_WINDOW or time_window > MAX_WINDOW:
        raise ValueError(f"window and time_window must be <= {MAX_WINDOW} (larger ones cover any volume; use the "
                         f"volume's size), got {window} and {time_window}")
    if int(text_len) != text_len or text_len < 0:
        raise ValueError(f"text_len must be an integer >= 0, got {text_len!r}")
    return t, h, w


def check_video_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, grid: Grid3, window: int,
                    time_window: int) -> Grid3:
    """Validate tensors against the geometry; return (T, H, W)."""
    t, h, w = check_video_geometry(grid, window, time_window, text_len)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, tokens, head_dim], got {x.dim()} dims {tuple(x.shape)}")
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v shapes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v differ in dtype or device: {q.dtype}/{q.device}, {k.dtype}/{k.device}, "
                         f"{v.dtype}/{v.device}")
    if q.shape[2] != text_len + t * h * w:
        raise ValueError(f"sequence length {q.shape[2]} != text_len {text_len} + grid {t}x{h}x{w} = "
                         f"{text_len + t * h * w}")
    return t, h, w


def ellipsoid_coeffs(window: int, time_window: int) -> tuple[int, int, int]:
    """(A, B, C): a pair is allowed iff A dt^2 + B (dy^2 + dx^2) < C (see the module docstring)."""
    r, rt = int(window), int(time_window)
    if rt == 0:
        return r * r, 1, r * r
    return r * r, rt * rt, r * r * rt * rt


def allowed(dt, dy, dx, window: int, time_window: int):
    """The rule on integers or integer tensors (any broadcastable shapes)."""
    a, b, c = ellipsoid_coeffs(window, time_window)
    return a * dt * dt + b * (dy * dy + dx * dx) < c


def time_reach(time_window: int) -> int:
    """Largest |dt| any pair can have: r_t - 1 (0 for r_t = 0)."""
    return max(int(time_window) - 1, 0)


def covers_volume(grid: Grid3, window: int, time_window: int) -> bool:
    """True when every pair of video tokens is inside the ellipsoid: the mask is dense."""
    t, h, w = grid
    return bool(allowed(t - 1, h - 1, w - 1, window, time_window))


@lru_cache(maxsize=64)
def row_spans(window: int, time_window: int) -> tuple[tuple[int, int, int], ...]:
    """(dt, dy, m) for every (dt, dy) row of the ellipsoid: it holds dx in [-m, m]."""
    a, b, c = ellipsoid_coeffs(window, time_window)
    rt, rs = time_reach(time_window), int(window) - 1
    out = []
    for dt in range(-rt, rt + 1):
        for dy in range(-rs, rs + 1):
            rest = c - a * dt * dt - b * dy * dy      # need b dx^2 < rest
            if rest > 0:
                out.append((dt, dy, math.isqrt((rest - 1) // b)))
    return tuple(out)


def ellipsoid_size(window: int, time_window: int) -> int:
    """Video keys an interior query sees (r_t = 0: the 2-D circle, 193 / 793 / 3205 for r = 8 / 16 / 32)."""
    return sum(2 * m + 1 for _, _, m in row_spans(window, time_window))


def ellipsoid_offsets(window: int, time_window: int) -> list[tuple[int, int, int]]:
    """All (dt, dy, dx) inside the ellipsoid, frame-major then row-major."""
    return [(dt, dy, dx) for dt, dy, m in row_spans(window, time_window) for dx in range(-m, m + 1)]


# ------------------------------------------------------------------------------------------------ exact counts

def video_image_pairs(grid: Grid3, window: int, time_window: int) -> int:
    """Exact video-to-video pairs: each offset (dt, dy, dx) is realised by (T-|dt|)(H-|dy|)(W-|dx|) queries."""
    t, h, w = check_video_geometry(grid, window, time_window)

    def cols(m: int) -> int:   # sum_{dx=-m..m} max(0, W - |dx|)
        m = min(m, w - 1)
        return w + 2 * (m * w - m * (m + 1) // 2)

    return sum((t - abs(dt)) * (h - abs(dy)) * cols(m)
               for dt, dy, m in row_spans(window, time_window) if abs(dt) < t and abs(dy) < h)


def count_video_pairs(grid: Grid3, text_len: int, window: int, time_window: int) -> int:
    """Exact allowed (query, key) pairs: G*N + THW*G + sum over video queries of |ellipsoid ∩ volume| (G global)."""
    t, h, w = check_video_geometry(grid, window, time_window, text_len)
    g, n_img = int(text_len), t * h * w
    return g * (g + n_img) + n_img * g + video_image_pairs(grid, window, time_window)


def paper_video_pairs(grid: Grid3, text_len: int, window: int, time_window: int) -> int:
    """The paper-style count: a full interior ellipsoid for every video query, no border cut."""
    t, h, w = check_video_geometry(grid, window, time_window, text_len)
    g, n_img = int(text_len), t * h * w
    return g * (g + n_img) + n_img * g + n_img * ellipsoid_size(window, time_window)


def full_video_pairs(grid: Grid3, text_len: int) -> int:
    n = int(text_len) + int(grid[0]) * int(grid[1]) * int(grid[2])
    return n * n


# --------------------------------------------------------------------------------------------- dense reference

def token_coords(grid: Grid3, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, y, x) of each video token in frame-major order."""
    t, h, w = grid
    i = torch.arange(t * h * w, device=device)
    return i // (h * w), (i // w) % h, i % w


def dense_video_mask(grid: Grid3, text_len: int, window: int, time_window: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [N, N] mask (True = may attend). Small sizes only."""
    g = int(text_len)
    n = g + grid[0] * grid[1] * grid[2]
    ts, ys, xs = token_coords(grid, device)
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[g:, g:] = allowed(ts[:, None] - ts[None, :], ys[:, None] - ys[None, :], xs[:, None] - xs[None, :],
                           window, time_window)
    return mask


def reference_video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: Grid3,
                              window: int, time_window: int, scale: float | None = None) -> torch.Tensor:
    """The oracle: one SDPA call with the dense mask (N x N memory)."""
    n = q.shape[2]
    if n > MAX_REFERENCE_TOKENS:
        raise ValueError(f"the reference backend builds an N x N mask; {n} tokens is too many "
                         f"(max {MAX_REFERENCE_TOKENS}); use backend='tiled' or 'triton'")
    mask = dense_video_mask(tuple(grid), text_len, window, time_window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=default_scale(q.shape[-1], scale))
