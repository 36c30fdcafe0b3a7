"""Exact work counting (DESIGN.md §2): allowed (query, key) pairs and FLOPs, with the paper's formula beside it."""

from __future__ import annotations

from clear_cli.attention.geometry import check_geometry, circle_size, row_half_widths


def _image_pairs(h: int, w: int, window: int) -> int:
    """Sum over image queries of |circle ∩ grid|: each offset (dy, dx) is realised by (H-|dy|)(W-|dx|) queries."""
    r = int(window)
    # columns: for half width m, sum_{dx=-m..m} max(0, W-|dx|)
    def cols(m: int) -> int:
        m = min(m, w - 1)
        return w + 2 * (m * w - m * (m + 1) // 2)

    total = 0
    for i, m in enumerate(row_half_widths(r)):
        dy = i - (r - 1)
        if abs(dy) < h:
            total += (h - abs(dy)) * cols(m)
    return total


def _pooled(h: int, w: int, down_factor: int) -> int:
    return (h // down_factor) * (w // down_factor) if down_factor > 1 else 0


def count_pairs(grid: tuple[int, int], text_len: int, window: int, down_factor: int = 1) -> int:
    """Exact number of allowed (query, key) pairs: T*N + HW*T + sum |circle ∩ grid| + HW * pooled tokens."""
    h, w = check_geometry(grid, window, down_factor, text_len)
    hw, t = h * w, int(text_len)
    return t * (t + hw) + hw * t + _image_pairs(h, w, window) + hw * _pooled(h, w, down_factor)


def paper_pairs(grid: tuple[int, int], text_len: int, window: int, down_factor: int = 1) -> int:
    """The paper's count: a full interior circle (K_r keys) for every image query, no border cut."""
    h, w = check_geometry(grid, window, down_factor, text_len)
    hw, t = h * w, int(text_len)
    return t * (t + hw) + hw * t + hw * circle_size(window) + hw * _pooled(h, w, down_factor)


def full_pairs(grid: tuple[int, int], text_len: int) -> int:
    """Full attention: N^2 with N = T + H*W."""
    n = int(text_len) + int(grid[0]) * int(grid[1])
    return n * n


def image_pairs(grid: tuple[int, int], window: int) -> int:
    """Exact image-to-image pairs only (the part a block schedule can waste work on)."""
    h, w = check_geometry(grid, window)
    return _image_pairs(h, w, window)


def attention_flops(pairs: int, d_model: int) -> float:
    """FLOPs of one attention layer for `pairs` (query, key) pairs: QK^T and PV, 2 multiply-adds each."""
    return 4.0 * float(d_model) * float(pairs)
