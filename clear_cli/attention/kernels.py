"""`clear_attention`: one entry point, several backends (reference, tiled, flex), `auto` picks the fastest valid one."""

from __future__ import annotations

import warnings

import torch

from clear_cli.attention.geometry import check_qkv

BACKENDS = ("auto", "reference", "tiled", "flex")
_FALLBACK_WARNED: list = []
_FLEX_BROKEN: set = set()


def clear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: tuple[int, int],
                    window: int, down_factor: int = 1, down_weight: torch.Tensor | None = None,
                    scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """CLEAR attention over `[batch, heads, text_len + H*W, head_dim]` q/k/v (text first, image row-major).

    Text queries see every text and image key; image queries see every text key, the image keys strictly inside a
    circle of radius `window` tokens (cut at the border) and, with `down_factor` f > 1, all (H/f)(W/f) keys/values
    pooled from f x f patches with `down_weight` (f x f, default 1/f^2). Returns the same shape as q.
    """
    h, w = check_qkv(q, k, v, text_len, grid, window, down_factor, down_weight)
    grid = (h, w)
    name = select_backend(q, k, v, down_weight, backend)
    kw = dict(text_len=int(text_len), grid=grid, window=int(window), down_factor=int(down_factor),
              down_weight=down_weight, scale=scale)
    if name == "reference":
        from clear_cli.attention.reference import reference_attention
        return reference_attention(q, k, v, **kw)
    if name == "tiled":
        from clear_cli.attention.tiled import tiled_attention
        return tiled_attention(q, k, v, **kw)
    from clear_cli.attention.flex import flex_attention_clear
    if backend != "auto":
        return flex_attention_clear(q, k, v, **kw)
    try:
        return flex_attention_clear(q, k, v, **kw)
    except Exception as e:  # a compile failure must not take generation down: fall back, say so once
        if not _FALLBACK_WARNED:
            _FALLBACK_WARNED.append(True)
            warnings.warn(f"FlexAttention failed ({type(e).__name__}: {e}); using the tiled backend", stacklevel=2)
        _FLEX_BROKEN.add(q.device.type)
        from clear_cli.attention.tiled import tiled_attention
        return tiled_attention(q, k, v, **kw)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, down_weight: torch.Tensor | None,
                   backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    # CUDA: compiled FlexAttention (forward and backward). CPU: FlexAttention has no compiled backward there and
    # measured slower than the tiled SDPA path in both directions, so `auto` never picks it.
    if q.device.type == "cuda" and "cuda" not in _FLEX_BROKEN:
        from clear_cli.attention.flex import flex_available
        if flex_available(q.device):
            return "flex"
    return "tiled"
