"""The oracle: a dense boolean mask over all (query, key) pairs and one SDPA call. Small sizes only (N^2 memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale, pool_tokens, pool_weight
from clear_cli.attention.padding import key_mask

MAX_REFERENCE_TOKENS = 20_000


def dense_mask(grid: tuple[int, int], text_len: int, window: int, down_factor: int = 1,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [N, N + P] mask (True = may attend); P = pooled tokens, appended after the image keys."""
    h, w = grid
    hw, t, f = h * w, text_len, down_factor
    p = (h // f) * (w // f) if f > 1 else 0
    n = t + hw
    ys = torch.arange(h, device=device).repeat_interleave(w)
    xs = torch.arange(w, device=device).repeat(h)
    d2 = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
    mask = torch.zeros(n, n + p, dtype=torch.bool, device=device)
    mask[:t, :n] = True                       # text queries: every text and image key, no pooled key
    mask[t:, :t] = True                       # image queries: every text key
    mask[t:, t:n] = d2 < window * window      # image queries: the circle, cut at the border
    if p:
        mask[t:, n:] = True                   # image queries: every pooled key
    return mask


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: tuple[int, int],
                        window: int, down_factor: int = 1, down_weight: torch.Tensor | None = None,
                        scale: float | None = None, text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`text_mask` [B, T] bool of valid text keys: a padded text key is seen by no query (`padding`)."""
    n = q.shape[2]
    if n > MAX_REFERENCE_TOKENS:
        raise ValueError(f"the reference backend builds an N x N mask; {n} tokens is too many "
                         f"(max {MAX_REFERENCE_TOKENS}); use backend='tiled' or 'flex'")
    f = down_factor
    if f > 1:
        wt = pool_weight(down_weight, f, k)
        k = torch.cat([k, pool_tokens(k[:, :, text_len:], grid, f, wt)], dim=2)
        v = torch.cat([v, pool_tokens(v[:, :, text_len:], grid, f, wt)], dim=2)
    mask = dense_mask(grid, text_len, window, f, q.device)
    if text_mask is not None:
        mask = mask & key_mask(text_mask.to(q.device, torch.bool), mask.shape[1] - text_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=default_scale(q.shape[-1], scale))
