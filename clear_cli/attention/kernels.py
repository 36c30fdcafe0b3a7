"""`clear_attention`: one entry point, several backends (reference, tiled, flex, triton); `auto` picks one per shape.

`auto`, in order:
1. exact shortcut: a window that covers the whole grid ((H-1)^2 + (W-1)^2 < r^2) puts every image pair inside the
   circle, so CLEAR is full attention plus, for f > 1, the pooled keys of the image queries: dense SDPA (two calls
   when f > 1: image queries over [keys | pooled], text queries over the keys), the same result, any device;
2. `AUTO_ORDER` per device type: CUDA tries `triton` (reads the model's layout, no gather/scatter, visits only
   touched tiles; fp16/bf16/fp32, head_dim <= 256), then `flex`, then `tiled`; elsewhere `tiled` (FlexAttention has
   no compiled CPU backward and measured slower there; Triton needs CUDA). The order is a plan, not a measurement:
   bench/gpu.sh must show triton ahead of flex per case before this order is trusted.
A kernel that fails under `auto` (e.g. does not compile for one shape) is skipped for that shape only, with one
warning per shape, and the next one in the order runs; an out-of-memory error propagates. Outside `auto` failures
propagate; so does a failure in a backward pass (it cannot be re-routed after the forward) and any failure under
torch.compile (the call is traced as is). `choose_backend` says what `auto` picks and why; `check_backend` raises
ValueError (one line naming the choices) for a backend the device cannot run, e.g. `triton` on the CPU without
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import check_qkv, default_scale, pool_tokens, pool_weight
from clear_cli.attention.padding import check_text_mask, compacted, key_mask, text_query_output

BACKENDS = ("auto", "reference", "tiled", "flex", "triton")
SHORTCUT = "sdpa"   # what `auto` reports for the exact whole-grid shortcut (not a backend one can ask for)
_BROKEN: set = set()          # (backend, shape key) that failed under `auto`
_FALLBACKS: dict = {}         # shape key -> one line: what failed and what runs instead


def covers_grid(grid: tuple[int, int], window: int) -> bool:
    """True when every pair of image tokens is strictly inside the circle: the mask is dense."""
    h, w = grid
    return (h - 1) ** 2 + (w - 1) ** 2 < int(window) ** 2


def triton_status(device: torch.device | str) -> tuple[bool, str]:
    """(can the Triton backend run on `device`, why). Imports Triton only where it could run."""
    dev = torch.device(device)
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        mod = sys.modules.get("clear_cli.attention.triton_clear")
        if mod is None or not mod.INTERPRET:
            return False, "Triton runs on CUDA (on the CPU only under TRITON_INTERPRET=1)"
    if dev.type not in ("cpu", "cuda"):
        return False, f"Triton does not run on {dev.type}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return False, "CUDA is not available"
    try:
        from clear_cli.attention import triton_clear
    except ImportError as e:
        return False, f"Triton is not installed ({e})"
    return triton_clear.available(dev)


def _flex_ok(device: torch.device) -> bool:
    from clear_cli.attention.flex import flex_available
    return flex_available(device)


# What `auto` tries, in order, per device type (after the exact shortcut); the last entry always runs.
AUTO_ORDER = {"cuda": ("triton", "flex", "tiled")}
DEFAULT_ORDER = ("tiled",)
WHY = {
    "triton": "Triton kernel in the model's layout (no gather/scatter), touched tiles only",
    "flex": "FlexAttention, block mask from the geometry",
    "tiled": "tiled SDPA",
}


def _usable(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[bool, str]:
    if name == "triton":
        ok, why = triton_status(device)
        if not ok:
            return False, why
        from clear_cli.attention.triton_clear import DTYPES, MAX_HEAD_DIM
        if dtype not in DTYPES:
            return False, f"it takes fp16/bf16/fp32, not {dtype}"
        if head_dim > MAX_HEAD_DIM:
            return False, f"it takes head_dim <= {MAX_HEAD_DIM}, not {head_dim}"
        return True, ""
    if name == "flex":
        return (True, "") if _flex_ok(device) else (False, "FlexAttention needs CUDA here")
    return True, ""


def shape_key(device: torch.device | str, dtype: torch.dtype, shape: tuple, grid: tuple[int, int], text_len: int,
              window: int, down_factor: int) -> tuple:
    dev = torch.device(device)
    return (dev.type, dev.index, str(dtype), tuple(int(s) for s in shape), tuple(int(g) for g in grid),
            int(text_len), int(window), int(down_factor))


def fallback_reason(device: torch.device | str, dtype: torch.dtype, shape: tuple, grid: tuple[int, int],
                    text_len: int, window: int, down_factor: int = 1) -> str | None:
    """The warning `auto` gave when a kernel failed for this shape (None if none did)."""
    return _FALLBACKS.get(shape_key(device, dtype, shape, grid, text_len, window, down_factor))


def _auto_chain(device: torch.device, dtype: torch.dtype, shape: tuple, grid: tuple[int, int], text_len: int,
                window: int, down_factor: int) -> tuple[list[str], list[str]]:
    """(backends `auto` would try in order, notes on the ones it skipped)."""
    order = AUTO_ORDER.get(device.type, DEFAULT_ORDER)
    if len(order) == 1:
        return list(order), []
    key = shape_key(device, dtype, shape, grid, text_len, window, down_factor)
    chain, skipped = [], []
    for i, name in enumerate(order):
        if i + 1 < len(order):
            if (name, key) in _BROKEN:
                skipped.append(f"{name} failed for this shape")
                continue
            ok, why = _usable(name, device, dtype, int(shape[-1]))
            if not ok:
                skipped.append(f"{name}: {why}")
                continue
        chain.append(name)
    return chain, skipped


def choose_backend(device: torch.device | str, dtype: torch.dtype, shape: tuple, grid: tuple[int, int],
                   text_len: int, window: int, down_factor: int = 1, padded: bool = False) -> tuple[str, str]:
    """(what `auto` runs for this call, why): a backend name, or `SHORTCUT` for the exact dense-SDPA shortcut.
    `shape` is q's [batch, heads, tokens, head_dim]; `padded`: the call has a text key-padding mask (the reason
    then says how that backend honours it, `MASK_ROUTE`)."""
    name, why = _choose(device, dtype, shape, grid, text_len, window, down_factor)
    return name, (f"{why}; text padding: {MASK_ROUTE[name]}" if padded else why)


def _choose(device, dtype, shape, grid, text_len, window, down_factor) -> tuple[str, str]:
    dev = torch.device(device)
    h, w = grid
    if covers_grid(grid, window):
        extra = " (pooled keys: image queries in a second SDPA)" if down_factor > 1 else ""
        return SHORTCUT, (f"window {window} covers the {h}x{w} grid: every image pair is inside the circle, "
                          f"dense SDPA is exact{extra}")
    chain, skipped = _auto_chain(dev, dtype, shape, grid, text_len, window, down_factor)
    why = f"{dev.type}: {WHY[chain[0]]}"
    if dev.type == "cpu" and chain[0] == "tiled":
        why += " (FlexAttention has no compiled CPU backward; Triton needs CUDA)"
    return chain[0], why + (f"; skipped {'; '.join(skipped)}" if skipped else "")


def check_backend(backend: str, device: torch.device | str) -> None:
    """ValueError (one line naming the choices) for an unknown backend or one that cannot run on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    dev = torch.device(device)
    if backend == "triton":
        ok, why = triton_status(dev)
        if not ok:
            usable = [b for b in BACKENDS if b != "triton"]
            raise ValueError(f"backend 'triton' cannot run on {dev.type}: {why}; use one of {', '.join(usable)}")


