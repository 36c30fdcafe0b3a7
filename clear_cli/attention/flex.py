"""FlexAttention backend: image tokens gathered tile-major inside the call, block mask built from the geometry.

Inside one call, image queries go through FlexAttention over a key sequence [text | image tiles | pooled], each part
padded to a block multiple; text queries attend densely, either in a separate SDPA or (layouts with
`text_queries`) as leading query blocks of the same kernel call. Queries are laid out in a_q x b_q tiles (one Q
block each) and keys in a_k x b_k tiles (one KV block each), so a circle touches few, mostly full blocks (a
row-major 128-token block is a thin strip that touches many nearly empty ones). Which KV blocks each Q block
touches, and which of those are full (no mask needed), comes from rectangle distances on the tile lattice -- never
from evaluating a mask over N x N. Outputs are scattered back to row-major, so callers see the usual layout.

The mask of partial blocks is computed from the slot indices alone (tile, row and column by integer arithmetic;
no gather from captured tensors), every row sees at least one key (pad query slots see every key of their blocks;
their output is dropped), so `ROWS_GUARANTEED_SAFE` holds. Block layouts are named in `LAYOUTS`; which one `auto`
runs per device and pass comes from `LAYOUT_TABLE` (bench/gpu.sh times them all). Plans are cached per
(grid, text length, window, factor, layout, device) and built outside any torch.compile graph (`tracing`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale, pool_tokens, pool_weight, tile_order
from clear_cli.attention.tracing import compiling, outside_graph

LAYOUT_ENV = "CLEAR_FLEX_LAYOUT"  # force one layout by name (experiments, benchmarks of whole steps)


@dataclass(frozen=True)
class FlexLayout:
    """Query and key tiles of the FlexAttention backend (one tile = one sparse block)."""

    name: str
    q_tile: tuple[int, int]
    kv_tile: tuple[int, int]
    text_queries: bool = False   # text queries as leading Q blocks of the same call (else a separate SDPA)
    about: str = ""

    @property
    def block_size(self) -> tuple[int, int]:
        return self.q_tile[0] * self.q_tile[1], self.kv_tile[0] * self.kv_tile[1]

    def kernel_options(self, dtype: torch.dtype) -> dict:
        """FlexAttention kernel options: the kernel's blocks must divide the sparse blocks (torch <= 2.11 fails to
        compile otherwise). Defaults of torch 2.11 for d = 128: forward 128 x 64 on H100 / A100 in bf16 / fp16
        (128 x 128 on B200), 32-128 x 32-64 in fp32; backward 64 / 128 / 128 / 64 on H100 in bf16 (BLOCK_M1, N1, M2,
        N2), 16 everywhere in fp32. Options are set only where a default would not divide, so the 128-block layouts
        run torch's own choice."""
        qb, kb = self.block_size
        opts: dict = {"ROWS_GUARANTEED_SAFE": True}
        if dtype == torch.float32:
            if qb < 128 or kb < 64:
                opts.update(fwd_BLOCK_M=min(32, qb), fwd_BLOCK_N=min(32, kb))
            if qb < 16 or kb < 16:
                opts.update(bwd_BLOCK_M1=qb, bwd_BLOCK_N1=kb, bwd_BLOCK_M2=qb, bwd_BLOCK_N2=kb)
            return opts
        if qb < 128:
            opts["fwd_BLOCK_M"] = qb
        if kb < 128:
            opts["fwd_BLOCK_N"] = min(64, kb)
        if qb < 128 or kb < 128:
            opts.update(bwd_BLOCK_M1=min(64, qb), bwd_BLOCK_N1=min(64, kb), bwd_BLOCK_M2=min(64, qb),
                        bwd_BLOCK_N2=min(64, kb))
        return opts


LAYOUTS: dict[str, FlexLayout] = {lay.name: lay for lay in (
    FlexLayout("128x128", (8, 16), (8, 16), about="8x16 query and key tiles; measured on H200 with torch 2.11 "
               "(image work / exact 5.8 / 2.4 / 1.7 at r = 8 / 16 / 32); the fallback"),
    FlexLayout("128x64", (8, 16), (8, 8), about="8x16 query tiles, 8x8 key tiles: torch 2.11's H100/A100 bf16 "
               "forward block, no forward options; backward with 64-blocks"),
    FlexLayout("128x64t", (8, 16), (8, 8), text_queries=True, about="128x64 with the text queries in the same "
               "call (no separate SDPA, no concatenation)"),
    FlexLayout("64x64", (8, 8), (8, 8), about="8x8 query and key tiles (image work / exact 2.9 / 2.0 at r = 8 / 16); "
               "kernel options forward and backward"),
    FlexLayout("64x32", (8, 8), (4, 8), about="8x8 query tiles, 4x8 key tiles (1.4 at r = 32); the CPU layout "
               "from r = 32"),
)}
FALLBACK_LAYOUT = "128x128"

