"""3-D CLEAR with FlexAttention: video tokens gathered into 3-D tiles inside the call, block mask from the geometry.

Queries are laid out in q tiles (one Q block each), keys in kv tiles (one KV block each) after the global keys
(padded to whole blocks); which KV blocks a Q block touches, and which are full, are the 3-D tile relations
(`video_plan.video_tile_relations`), never a mask evaluated over N x N. Partial blocks use a mask_mod computed from
slot indices alone (frame, row, column by integer arithmetic); pad query slots see every key of their blocks (no
empty row; their output is dropped). Outputs are scattered back to the frame-major layout. Global queries attend
densely in a separate SDPA. Eager only here (FlexAttention compiles on CUDA; the CPU runs it forward only, unfused:
what the tests use). Kept as the comparison STA measured (a FlexAttention 3-D window): the Triton kernel is the
fast path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.flex import FlexLayout, _flex_fn
from clear_cli.attention.geometry import default_scale
from clear_cli.attention.video_geometry import Grid3, ellipsoid_coeffs
from clear_cli.attention.video_plan import Tile3, video_tile_relations
from clear_cli.attention.video_tiled import video_tile_order

Q_TILES: tuple[Tile3, ...] = ((1, 8, 16), (2, 8, 8), (2, 4, 16))     # 128-token Q blocks
KV_TILES: tuple[Tile3, ...] = ((1, 8, 8), (2, 4, 8), (1, 4, 16))     # 64-token KV blocks


@dataclass
class VideoFlexPlan:
    q_index: torch.Tensor     # [Lq] video token of each query slot (pads -> 0)
    q_out: torch.Tensor       # [T*H*W] query slot of each video token
    kv_index: torch.Tensor    # [Lk] row of k (global + video) of each key slot (pads -> 0)
    block_mask: object


@lru_cache(maxsize=64)
def choose_flex_tiles(grid: Grid3, window: int, time_window: int) -> tuple[Tile3, Tile3]:
    """The (q tile, kv tile) pair whose touched blocks hold the fewest pairs."""
    return min(((a, b) for a in Q_TILES for b in KV_TILES),
               key=lambda ab: video_tile_relations(grid, window, time_window, ab[0], ab[1]).touched)


def make_video_mask_mod(grid: Grid3, text_len: int, window: int, time_window: int, q_tile: Tile3, kv_tile: Tile3):
    t, h, w = grid
    g = int(text_len)
    a, b, c = ellipsoid_coeffs(window, time_window)
    qb, kb = q_tile[0] * q_tile[1] * q_tile[2], kv_tile[0] * kv_tile[1] * kv_tile[2]
    q_lat = (-(-h // q_tile[1]), -(-w // q_tile[2]))
    k_lat = (-(-h // kv_tile[1]), -(-w // kv_tile[2]))
    n_text_k = -(-g // kb) * kb

    def coords(slot, tile, lat, size):
        i, s = slot // size, slot % size
        tt = (i // (lat[0] * lat[1])) * tile[0] + s // (tile[1] * tile[2])
        yy = ((i // lat[1]) % lat[0]) * tile[1] + (s // tile[2]) % tile[1]
        xx = (i % lat[1]) * tile[2] + s % tile[2]
        return tt.to(torch.int64), yy.to(torch.int64), xx.to(torch.int64)

    def mask_mod(bb, hh, q_idx, kv_idx):
        qt, qy, qx = coords(q_idx, q_tile, q_lat, qb)
        kt, ky, kx = coords(kv_idx - n_text_k, kv_tile, k_lat, kb)
        text_k = kv_idx < g
        vid_k = (kv_idx >= n_text_k) & (kt < t) & (ky < h) & (kx < w)
        dt, dy, dx = qt - kt, qy - ky, qx - kx
        inside = a * dt * dt + b * (dy * dy + dx * dx) < c
        return text_k | (vid_k & inside) | (qt >= t) | (qy >= h) | (qx >= w)

    return mask_mod


@lru_cache(maxsize=16)
def video_flex_plan(grid: Grid3, text_len: int, window: int, time_window: int, q_tile: Tile3, kv_tile: Tile3,
                    device: torch.device) -> VideoFlexPlan:
    from torch.nn.attention.flex_attention import BlockMask

    n_img, g = grid[0] * grid[1] * grid[2], int(text_len)
    qb, kb = q_tile[0] * q_tile[1] * q_tile[2], kv_tile[0] * kv_tile[1] * kv_tile[2]
    q_slot, _ = video_tile_order(grid, q_tile, device)
    k_slot, _ = video_tile_order(grid, kv_tile, device)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    nt_text = -(-g // kb)
    kv_index = torch.cat([torch.where(ar(nt_text * kb) < g, ar(nt_text * kb), 0),
                          torch.where(k_slot < n_img, g + k_slot, 0)])
    q_index = torch.where(q_slot < n_img, q_slot, 0)
    q_out = torch.empty(n_img, dtype=torch.long, device=device)
    real = q_slot < n_img
    q_out[q_slot[real]] = ar(q_slot.numel())[real]
    rel = video_tile_relations(grid, window, time_window, q_tile, kv_tile, "cpu")
    n_q, n_kv = rel.n_tiles, nt_text + k_slot.numel() // kb
    # block states per (Q block, KV block): 0 none, 1 partial (mask_mod), 2 full
    state = torch.zeros(n_q, n_kv, dtype=torch.int8)
    state[:, :nt_text] = torch.where(torch.arange(nt_text) * kb + kb <= g, 2, 1).to(torch.int8)
    cols = torch.arange(rel.index.shape[1])[None]
    touched = cols < rel.counts[:, 1:2]
    full = cols < rel.counts[:, 0:1]
    rows = torch.arange(n_q)[:, None].expand_as(rel.index)
    state[rows[touched], nt_text + rel.index.long()[touched]] = torch.where(full[touched], 2, 1).to(torch.int8)

    def pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # rows span every KV block, as BlockMask expects (see flex.flex_plan)
        num = sel.sum(1).to(torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
        return num[None, None].to(device), idx.to(torch.int32)[None, None].contiguous().to(device)

    kv_num, kv_idx = pack(state == 1)
    full_num, full_idx = pack(state == 2)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(qb, kb),
                                  mask_mod=make_video_mask_mod(grid, g, window, time_window, q_tile, kv_tile),
                                  seq_lengths=(q_slot.numel(), kv_index.numel()))
    return VideoFlexPlan(q_index, q_out, kv_index, bm)


def flex_video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: Grid3,
                         window: int, time_window: int, scale: float | None = None,
                         q_tile: Tile3 | None = None, kv_tile: Tile3 | None = None) -> torch.Tensor:
    """3-D CLEAR attention with FlexAttention (inputs already checked by `clear_video_attention`)."""
    g = int(text_len)
    grid = (int(grid[0]), int(grid[1]), int(grid[2]))
    if q_tile is None or kv_tile is None:
        dq, dk = choose_flex_tiles(grid, int(window), int(time_window))
        q_tile, kv_tile = tuple(q_tile or dq), tuple(kv_tile or dk)
    sc = default_scale(q.shape[-1], scale)
    plan = video_flex_plan(grid, g, int(window), int(time_window), tuple(q_tile), tuple(kv_tile), q.device)
    qs = torch.index_select(q[:, :, g:], 2, plan.q_index)
    ks = torch.index_select(k, 2, plan.kv_index)
    vs = torch.index_select(v, 2, plan.kv_index)
    qb, kb = plan.block_mask.BLOCK_SIZE
    opts = FlexLayout("video", (1, qb), (1, kb)).kernel_options(q.dtype)
    with warnings.catch_warnings():   # eager CPU flex warns that it is unfused; tests use it on purpose
        warnings.simplefilter("ignore", UserWarning)
        o = _flex_fn(q.device)(qs, ks, vs, block_mask=plan.block_mask, scale=sc, kernel_options=opts)
    out = torch.index_select(o, 2, plan.q_out)
    if g == 0:
        return out
    return torch.cat([F.scaled_dot_product_attention(q[:, :, :g], k, v, scale=sc), out], 2)
