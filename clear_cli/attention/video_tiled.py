"""Portable, differentiable 3-D CLEAR attention: (frames x rows x columns) query tiles with their halo of video keys.

The 2-D `tiled` kernel lifted to a (T, H, W) grid: video queries are gathered tile-major into ta x a x b tiles; each
tile attends to the global (text) keys and the union of its queries' ellipsoids (the halo box trimmed to that union),
in one batched SDPA call per memory-bounded chunk of tiles with an additive mask. Interior tiles share one mask
(broadcast); border tiles (halo leaving the volume, or ragged edge tiles with pad slots) get their own. Work and
memory grow with N x window^2 x time_window, never N^2. Global queries attend densely. Autograd does the backward.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale
from clear_cli.attention.tiled import CHUNK_BYTES, GATHER_COST, TilePlan, _EFFICIENCY
from clear_cli.attention.tracing import compiling, outside_graph
from clear_cli.attention.video_geometry import Grid3, allowed, time_reach

Tile3 = tuple[int, int, int]
TILE_CANDIDATES: tuple[Tile3, ...] = ((1, 4, 4), (1, 4, 8), (1, 8, 8), (2, 4, 8), (4, 4, 4), (1, 8, 16),
                                      (2, 8, 8), (4, 4, 8), (2, 8, 16), (4, 8, 8), (4, 8, 16))


def video_tile_order(grid: Grid3, tile: Tile3, device: torch.device | str = "cpu"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot_to_token [tiles*ta*a*b], with T*H*W marking a pad slot; tile_origin [tiles, 3]). Tiles run frame-major
    over the tile lattice; inside a tile, tokens run frame-major too."""
    (t, h, w), (ta, a, b) = grid, tile
    nt, ny, nx = -(-t // ta), -(-h // a), -(-w // b)
    it = torch.arange(nt * ny * nx, device=device)
    origin = torch.stack([it // (ny * nx) * ta, it // nx % ny * a, it % nx * b], 1)
    s = torch.arange(ta * a * b, device=device)
    local = torch.stack([s // (a * b), s // b % a, s % b], 1)
    pos = origin[:, None, :] + local[None]                           # [tiles, slots, 3]
    inside = (pos[..., 0] < t) & (pos[..., 1] < h) & (pos[..., 2] < w)
    token = (pos[..., 0] * h + pos[..., 1]) * w + pos[..., 2]
    return torch.where(inside, token, torch.full_like(token, t * h * w)).reshape(-1), origin


def video_tile_key_offsets(tile: Tile3, window: int, time_window: int, grid: Grid3 | None = None
                           ) -> tuple[tuple[int, int, int], ...]:
    """Offsets from the tile origin of the video keys some query of the tile sees (the union of the ellipsoids):
    per axis the nearest query coordinate decides, since the rule only grows with |dt|, |dy| and |dx|. With `grid`,
    the halo stops where no key of the volume can lie (|offset| <= extent - 1 beyond the tile): a window larger than
    the volume costs no more than the volume."""
    reach = [time_reach(time_window), int(window) - 1, int(window) - 1]
    if grid is not None:
        reach = [min(r, g - 1) for r, g in zip(reach, grid)]
    return _offsets(tuple(tile), int(window), int(time_window), tuple(reach))


@lru_cache(maxsize=256)
def _offsets(tile: Tile3, window: int, time_window: int, reach: Tile3) -> tuple[tuple[int, int, int], ...]:
    ta, a, b = tile
    dt = torch.arange(-reach[0], ta + reach[0])
    dy = torch.arange(-reach[1], a + reach[1])
    dx = torch.arange(-reach[2], b + reach[2])
    gt = dt - dt.clamp(0, ta - 1)
    gy = dy - dy.clamp(0, a - 1)
    gx = dx - dx.clamp(0, b - 1)
    ok = allowed(gt[:, None, None], gy[None, :, None], gx[None, None, :], window, time_window)
    idx = torch.nonzero(ok)
    return tuple((int(dt[i]), int(dy[j]), int(dx[k])) for i, j, k in idx.tolist())


@lru_cache(maxsize=256)
def choose_video_tile(grid: Grid3, window: int, time_window: int, head_dim: int = 64, text_len: int = 0) -> Tile3:
    """Tile minimising the modelled time (as `tiled.choose_tile`): keys per tile x (queries / efficiency + gather)."""
    t, h, w = grid
    best, best_cost = (1, 8, 8), float("inf")
    for ta, a, b in TILE_CANDIDATES:
        n_tiles = -(-t // ta) * -(-h // a) * -(-w // b)
        k_all = len(video_tile_key_offsets((ta, a, b), window, time_window, grid)) + text_len
        q = ta * a * b
        cost = n_tiles * k_all * (q * 55.0 / _EFFICIENCY[q] + GATHER_COST * head_dim / 64 * 26)
        if cost < best_cost:
            best, best_cost = (ta, a, b), cost
    return best


@lru_cache(maxsize=32)
def video_tile_plan(grid: Grid3, text_len: int, window: int, time_window: int, tile: Tile3,
                    device: torch.device) -> TilePlan:
    """The 2-D kernel's plan type (`tiled.TilePlan`) filled from the 3-D geometry; its masks are built the same way."""
    t, h, w = grid
    g, n_img = int(text_len), t * h * w
    n = g + n_img
    q_slots = tile[0] * tile[1] * tile[2]
    slot_to_token, origin = video_tile_order(grid, tile, device)
    offs = torch.tensor(video_tile_key_offsets(tile, window, time_window, grid), dtype=torch.long, device=device)
    kt = origin[:, 0:1] + offs[None, :, 0]
    ky = origin[:, 1:2] + offs[None, :, 1]
    kx = origin[:, 2:3] + offs[None, :, 2]
    valid = (kt >= 0) & (kt < t) & (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    pad_query = (slot_to_token == n_img).reshape(-1, q_slots)
    border = ~valid.all(1) | pad_query.any(1)
    order = torch.cat([torch.nonzero(border).flatten(), torch.nonzero(~border).flatten()])
    n_border = int(border.sum())
    valid, pad_query, kt, ky, kx = valid[order], pad_query[order], kt[order], ky[order], kx[order]
    slot_to_token = slot_to_token.reshape(-1, q_slots)[order].reshape(-1)
    out_rows = torch.where(slot_to_token < n_img, g + slot_to_token, torch.full_like(slot_to_token, n))
    n_tiles = order.numel()
    img_index = torch.where(valid, g + (kt.clamp(0, t - 1) * h + ky.clamp(0, h - 1)) * w + kx.clamp(0, w - 1),
                            torch.full_like(ky, n))
    parts = [torch.arange(g, device=device).expand(n_tiles, g)] if g else []
    key_index = torch.cat([*parts, img_index], dim=1).contiguous()
    s = torch.arange(q_slots, device=device)
    qt, qy, qx = s // (tile[1] * tile[2]), s // tile[2] % tile[1], s % tile[2]
    rel = allowed(qt[:, None] - offs[None, :, 0], qy[:, None] - offs[None, :, 1], qx[:, None] - offs[None, :, 2],
                  window, time_window)
    return TilePlan(tile, n_tiles, n_border, slot_to_token, out_rows, key_index, rel,
                    valid[:n_border].contiguous(), pad_query[:n_border].contiguous(), g, 0)


# Under torch.compile the plan, the tile choice and the masks are graph constants, built eagerly at trace time.
@outside_graph
def _traced_choose(*args):
    return choose_video_tile(*args)


@outside_graph
def _traced_plan(*args):
    p = video_tile_plan(*args)
    return p.keys_per_tile, p.n_border, p.n_tiles, p.key_index, p.slot_to_token, p.out_rows


@outside_graph
def _traced_mask(args, c0, c1, dtype):
    return video_tile_plan(*args).build_mask(c0, c1, dtype)


def tiled_video_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: Grid3,
                          window: int, time_window: int, scale: float | None = None,
                          tile: Tile3 | None = None) -> torch.Tensor:
    """3-D CLEAR attention by query tiles (inputs already checked by `clear_video_attention`)."""
    bsz, nh, n, d = q.shape
    bh = bsz * nh
    g = int(text_len)
    t, h, w = grid
    n_img = t * h * w
    sc = default_scale(d, scale)
    traced = compiling()
    if tile is None:
        tile = (_traced_choose if traced else choose_video_tile)((t, h, w), window, time_window, d, g)
    args = ((t, h, w), g, int(window), int(time_window), tuple(tile), q.device)
    if traced:
        n_keys, n_border, n_tiles, key_index, slot_to_token, out_rows = _traced_plan(*args)
        plan = None
    else:
        plan = video_tile_plan(*args)
        n_keys, n_border, n_tiles = plan.keys_per_tile, plan.n_border, plan.n_tiles
        key_index, slot_to_token, out_rows = plan.key_index, plan.slot_to_token, plan.out_rows
    q_slots = tile[0] * tile[1] * tile[2]

    # token-major sources [rows, bh*d]: k/v = [global + video | zero row], q = [video | zero row]
    k_src, v_src = q.new_empty(n + 1, bh * d), q.new_empty(n + 1, bh * d)
    for src, x in ((k_src, k), (v_src, v)):
        src[n].zero_()
        src[:n].view(n, bsz, nh, d).copy_(x.permute(2, 0, 1, 3))
    q_src = q.new_empty(n_img + 1, bh * d)
    q_src[n_img].zero_()
    q_src[:n_img].view(n_img, bsz, nh, d).copy_(q[:, :, g:].permute(2, 0, 1, 3))

    def tiles_view(x: torch.Tensor, nc: int, length: int) -> torch.Tensor:
        return x.view(nc, length, bh, d).permute(2, 0, 1, 3)

    per_tile = n_keys * max(bh * d, q_slots) * q.element_size()
    chunk = max(1, CHUNK_BYTES // max(per_tile, 1))
    bounds, c0 = [], 0
    for end in (n_border, n_tiles):   # chunks never mix border and interior tiles
        while c0 < end:
            bounds.append((c0, min(end, c0 + chunk)))
            c0 = bounds[-1][1]
    out = q.new_empty(n + 1, bh * d)   # [global | video | one dump row for pad slots]
    if g:
        o_text = F.scaled_dot_product_attention(q[:, :, :g], k, v, scale=sc)
        out[:g].view(g, bsz, nh, d).copy_(o_text.permute(2, 0, 1, 3))
    for c0, c1 in bounds:
        nc = c1 - c0
        idx = key_index[c0:c1].reshape(-1)
        kc = tiles_view(torch.index_select(k_src, 0, idx), nc, n_keys)
        vc = tiles_view(torch.index_select(v_src, 0, idx), nc, n_keys)
        qc = tiles_view(torch.index_select(q_src, 0, slot_to_token[c0 * q_slots:c1 * q_slots]), nc, q_slots)
        mask = _traced_mask(args, c0, c1, q.dtype) if traced else plan.build_mask(c0, c1, q.dtype)
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=sc)
        out.index_copy_(0, out_rows[c0 * q_slots:c1 * q_slots], oc.permute(1, 2, 0, 3).reshape(nc * q_slots, bh * d))
    return out[:n].view(n, bsz, nh, d).permute(1, 2, 0, 3)