# Which layout `auto` runs: (device kind, pass) -> ((smallest window, layout), ...), windows ascending.
# bench/gpu.sh times every layout (gpu_bench.json, "attention" rows); put the measured winners here. Until a GPU
# run has measured them, CUDA runs the 128-query / 64-key blocks (no forward options on H100/A100 bf16).
LAYOUT_TABLE: dict[tuple[str, str], tuple[tuple[int, str], ...]] = {
    ("cuda", "forward"): ((1, "128x64"),),
    ("cuda", "backward"): ((1, "128x64"),),
    ("cpu", "forward"): ((1, "64x64"), (32, "64x32")),   # eager flex (tests); `auto` never picks flex on CPU
}


def _kind(device: torch.device | str | None) -> str:
    return "cuda" if device is not None and torch.device(device).type == "cuda" else "cpu"


@outside_graph
def _layout_name(window: int, kind: str, backward: bool) -> str:
    forced = os.environ.get(LAYOUT_ENV)
    if forced:
        if forced not in LAYOUTS:
            raise ValueError(f"{LAYOUT_ENV}={forced!r} is not a FlexAttention layout; choose one of "
                             f"{', '.join(LAYOUTS)}")
        return forced
    rows = LAYOUT_TABLE.get((kind, "backward" if backward else "forward")) or LAYOUT_TABLE[(kind, "forward")]
    name = rows[0][1]
    for min_window, layout in rows:
        if window >= min_window:
            name = layout
    return name


def choose_layout(window: int, device: torch.device | str | None = None, backward: bool = False) -> FlexLayout:
    """The layout `flex` runs for this window on this device, forward only or with a backward pass."""
    return LAYOUTS[_layout_name(int(window), _kind(device), bool(backward))]