def clear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: tuple[int, int],
                    window: int, down_factor: int = 1, down_weight: torch.Tensor | None = None,
                    scale: float | None = None, backend: str = "auto",
                    text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLEAR attention over `[batch, heads, text_len + H*W, head_dim]` q/k/v (text first, image row-major).

    Text queries see every text and image key; image queries see every text key, the image keys strictly inside a
    circle of radius `window` tokens (cut at the border) and, with `down_factor` f > 1, all (H/f)(W/f) keys/values
    pooled from f x f patches with `down_weight` (f x f, default 1/f^2). Returns the same shape as q.
    `text_mask`: [batch, text_len] bool of valid text keys (padding): a padded text key is seen by no query
    (`padding`); every backend honours it, natively or through `padding.compacted` (`MASK_ROUTE`).
    """
    h, w = check_qkv(q, k, v, text_len, grid, window, down_factor, down_weight)
    grid = (h, w)
    tm = check_text_mask(text_mask, q.shape[0], int(text_len), q.device)
    kw = dict(text_len=int(text_len), grid=grid, window=int(window), down_factor=int(down_factor),
              down_weight=down_weight, scale=scale)
    if tm is not None:
        kw["text_mask"] = tm
    if backend != "auto":
        check_backend(backend, q.device)
        return _RUN[backend](q, k, v, **kw)
    if covers_grid(grid, window):
        return _RUN[SHORTCUT](q, k, v, **kw)
    chain, _ = _auto_chain(q.device, q.dtype, tuple(q.shape), grid, text_len, window, down_factor)
    if len(chain) == 1 or torch.compiler.is_compiling():
        return _RUN[chain[0]](q, k, v, **kw)
    key = shape_key(q.device, q.dtype, tuple(q.shape), grid, text_len, window, down_factor)
    for i, b in enumerate(chain[:-1]):
        try:
            return _RUN[b](q, k, v, **kw)
        except torch.OutOfMemoryError:
            raise   # another kernel would not fit either
        except Exception as e:  # e.g. a compile failure for this shape: fall back for this shape only, say so once
            _BROKEN.add((b, key))
            msg = (f"CLEAR attention: the {b} kernel failed for {tuple(q.shape)} {q.dtype}, grid {h}x{w}, "
                   f"window {window}, down_factor {down_factor} ({type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200] if str(e) else ''}); using {chain[i + 1]} for this shape")
            if key not in _FALLBACKS:
                warnings.warn(msg, stacklevel=2)
            _FALLBACKS[key] = msg
    return _RUN[chain[-1]](q, k, v, **kw)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _sdpa(q, k, v, *, text_len, grid, window, down_factor, down_weight, scale, text_mask=None):
    """The exact shortcut for a window that covers the grid (see the module docstring); padding as a key mask."""
    sc = default_scale(q.shape[-1], scale)
    t, f = text_len, down_factor
    if f == 1:
        mask = None if text_mask is None else key_mask(text_mask, k.shape[2] - t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=sc)
    wt = pool_weight(down_weight, f, k)
    k_all = torch.cat([k, pool_tokens(k[:, :, t:], grid, f, wt)], 2)
    v_all = torch.cat([v, pool_tokens(v[:, :, t:], grid, f, wt)], 2)
    mask = None if text_mask is None else key_mask(text_mask, k_all.shape[2] - t)
    o_img = F.scaled_dot_product_attention(q[:, :, t:], k_all, v_all, attn_mask=mask, scale=sc)
    if t == 0:
        return o_img
    if text_mask is not None:
        return torch.cat([text_query_output(q, k, v, t, text_mask, scale), o_img], 2)
    return torch.cat([F.scaled_dot_product_attention(q[:, :, :t], k, v, scale=sc), o_img], 2)


def _reference(q, k, v, **kw):
    from clear_cli.attention.reference import reference_attention
    return reference_attention(q, k, v, **kw)


def _tiled(q, k, v, **kw):
    from clear_cli.attention.tiled import tiled_attention
    return tiled_attention(q, k, v, **kw)


def _flex(q, k, v, **kw):
    from clear_cli.attention.flex import flex_attention_clear
    return flex_attention_clear(q, k, v, **kw)


def _triton_kernel():
    from clear_cli.attention.triton_clear import clear_triton_attention
    return clear_triton_attention


def _triton(q, k, v, **kw):
    fn = _triton_kernel()
    if kw.get("text_mask") is not None:   # the kernel takes no mask: valid text keys gathered per group
        return compacted(fn, q, k, v, **kw)
    return fn(q, k, v, **kw)


# How each backend honours a text key-padding mask (`padding`); `choose_backend` reports it per call.
MASK_ROUTE = {
    "reference": "key mask in the dense mask",
    SHORTCUT: "key mask in the dense SDPA",
    "flex": "padded text keys masked in mask_mod (text blocks partial)",
    "tiled": "inference on CPU: key mask in the bands' global-key call; otherwise valid text keys gathered per "
             "group of equal masks",
    "triton": "the kernel takes no mask: valid text keys gathered per group of equal masks, then the kernel",
}


_RUN = {"reference": _reference, "tiled": _tiled, "flex": _flex, "triton": _triton, SHORTCUT: _sdpa}
