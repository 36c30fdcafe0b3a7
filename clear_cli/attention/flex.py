"""FlexAttention backend: image tokens gathered tile-major inside the call, block mask built from the geometry.

Inside one call: text queries attend densely (SDPA) to all text + image keys; image queries go through FlexAttention
over a key sequence [text | image tiles | pooled], each padded to a block multiple. Queries are laid out in a_q x b_q
tiles (one Q block each) and keys in a_k x b_k tiles (one KV block each), so a circle touches few, mostly full blocks
(a row-major 128-token block is a thin strip that touches many nearly empty ones). Which KV blocks each Q block
touches, and which of those are full (no mask needed), comes from rectangle distances on the tile lattice -- never
from evaluating a mask over N x N. Outputs are scattered back to row-major, so callers see the usual layout.
Block masks and index tensors are cached per (grid, text length, window, factor, tiles, device).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale, pool_tokens, pool_weight, tile_order

KIND_TEXT, KIND_IMAGE, KIND_POOLED, KIND_PAD = 0, 1, 2, 3


def default_tiles(window: int, device: torch.device | str | None = None
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Q tile, KV tile). On CUDA, 8x16 tiles (128-token blocks, FlexAttention's own default): the Triton kernels
    of torch <= 2.11 need block sizes divisible by their BLOCK_M / BLOCK_N (128 on Hopper in bf16, forward and
    backward), so 64-token blocks fail to compile; image work / exact is 5.8 / 2.4 / 1.7 at r = 8 / 16 / 32.
    Elsewhere (the eager CPU path, and the layout the work counts quote), 8x8 tiles keep it at 2.9 / 2.0 at
    r = 8 / 16 (4096^2 and 8192^2); from r = 32 on, 4x8 key tiles bring it from 1.5 to 1.4."""
    if device is not None and torch.device(device).type == "cuda":
        return (8, 16), (8, 16)
    return ((8, 8), (8, 8)) if window < 32 else ((8, 8), (4, 8))


def flex_available(device: torch.device | str) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    dev = torch.device(device)
    return dev.type == "cuda" and torch.cuda.is_available()


@dataclass
class BlockRelations:
    """Image Q tiles x image KV tiles on the tile lattice: which pairs touch and which are full (every real pair
    inside the circle and no padded key)."""

    n_q_tiles: int
    n_kv_tiles: int
    cand: torch.Tensor    # [n_q_tiles, C] candidate KV tile index (-1: off the lattice)
    touch: torch.Tensor   # [n_q_tiles, C] bool
    full: torch.Tensor    # [n_q_tiles, C] bool (subset of touch)