def default_tiles(window: int, device: torch.device | str | None = None
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """(Q tile, KV tile) of the forward layout `choose_layout` gives (CPU when device is None)."""
    lay = choose_layout(window, device)
    return lay.q_tile, lay.kv_tile


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
    kv_padded: torch.Tensor  # [n_kv_tiles] bool: the KV tile holds pad slots (ragged edge)


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
    return BlockRelations(qy0.numel(), ky0.numel(), cand, touch, full, kpad)


def image_block_work(grid: tuple[int, int], window: int, q_tile: tuple[int, int] | None = None,
                     kv_tile: tuple[int, int] | None = None) -> int:
    """Image-to-image (query, key) pairs the block schedule computes: touched blocks x block area."""
    dq, dk = default_tiles(window)
    q_tile, kv_tile = q_tile or dq, kv_tile or dk
    rel = block_relations(tuple(grid), window, q_tile, kv_tile)
    return int(rel.touch.sum()) * q_tile[0] * q_tile[1] * kv_tile[0] * kv_tile[1]


def layout_work(grid: tuple[int, int], text_len: int, window: int, down_factor: int = 1,
                layout: str | FlexLayout | None = None) -> tuple[int, int]:
    """(all pairs computed, image-to-image pairs computed) by a layout's schedule, pad slots included; text queries
    count as the dense SDPA's T x N pairs, or as their blocks with `text_queries`."""
    lay = _resolve(layout, window, None, None, "cuda", False)
    h, w = grid
    t, hw = text_len, h * w
    p = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    qb, kb = lay.block_size
    rel = block_relations(tuple(grid), window, lay.q_tile, lay.kv_tile)
    img = int(rel.touch.sum()) * qb * kb
    nt_text, nt_pool = -(-t // kb), -(-p // kb)
    image_rows = rel.n_q_tiles * qb * (nt_text + nt_pool) * kb + img
    if lay.text_queries:
        text_rows = -(-t // qb) * qb * (nt_text + rel.n_kv_tiles) * kb
    else:
        text_rows = t * (t + hw)
    return image_rows + text_rows, img


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


def make_mask_mod(grid: tuple[int, int], text_len: int, window: int, n_pooled: int, q_tile: tuple[int, int],
                  kv_tile: tuple[int, int], text_queries: bool, text_mask: torch.Tensor | None = None):
    """The mask of partial blocks, from slot indices alone: which part a slot is in, and its tile, row and column,
    follow from integer arithmetic on the layout (no captured tensors, except the [B, T] `text_mask` of valid text
    keys when the call has padding: a padded text key is seen by no query)."""
    h, w = grid
    t, r2, p = int(text_len), int(window) ** 2, int(n_pooled)
    (aq, bq), (ak, bk) = q_tile, kv_tile
    qb, kb = aq * bq, ak * bk
    q_cols, k_cols = -(-w // bq), -(-w // bk)
    n_text_k = -(-t // kb) * kb
    pool0 = n_text_k + -(-h // ak) * k_cols * kb
    n_text_q = -(-t // qb) * qb if text_queries else 0

    def mask_mod(b, hh, q_idx, kv_idx):
        qi = q_idx - n_text_q
        qt, qin = qi // qb, qi % qb
        qy = (qt // q_cols) * aq + qin // bq
        qx = (qt % q_cols) * bq + qin % bq
        ki = kv_idx - n_text_k
        kt, kin = ki // kb, ki % kb
        ky = (kt // k_cols) * ak + kin // bk
        kx = (kt % k_cols) * bk + kin % bk
        text_k = kv_idx < t
        if text_mask is not None:
            text_k = text_k & text_mask[b, kv_idx.clamp(0, max(t - 1, 0))]
        img_k = (ki >= 0) & (kv_idx < pool0) & (ky < h) & (kx < w)
        dy, dx = qy - ky, qx - kx
        # pad query slots (ragged edge tiles) see every key of their blocks: no empty row; outputs are dropped
        seen = text_k | (img_k & (dy * dy + dx * dx < r2)) | (qy >= h) | (qx >= w)
        if p:
            seen = seen | ((kv_idx >= pool0) & (kv_idx < pool0 + p))
        if n_text_q:
            seen = torch.where(q_idx < n_text_q, text_k | img_k | (q_idx >= t), seen)
        return seen

    return mask_mod


_BLOCK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices")


@dataclass
class FlexPlan:
    q_index: torch.Tensor     # [Lq] row of q (text_queries) or image token (else) of each query slot; pads -> 0
    q_out: torch.Tensor       # [N] (text_queries) or [HW]: the query slot of each output row
    kv_index: torch.Tensor    # [Lk] row of [k (T+HW) | pooled (P)] for each key slot (pads point at row 0)
    block_mask: object
    lq: int
    lk: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.q_index, self.q_out, self.kv_index, *(getattr(self.block_mask, f) for f in _BLOCK_FIELDS))


def _lengths(grid, text_len, down_factor, q_tile, kv_tile, text_queries) -> tuple[int, int, int]:
    """(Lq, Lk, pooled tokens) of a layout."""
    h, w = grid
    qb, kb = q_tile[0] * q_tile[1], kv_tile[0] * kv_tile[1]
    p = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    lq = -(-h // q_tile[0]) * -(-w // q_tile[1]) * qb + (-(-text_len // qb) * qb if text_queries else 0)
    lk = (-(-text_len // kb) + -(-h // kv_tile[0]) * -(-w // kv_tile[1]) + -(-p // kb)) * kb
    return lq, lk, p


@lru_cache(maxsize=16)
def flex_plan(grid: tuple[int, int], text_len: int, window: int, down_factor: int,
              q_tile: tuple[int, int], kv_tile: tuple[int, int], device: torch.device,
              text_queries: bool = False, text_padded: bool = False) -> FlexPlan:
    """`text_padded`: the text KV blocks are partial (masked per call by the text mask), never full."""
    from torch.nn.attention.flex_attention import BlockMask

    h, w = grid
    hw, t = h * w, text_len
    qb, kb = q_tile[0] * q_tile[1], kv_tile[0] * kv_tile[1]
    lq, lk, p = _lengths(grid, t, down_factor, q_tile, kv_tile, text_queries)
    q_slot, q_out_img, _ = tile_order(grid, q_tile, device)
    k_slot, _, _ = tile_order(grid, kv_tile, device)
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    nt_text, nt_pool = -(-t // kb), -(-p // kb)
    n_text_k, n_pool_k = nt_text * kb, nt_pool * kb
    kv_index = torch.cat([torch.where(ar(n_text_k) < t, ar(n_text_k), 0),
                          torch.where(k_slot < hw, t + k_slot, 0),
                          torch.where(ar(n_pool_k) < p, t + hw + ar(n_pool_k), 0)])
    q_tok = torch.where(q_slot < hw, q_slot, 0)
    n_text_q = -(-t // qb) * qb if text_queries else 0
    if text_queries:
        q_index = torch.cat([torch.where(ar(n_text_q) < t, ar(n_text_q), 0), t + q_tok])
        q_out = torch.cat([ar(t), n_text_q + q_out_img])
    else:
        q_index, q_out = q_tok, q_out_img

    # block states per (Q block, KV block): 0 none, 1 partial (mask_mod), 2 full. Q blocks: [text | image tiles];
    # KV blocks: [text | image tiles | pooled].
    rel = block_relations(grid, window, q_tile, kv_tile, device)
    nq_text = n_text_q // qb
    n_q, n_kv = lq // qb, lk // kb
    off_img, off_pool = nt_text, nt_text + rel.n_kv_tiles
    state = torch.zeros(n_q, n_kv, dtype=torch.int8, device=device)
    text_full = (ar(nt_text) * kb + kb <= t) & (not text_padded)   # text KV blocks without pad slots
    pool_full = ar(nt_pool) * kb + kb <= p
    img = state[nq_text:]
    img[:, :nt_text] = torch.where(text_full, 2, 1).to(torch.int8)
    img[:, off_pool:] = torch.where(pool_full, 2, 1).to(torch.int8)
    rows = ar(rel.n_q_tiles)[:, None].expand_as(rel.cand)[rel.touch]
    img[rows, off_img + rel.cand[rel.touch]] = torch.where(rel.full[rel.touch], 2, 1).to(torch.int8)
    if nq_text:   # text queries: every text and image key (no pooled key)
        state[:nq_text, :nt_text] = torch.where(text_full, 2, 1).to(torch.int8)
        state[:nq_text, off_img:off_pool] = torch.where(rel.kv_padded, 1, 2).to(torch.int8)

    def pack(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Index rows span every KV block, as BlockMask expects: torch <= 2.11 sizes its transpose (the
        # backward's Q-block lists) from this width, and a shorter row indexes out of bounds on CUDA.
        num = sel.sum(1).to(torch.int32)
        idx = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)
        return num[None, None], idx.to(torch.int32)[None, None].contiguous()

    kv_num, kv_idx = pack(state == 1)
    full_num, full_idx = pack(state == 2)
    mask_mod = make_mask_mod(grid, t, window, p, q_tile, kv_tile, text_queries)
    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(qb, kb), mask_mod=mask_mod,
                                  seq_lengths=(lq, lk))
    return FlexPlan(q_index, q_out, kv_index, bm, lq, lk)


@outside_graph
def _plan_tensors(grid, text_len, window, down_factor, q_tile, kv_tile, device, text_queries):
    return flex_plan(grid, text_len, window, down_factor, q_tile, kv_tile, device, text_queries).tensors()


def _traced_plan(grid, text_len, window, down_factor, q_tile, kv_tile, device, text_queries):
    """Under torch.compile: the plan's tensors are graph constants and the BlockMask is rebuilt around them (its
    constructor only stores them; dynamo cannot take a BlockMask object as a constant)."""
    from torch.nn.attention.flex_attention import BlockMask

    ts = _plan_tensors(grid, text_len, window, down_factor, q_tile, kv_tile, device, text_queries)
    lq, lk, p = _lengths(grid, text_len, down_factor, q_tile, kv_tile, text_queries)
    qb, kb = q_tile[0] * q_tile[1], kv_tile[0] * kv_tile[1]
    bm = BlockMask(seq_lengths=(lq, lk), **dict(zip(_BLOCK_FIELDS, ts[3:])), BLOCK_SIZE=(qb, kb),
                   mask_mod=make_mask_mod(grid, text_len, window, p, q_tile, kv_tile, text_queries))
    return FlexPlan(ts[0], ts[1], ts[2], bm, lq, lk)


_COMPILED: dict = {}
_FAILED: set = set()          # (layout, geometry) that failed to compile: the fallback layout runs them
_WARNED: list = []


def _flex_fn(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda" or compiling():
        return flex_attention  # eager (CPU tests); inside a compiled graph the outer compile fuses it
    fn = _COMPILED.get("cuda")
    if fn is None:
        # one compile per (shape, block layout): several resolutions and windows in one process must not hit
        # dynamo's default limit of 8, after which flex would run unfused and materialise N x N scores
        raise_recompile_limit(64)
        fn = _COMPILED["cuda"] = torch.compile(flex_attention, dynamic=False)
    return fn


def raise_recompile_limit(n: int) -> None:
    import torch._dynamo as dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), n))


def _resolve(layout, window, q_tile, kv_tile, device, backward) -> FlexLayout:
    if q_tile is not None or kv_tile is not None:
        dq, dk = default_tiles(window, device)
        return FlexLayout("custom", tuple(q_tile or dq), tuple(kv_tile or dk))
    if isinstance(layout, FlexLayout):
        return layout
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"FlexAttention layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        return LAYOUTS[layout]
    return choose_layout(window, device, backward)


def flex_attention_clear(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int,
                         grid: tuple[int, int], window: int, down_factor: int = 1,
                         down_weight: torch.Tensor | None = None, scale: float | None = None,
                         q_tile: tuple[int, int] | None = None, kv_tile: tuple[int, int] | None = None,
                         layout: str | FlexLayout | None = None,
                         text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLEAR attention (same contract as `clear_attention`, `text_mask` included) with FlexAttention. `layout`: a
    name in LAYOUTS (default: `choose_layout` for this device and pass); `q_tile` / `kv_tile` give an ad-hoc layout
    (tests)."""
    backward = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, down_weight))
    chosen = layout is None and q_tile is None and kv_tile is None
    lay = _resolve(layout, window, q_tile, kv_tile, q.device, backward)
    if not chosen or compiling():
        return _run(q, k, v, lay, text_len, grid, window, down_factor, down_weight, scale, text_mask)
    key = (lay.name, tuple(q.shape), q.dtype, backward, text_len, tuple(grid), window, down_factor)
    if lay.name != FALLBACK_LAYOUT and key not in _FAILED:
        try:
            return _run(q, k, v, lay, text_len, grid, window, down_factor, down_weight, scale, text_mask)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # a layout that does not compile here falls back for this shape only, said once
            _FAILED.add(key)
            if not _WARNED:
                _WARNED.append(True)
                warnings.warn(f"FlexAttention layout {lay.name} failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); using {FALLBACK_LAYOUT} "
                              "for this shape", stacklevel=2)
    return _run(q, k, v, LAYOUTS[FALLBACK_LAYOUT] if key in _FAILED else lay, text_len, grid, window, down_factor,
                down_weight, scale, text_mask)


def _run(q, k, v, lay: FlexLayout, text_len, grid, window, down_factor, down_weight, scale,
         text_mask=None) -> torch.Tensor:
    t, f = int(text_len), int(down_factor)
    h, w = int(grid[0]), int(grid[1])
    sc = default_scale(q.shape[-1], scale)
    args = ((h, w), t, int(window), f, tuple(lay.q_tile), tuple(lay.kv_tile), q.device, bool(lay.text_queries))
    if text_mask is None:
        plan = _traced_plan(*args) if compiling() else flex_plan(*args)
    else:   # the cached plan with partial text blocks, and this call's mask in the mask_mod
        from torch.nn.attention.flex_attention import BlockMask

        base = flex_plan(*args, text_padded=True)
        p = (h // f) * (w // f) if f > 1 else 0
        qb, kb = lay.block_size
        bm = BlockMask(seq_lengths=(base.lq, base.lk), **{n: getattr(base.block_mask, n) for n in _BLOCK_FIELDS},
                       BLOCK_SIZE=(qb, kb), mask_mod=make_mask_mod((h, w), t, int(window), p, lay.q_tile,
                                                                   lay.kv_tile, lay.text_queries, text_mask))
        plan = FlexPlan(base.q_index, base.q_out, base.kv_index, bm, base.lq, base.lk)
    if f > 1:
        wt = pool_weight(down_weight, f, k)
        k_all = torch.cat([k, pool_tokens(k[:, :, t:], (h, w), f, wt)], 2)
        v_all = torch.cat([v, pool_tokens(v[:, :, t:], (h, w), f, wt)], 2)
    else:
        k_all, v_all = k, v
    qs = torch.index_select(q if lay.text_queries else q[:, :, t:], 2, plan.q_index)
    ks = torch.index_select(k_all, 2, plan.kv_index)
    vs = torch.index_select(v_all, 2, plan.kv_index)
    kw = dict(block_mask=plan.block_mask, scale=sc, kernel_options=lay.kernel_options(q.dtype))
    if compiling():
        o = _flex_fn(q.device)(qs, ks, vs, **kw)
    else:
        with warnings.catch_warnings():   # eager CPU flex warns that it is unfused; tests use it on purpose
            warnings.simplefilter("ignore", UserWarning)
            o = _flex_fn(q.device)(qs, ks, vs, **kw)
    out = torch.index_select(o, 2, plan.q_out)
    if lay.text_queries or t == 0:
        return out
    if text_mask is not None:
        from clear_cli.attention.padding import text_query_output
        return torch.cat([text_query_output(q, k, v, t, text_mask, scale), out], 2)
    o_text = F.scaled_dot_product_attention(q[:, :, :t], k, v, scale=sc)
    return torch.cat([o_text, out], 2)
