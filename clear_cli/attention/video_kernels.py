"""`clear_video_attention`: 3-D CLEAR attention (space and time) with backends reference, tiled, triton and `auto`.

`auto`: a window that covers the whole volume is full attention (dense SDPA, exact); otherwise CUDA tries `triton`
(3-D tiles in the model's layout), then `tiled`; elsewhere `tiled`. A kernel that fails under `auto` for one shape is
skipped for that shape with one warning; out-of-memory errors and failures under torch.compile propagate. `flex`
(FlexAttention, 3-D block mask from the geometry; eager, forward only on the CPU) runs when asked for, not in `auto`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale
from clear_cli.attention.video_geometry import Grid3, check_video_qkv, covers_volume

VIDEO_BACKENDS = ("auto", "reference", "tiled", "flex", "triton")
SHORTCUT = "sdpa"
AUTO_ORDER = {"cuda": ("triton", "tiled")}
DEFAULT_ORDER = ("tiled",)
_BROKEN: set = set()


def _usable(name: str, q: torch.Tensor) -> tuple[bool, str]:
    if name != "triton":
        return True, ""
    from clear_cli.attention.kernels import triton_status
    ok, why = triton_status(q.device)
    if not ok:
        return False, why
    from clear_cli.attention.triton_clear import DTYPES, MAX_HEAD_DIM
    if q.dtype not in DTYPES or q.shape[-1] > MAX_HEAD_DIM:
        return False, f"it takes fp16/bf16/fp32 and head_dim <= {MAX_HEAD_DIM}"
    return True, ""


def choose_video_backend(q: torch.Tensor, grid: Grid3, window: int, time_window: int) -> str:
    """What `auto` runs for this call: a backend name, or `sdpa` for the exact whole-volume shortcut."""
    if covers_volume(tuple(grid), window, time_window):
        return SHORTCUT
    for name in AUTO_ORDER.get(q.device.type, DEFAULT_ORDER):
        key = (name, q.device.type, str(q.dtype), tuple(q.shape), tuple(grid), int(window), int(time_window))
        if key not in _BROKEN and _usable(name, q)[0]:
            return name
    return "tiled"


def clear_video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Grid3, window: int,
                          time_window: int, text_len: int = 0, scale: float | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """3-D CLEAR attention over `[batch, heads, text_len + T*H*W, head_dim]` q/k/v (global tokens first, then the
    video tokens frame-major). See `video_geometry` for the rule. Returns the same shape as q."""
    grid = check_video_qkv(q, k, v, text_len, grid, window, time_window)
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(VIDEO_BACKENDS)}")
    kw = dict(text_len=int(text_len), grid=grid, window=int(window), time_window=int(time_window), scale=scale)
    if backend != "auto":
        if backend == "triton":
            ok, why = _usable("triton", q)
            if not ok:
                raise ValueError(f"backend 'triton' cannot run here: {why}; use tiled or reference")
        return _RUN[backend](q, k, v, **kw)
    first = choose_video_backend(q, grid, window, time_window)
    if first in (SHORTCUT, "tiled") or torch.compiler.is_compiling():
        return _RUN[first](q, k, v, **kw)
    try:
        return _RUN[first](q, k, v, **kw)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # e.g. a compile failure for this shape: tiled for this shape, said once
        _BROKEN.add((first, q.device.type, str(q.dtype), tuple(q.shape), tuple(grid), int(window), int(time_window)))
        why = str(e).splitlines()[0][:200] if str(e) else ""
        warnings.warn(f"CLEAR video attention: the {first} kernel failed for {tuple(q.shape)} {q.dtype}, grid "
                      f"{'x'.join(map(str, grid))} ({type(e).__name__}: {why}); using tiled for this shape",
                      stacklevel=2)
        return _RUN["tiled"](q, k, v, **kw)


def _sdpa(q, k, v, *, text_len, grid, window, time_window, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=default_scale(q.shape[-1], scale))


def _reference(q, k, v, **kw):
    from clear_cli.attention.video_geometry import reference_video_attention
    return reference_video_attention(q, k, v, **kw)


def _tiled(q, k, v, **kw):
    from clear_cli.attention.video_tiled import tiled_video_attention
    return tiled_video_attention(q, k, v, **kw)


def _flex(q, k, v, **kw):
    from clear_cli.attention.video_flex import flex_video_attention
    return flex_video_attention(q, k, v, **kw)


def _triton(q, k, v, **kw):
    from clear_cli.attention.video_triton import clear_video_triton_attention
    return clear_video_triton_attention(q, k, v, **kw)


_RUN = {"reference": _reference, "tiled": _tiled, "flex": _flex, "triton": _triton, SHORTCUT: _sdpa}
