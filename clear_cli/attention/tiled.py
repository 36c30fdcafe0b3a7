"""Portable, differentiable CLEAR attention: query tiles with their halo of image keys (+ text and pooled keys).

Image queries are gathered tile-major into a x b tiles; each tile attends to the text keys, the union of its queries'
circles (the halo rectangle trimmed to that union) and the pooled keys, in one batched SDPA call per chunk of tiles
with an additive mask. Tiles whose halo lies inside the grid share one [a*b, K] mask (broadcast, never copied);
the few border tiles get their own. Work and memory grow with N x window^2, never N^2. Text queries attend densely.
Tokens are gathered as rows of a token-major [tokens, batch*heads*head_dim] matrix so each gather moves whole rows.
No compilation, no Python loop over tiles (only over memory-bounded chunks); autograd does the backward.
CPU inference (no autograd) goes to the faster forward-only band path in `cpu_bands` (see there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale, pool_tokens, pool_weight, tile_key_offsets, tile_order
from clear_cli.attention.tracing import compiling, outside_graph

# Bytes of one chunk's gathered keys (or border masks). Kept well under glibc's largest mmap threshold (32 MiB) so
# the per-chunk buffers are recycled from the heap: fresh mmap'd buffers page-fault and were ~8x slower to fill.
CHUNK_BYTES = 8 * 2**20
BORDER_CACHE_BYTES = 64 * 2**20
# Relative cost of gathering keys/values vs computing scores (calibrated on a 2-core AVX-512 CPU).
GATHER_COST = 1.0


@dataclass(frozen=True)
class TilePlan:
    """Index and mask tensors for one (grid, text_len, window, down_factor, tile, device).

    Tiles are ordered border tiles first (own masks), then interior tiles (one shared mask); the order is free
    because outputs are scattered back through `token_to_slot`.
    """

    tile: tuple[int, int]
    n_tiles: int
    n_border: int
    slot_to_token: torch.Tensor   # [tiles*a*b] image token of each tile-major slot (H*W = pad slot)
    out_rows: torch.Tensor        # [tiles*a*b] output row of each slot: T + token, or N (dump row) for pad slots
    key_index: torch.Tensor       # [tiles, K] rows of [k (T+HW) | zero row | pooled (P)]
    rel_mask: torch.Tensor        # [a*b, K_img] bool: circle of each query over the tile's image keys
    key_valid: torch.Tensor       # [n_border, K_img] bool: image key inside the grid
    pad_query: torch.Tensor       # [n_border, a*b] bool: slot outside the grid (sees every key; output dropped)
    text_len: int
    n_pooled: int
    cache: dict = field(default_factory=dict, compare=False, repr=False)   # masks built on first use

    @property
    def keys_per_tile(self) -> int:
        return int(self.key_index.shape[1])

    def build_mask(self, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive [1, c1-c0, a*b, K] mask; border chunks (c1 <= n_border) get their own, interior ones share one."""
        if c0 >= self.n_border:
            return _interior_mask(self, dtype)[None, None].expand(1, c1 - c0, -1, -1)
        if self.n_border * self.rel_mask.numel() * 4 <= BORDER_CACHE_BYTES:  # small: build all border masks once
            key = ("border", dtype)
            m = self.cache.get(key)
            if m is None:
                m = self.cache[key] = self._border(0, self.n_border, dtype)
            return m[:, c0:c1]
        return self._border(c0, c1, dtype)

    def _border(self, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
        img = self.rel_mask[None] & self.key_valid[c0:c1, None, :]
        img |= self.pad_query[c0:c1, :, None]
        return _additive(self, img, dtype)[None]


def _additive(plan: TilePlan, img: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    lead = img.shape[:-1]
    out = torch.zeros(*lead, plan.keys_per_tile, dtype=dtype, device=img.device)
    t = plan.text_len
    out[..., t:t + img.shape[-1]].masked_fill_(~img, float("-inf"))
    return out


def _interior_mask(plan: TilePlan, dtype: torch.dtype) -> torch.Tensor:
    key = ("interior", dtype)
    m = plan.cache.get(key)
    if m is None:
        m = plan.cache[key] = _additive(plan, plan.rel_mask, dtype)
    return m


# Measured flash-SDPA throughput (GFLOP/s, one AVX-512 core) by queries per tile: small tiles waste less work on
# halo keys but run the kernel less efficiently.
_EFFICIENCY = {16: 34.0, 32: 47.0, 64: 55.0, 128: 61.0, 256: 65.0, 512: 66.0}


@lru_cache(maxsize=256)
def choose_tile(grid: tuple[int, int], window: int, head_dim: int = 64, n_pooled: int = 0,
                text_len: int = 0) -> tuple[int, int]:
    """Tile shape minimising the modelled time: keys per tile x (queries per tile / kernel efficiency + gather cost),
    padded edge slots included."""
    h, w = grid
    best, best_cost = (8, 8), float("inf")
    for a, b in ((4, 4), (4, 8), (8, 8), (8, 16), (16, 16), (16, 32)):
        n_tiles = -(-h // a) * -(-w // b)
        k_all = min(len(tile_key_offsets((a, b), window)), h * w) + text_len + n_pooled
        cost = n_tiles * k_all * (a * b * 55.0 / _EFFICIENCY[a * b] + GATHER_COST * head_dim / 64 * 26)
        if cost < best_cost:
            best, best_cost = (a, b), cost
    return best


@lru_cache(maxsize=32)
def tile_plan(grid: tuple[int, int], text_len: int, window: int, down_factor: int, tile: tuple[int, int],
              device: torch.device) -> TilePlan:
    h, w = grid
    a, b = tile
    t, hw = text_len, h * w
    n = t + hw
    slot_to_token, _, origin = tile_order(grid, tile, device)
    offs = torch.tensor(tile_key_offsets(tile, window), dtype=torch.long, device=device)  # [K_img, 2]
    ky = origin[:, 0:1] + offs[None, :, 0]
    kx = origin[:, 1:2] + offs[None, :, 1]
    valid = (ky >= 0) & (ky < h) & (kx >= 0) & (kx < w)
    pad_query = (slot_to_token == hw).reshape(-1, a * b)
    # border tiles first: their halo leaves the grid or they hold pad slots
    border = ~valid.all(1) | pad_query.any(1)
    order = torch.cat([torch.nonzero(border).flatten(), torch.nonzero(~border).flatten()])
    n_border = int(border.sum())
    valid, pad_query, ky, kx = valid[order], pad_query[order], ky[order], kx[order]
    slot_to_token = slot_to_token.reshape(-1, a * b)[order].reshape(-1)
    out_rows = torch.where(slot_to_token < hw, t + slot_to_token, torch.full_like(slot_to_token, n))
    n_tiles = order.numel()
    img_index = torch.where(valid, t + ky.clamp(0, h - 1) * w + kx.clamp(0, w - 1), torch.full_like(ky, n))
    p = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    parts = []
    if t:
        parts.append(torch.arange(t, device=device).expand(n_tiles, t))
    parts.append(img_index)
    if p:
        parts.append(torch.arange(n + 1, n + 1 + p, device=device).expand(n_tiles, p))
    key_index = torch.cat(parts, dim=1).contiguous()
    qy = torch.arange(a, device=device).repeat_interleave(b)
    qx = torch.arange(b, device=device).repeat(a)
    rel = (qy[:, None] - offs[None, :, 0]) ** 2 + (qx[:, None] - offs[None, :, 1]) ** 2 < window * window
    return TilePlan(tile, n_tiles, n_border, slot_to_token, out_rows, key_index, rel,
                    valid[:n_border].contiguous(), pad_query[:n_border].contiguous(), t, p)


# Under torch.compile the plan, the tile choice and the masks are graph constants, built eagerly at trace time.
@outside_graph
def _traced_choose_tile(*args):
    return choose_tile(*args)


@outside_graph
def _traced_plan(*args):
    return _plan_fields(tile_plan(*args))


@outside_graph
def _traced_mask(args, c0, c1, dtype):
    return tile_plan(*args).build_mask(c0, c1, dtype)


def _plan_fields(plan: TilePlan) -> tuple:
    return (plan.keys_per_tile, plan.n_border, plan.n_tiles, plan.key_index, plan.slot_to_token, plan.out_rows)


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: tuple[int, int],
                    window: int, down_factor: int = 1, down_weight: torch.Tensor | None = None,
                    scale: float | None = None, tile: tuple[int, int] | None = None,
                    text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLEAR attention by query tiles. On CPU without autograd (inference) and with no explicit `tile`, the
    forward-only band path (`cpu_bands`) runs instead: same result, 1.4-1.9x faster; training keeps this path, and
    so does torch.compile (the band path reuses scratch buffers between calls). `text_mask` [B, T] (valid text
    keys): native in the band path; here through `padding.compacted` (the tile masks are shared by the batch)."""
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, down_weight))
    traced = compiling()
    if tile is None and q.device.type == "cpu" and not needs_grad and not traced:
        from clear_cli.attention.cpu_bands import band_attention
        return band_attention(q, k, v, text_len=text_len, grid=grid, window=window, down_factor=down_factor,
                              down_weight=down_weight, scale=scale, text_mask=text_mask)
    if text_mask is not None:
        from clear_cli.attention.padding import compacted
        return compacted(tiled_attention, q, k, v, text_len=text_len, text_mask=text_mask, scale=scale, grid=grid,
                         window=window, down_factor=down_factor, down_weight=down_weight, tile=tile)
    bsz, nh, n, d = q.shape
    bh = bsz * nh
    t, f = text_len, down_factor
    h, w = grid
    sc = default_scale(d, scale)
    n_pooled = (h // f) * (w // f) if f > 1 else 0
    choose = _traced_choose_tile if traced else choose_tile
    tile = tuple(tile) if tile is not None else choose((h, w), window, d, n_pooled, t)
    args = ((h, w), t, window, f, tile, q.device)
    plan = None if traced else tile_plan(*args)
    n_keys, n_border, n_tiles, key_index, slot_to_token, out_rows = (
        _traced_plan(*args) if traced else _plan_fields(plan))
    ab = tile[0] * tile[1]

    # token-major sources [rows, bh*d]: k/v = [text+image | zero row | pooled], q = [image | zero row]
    n_src = n + 1 + n_pooled
    k_src, v_src = q.new_empty(n_src, bh * d), q.new_empty(n_src, bh * d)
    for src, x in ((k_src, k), (v_src, v)):
        src[n].zero_()
        src[:n].view(n, bsz, nh, d).copy_(x.permute(2, 0, 1, 3))
    if f > 1:
        wt = pool_weight(down_weight, f, k)
        for src, x in ((k_src, k), (v_src, v)):
            src[n + 1:].view(n_pooled, bsz, nh, d).copy_(pool_tokens(x[:, :, t:], grid, f, wt).permute(2, 0, 1, 3))
    q_src = q.new_empty(h * w + 1, bh * d)
    q_src[h * w].zero_()
    q_src[:h * w].view(h * w, bsz, nh, d).copy_(q[:, :, t:].permute(2, 0, 1, 3))

    def tiles_view(x: torch.Tensor, nc: int, length: int) -> torch.Tensor:
        # [nc*length, bh*d] -> [bh, nc, length, d] as a strided view (SDPA takes strides)
        return x.view(nc, length, bh, d).permute(2, 0, 1, 3)

    per_tile = n_keys * max(bh * d, ab) * q.element_size()
    chunk = max(1, CHUNK_BYTES // max(per_tile, 1))
    bounds, c0 = [], 0
    for end in (n_border, n_tiles):   # chunks never mix border and interior tiles
        while c0 < end:
            bounds.append((c0, min(end, c0 + chunk)))
            c0 = bounds[-1][1]
    # output rows [text | image | one dump row for pad slots]
    out = q.new_empty(n + 1, bh * d)
    if t:
        o_text = F.scaled_dot_product_attention(q[:, :, :t], k, v, scale=sc)
        out[:t].view(t, bsz, nh, d).copy_(o_text.permute(2, 0, 1, 3))
    for c0, c1 in bounds:
        nc = c1 - c0
        idx = key_index[c0:c1].reshape(-1)
        kc = tiles_view(torch.index_select(k_src, 0, idx), nc, n_keys)
        vc = tiles_view(torch.index_select(v_src, 0, idx), nc, n_keys)
        slots = slot_to_token[c0 * ab:c1 * ab]
        qc = tiles_view(torch.index_select(q_src, 0, slots), nc, ab)
        mask = _traced_mask(args, c0, c1, q.dtype) if traced else plan.build_mask(c0, c1, q.dtype)
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=sc)
        out.index_copy_(0, out_rows[c0 * ab:c1 * ab], oc.permute(1, 2, 0, 3).reshape(nc * ab, bh * d))
    return out[:n].view(n, bsz, nh, d).permute(1, 2, 0, 3)