def _tile_rects(grid: tuple[int, int], tile: tuple[int, int], device) -> tuple[torch.Tensor, ...]:
    h, w = grid
    a, b = tile
    ty, tx = -(-h // a), -(-w // b)
    y0 = (torch.arange(ty, device=device) * a).repeat_interleave(tx)
    x0 = (torch.arange(tx, device=device) * b).repeat(ty)
    y1 = (y0 + a - 1).clamp(max=h - 1)     # real extent (ragged edge tiles are smaller)
    x1 = (x0 + b - 1).clamp(max=w - 1)
    padded = (y0 + a > h) | (x0 + b > w)
    return y0, x0, y1, x1, padded, ty, tx


def block_relations(grid: tuple[int, int], window: int, q_tile: tuple[int, int], kv_tile: tuple[int, int],
                    device: torch.device | str = "cpu") -> BlockRelations:
    h, w = grid
    r2 = int(window) ** 2
    qy0, qx0, qy1, qx1, _, _, _ = _tile_rects(grid, q_tile, device)
    ky0, kx0, ky1, kx1, kpad, kty, ktx = _tile_rects(grid, kv_tile, device)
    (aq, bq), (ak, bk) = q_tile, kv_tile
    # candidate KV tile rows/cols: within window-1 of the query tile's extent
    ny = (aq + 2 * (window - 1)) // ak + 2
    nx = (bq + 2 * (window - 1)) // bk + 2
    row0 = torch.div(qy0 - (window - 1), ak, rounding_mode="floor")
    col0 = torch.div(qx0 - (window - 1), bk, rounding_mode="floor")
    dy = torch.arange(ny, device=device).repeat_interleave(nx)
    dx = torch.arange(nx, device=device).repeat(ny)
    rows = row0[:, None] + dy[None]
    cols = col0[:, None] + dx[None]
    on = (rows >= 0) & (rows < kty) & (cols >= 0) & (cols < ktx)
    cand = torch.where(on, rows.clamp(0, kty - 1) * ktx + cols.clamp(0, ktx - 1), torch.full_like(rows, -1))
    c = cand.clamp(min=0)
    gy_min = torch.clamp(torch.maximum(ky0[c] - qy1[:, None], qy0[:, None] - ky1[c]), min=0)
    gx_min = torch.clamp(torch.maximum(kx0[c] - qx1[:, None], qx0[:, None] - kx1[c]), min=0)
    gy_max = torch.maximum((ky1[c] - qy0[:, None]).abs(), (qy1[:, None] - ky0[c]).abs())
    gx_max = torch.maximum((kx1[c] - qx0[:, None]).abs(), (qx1[:, None] - kx0[c]).abs())
    touch = on & (gy_min ** 2 + gx_min ** 2 < r2)
    full = touch & (gy_max ** 2 + gx_max ** 2 < r2) & ~kpad[c]
    return BlockRelations(qy0.numel(), ky0.numel(), cand, touch, full)


def image_block_work(grid: tuple[int, int], window: int, q_tile: tuple[int, int] | None = None,
                     kv_tile: tuple[int, int] | None = None) -> int:
    """Image-to-image (query, key) pairs the block schedule computes: touched blocks x block area."""
    dq, dk = default_tiles(window)
    q_tile, kv_tile = q_tile or dq, kv_tile or dk
    rel = block_relations(tuple(grid), window, q_tile, kv_tile)
    return int(rel.touch.sum()) * q_tile[0] * q_tile[1] * kv_tile[0] * kv_tile[1]


def row_major_block_work(grid: tuple[int, int], window: int, block: int = 128) -> int | None:
    """The same for the authors' layout (row-major order, `block`-token blocks, one row segment each), for
    comparison; None when a row is not a whole number of blocks."""
    h, w = grid
    if w % block:
        return None
    nseg = w // block
    x0 = torch.arange(nseg) * block
    gx = torch.clamp(torch.maximum(x0[None, :] - (x0[:, None] + block - 1), x0[:, None] - (x0[None, :] + block - 1)),
                     min=0)
    total = 0
    for dy in range(-window + 1, window):
        rows = h - abs(dy)
        if rows > 0:
            total += rows * int((gx ** 2 < window * window - dy * dy).sum())
    return total * block * block


@dataclass
class FlexPlan:
    q_index: torch.Tensor     # [Lq] image token (0..HW-1) of each query slot (pads point at token 0)
    q_out: torch.Tensor       # [HW] query slot of each image token
    kv_index: torch.Tensor    # [Lk] row of [k (T+HW) | pooled (P)] for each key slot (pads point at row 0)
    block_mask: object
    lq: int
    lk: int


@lru_cache(maxsize=16)
def flex_plan(grid: tuple[int, int], text_len: int, window: int, down_factor: int,
              q_tile: tuple[int, int], kv_tile: tuple[int, int], device: torch.device) -> FlexPlan:
    from torch.nn.attention.flex_attention import BlockMask

    h, w = grid
    hw, t = h * w, text_len
    qb, kb = q_tile[0] * q_tile[1], kv_tile[0] * kv_tile[1]
    p = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    q_slot, q_out, _ = tile_order(grid, q_tile, device)
    k_slot, _, _ = tile_order(grid, kv_tile, device)
    lq = q_slot.numel()
    nt_text, nt_pool = -(-t // kb), -(-p // kb)
    n_text_slots, n_pool_slots = nt_text * kb, nt_pool * kb
    lk = n_text_slots + k_slot.numel() + n_pool_slots

    # key slots: kind, coordinates, source row
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    text_kind = torch.where(ar(n_text_slots) < t, KIND_TEXT, KIND_PAD)
    img_kind = torch.where(k_slot < hw, KIND_IMAGE, KIND_PAD)
    pool_kind = torch.where(ar(n_pool_slots) < p, KIND_POOLED, KIND_PAD)
    k_kind = torch.cat([text_kind, img_kind, pool_kind]).to(torch.int32)
    k_tok = k_slot.clamp(max=hw - 1)
    k_y = torch.cat([torch.zeros(n_text_slots, dtype=torch.long, device=device), k_tok // w,
                     torch.zeros(n_pool_slots, dtype=torch.long, device=device)]).to(torch.int32)
    k_x = torch.cat([torch.zeros(n_text_slots, dtype=torch.long, device=device), k_tok % w,
                     torch.zeros(n_pool_slots, dtype=torch.long, device=device)]).to(torch.int32)
    kv_index = torch.cat([torch.where(ar(n_text_slots) < t, ar(n_text_slots), 0),
                          torch.where(k_slot < hw, t + k_slot, 0),
                          torch.where(ar(n_pool_slots) < p, t + hw + ar(n_pool_slots), 0)])
    q_tok = q_slot.clamp(max=hw - 1)
    # pad query slots get coordinates far away: their rows are dropped anyway
    q_y = torch.where(q_slot < hw, q_tok // w, -(10 ** 6)).to(torch.int32)
    q_x = torch.where(q_slot < hw, q_tok % w, 0).to(torch.int32)
    q_index = q_tok
    r2 = int(window) ** 2

    def mask_mod(b, hh, q_idx, kv_idx):
        kind = k_kind[kv_idx]
        dy = q_y[q_idx] - k_y[kv_idx]
        dx = q_x[q_idx] - k_x[kv_idx]
        return (kind == KIND_TEXT) | (kind == KIND_POOLED) | ((kind == KIND_IMAGE) & (dy * dy + dx * dx < r2))

    # block lists per Q block (= one query tile): text blocks, touched image KV tiles, pooled blocks
    rel = block_relations(grid, window, q_tile, kv_tile, device)
    nq = rel.n_q_tiles
    off_img, off_pool = nt_text, nt_text + rel.n_kv_tiles
    text_full = torch.ones(nt_text, dtype=torch.bool, device=device)
    if t % kb:
        text_full[-1] = False
    pool_full = torch.ones(nt_pool, dtype=torch.bool, device=device)
    if p % kb:
        pool_full[-1] = False
    blocks = torch.cat([ar(nt_text).expand(nq, nt_text), off_img + rel.cand.clamp(min=0),
                        (off_pool + ar(nt_pool)).expand(nq, nt_pool)], 1)
    touch = torch.cat([torch.ones(nq, nt_text, dtype=torch.bool, device=device), rel.touch,
                       torch.ones(nq, nt_pool, dtype=torch.bool, device=device)], 1)
    full = torch.cat([text_full.expand(nq, nt_text), rel.full, pool_full.expand(nq, nt_pool)], 1)
    partial = touch & ~full

    n_kv_blocks = -(-lk // kb)

    def pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = sel.sum(1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
        idx = torch.gather(blocks, 1, order)
        # Index rows span every KV block, as BlockMask expects: torch <= 2.11 sizes its transpose (the
        # backward's Q-block lists) from this width, and a shorter row indexes out of bounds on CUDA.
        idx = F.pad(idx, (0, max(n_kv_blocks - idx.shape[1], 0)))[:, :n_kv_blocks]
        return num[None, None], idx.to(torch.int32)[None, None].contiguous()

    kv_num, kv_idx = pack(partial)
    full_num, full_idx = pack(full)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(qb, kb), mask_mod=mask_mod,
                                  seq_lengths=(lq, lk))
    return FlexPlan(q_index, q_out, kv_index, bm, lq, lk)


_COMPILED: dict = {}


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention          # eager (tests, small sizes); CPU never gets picked by `auto`
    fn = _COMPILED.get("cuda")
    if fn is None:
        # one compile per (shape, block layout): several resolutions and windows in one process must not hit
        # dynamo's default limit of 8, after which flex would run unfused and materialise N x N scores
        import torch._dynamo as dynamo
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
        fn = _COMPILED["cuda"] = torch.compile(flex_attention, dynamic=False)
    return fn


def flex_attention_clear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int,
                         grid: tuple[int, int], window: int, down_factor: int = 1,
                         down_weight: torch.Tensor | None = None, scale: float | None = None,
                         q_tile: tuple[int, int] | None = None, kv_tile: tuple[int, int] | None = None
                         ) -> torch.Tensor:
    bsz, nh, n, d = q.shape
    t, f = text_len, down_factor
    h, w = grid
    sc = default_scale(d, scale)
    dq, dk = default_tiles(window, q.device)
    plan = flex_plan((h, w), t, window, f, tuple(q_tile or dq), tuple(kv_tile or dk), q.device)
    if f > 1:
        wt = pool_weight(down_weight, f, k)
        k_all = torch.cat([k, pool_tokens(k[:, :, t:], grid, f, wt)], 2)
        v_all = torch.cat([v, pool_tokens(v[:, :, t:], grid, f, wt)], 2)
    else:
        k_all, v_all = k, v
    qs = torch.index_select(q[:, :, t:], 2, plan.q_index)
    ks = torch.index_select(k_all, 2, plan.kv_index)
    vs = torch.index_select(v_all, 2, plan.kv_index)
    with warnings.catch_warnings():   # eager CPU flex warns that it is unfused; tests use it on purpose
        warnings.simplefilter("ignore", UserWarning)
        o = _flex_fn(q.device)(qs, ks, vs, block_mask=plan.block_mask, scale=sc)
    o_img = torch.index_select(o, 2, plan.q_out)
    if t == 0:
        return o_img
    o_text = F.scaled_dot_product_attention(q[:, :, :t], k, v, scale=sc)
    return torch.cat([o_text, o_img], 2)
