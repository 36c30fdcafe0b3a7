"""Host side of the Triton CLEAR kernel (no Triton import): launch configs and the tile relations it iterates over.

The kernel (`triton_clear`) walks the image in a x b tiles of the row-major token grid (a rows of b contiguous tokens).
For one tiling of queries and one of keys, `tile_relations` lists, per tile of the first, the tiles of the second that
some pair of their tokens can see (rectangle distance < r), the "full" ones first (every real pair inside the circle
and the other tile not ragged, so the kernel needs neither the circle nor a bounds mask), then the partial ones. The
geometry is symmetric, so the backward's key-side lists are the same function with the tilings swapped. Lists are
built once per (grid, window, tiles, device) with a few vectorised torch ops, never from an N x N mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class TileConfig:
    """One kernel family's launch shape: query tile (rows, contiguous tokens), key tile, warps, pipeline stages."""

    q_tile: tuple[int, int]
    k_tile: tuple[int, int]
    num_warps: int = 4
    num_stages: int = 2

    @property
    def block_m(self) -> int:
        return self.q_tile[0] * self.q_tile[1]

    @property
    def block_n(self) -> int:
        return self.k_tile[0] * self.k_tile[1]

    def as_list(self) -> list[int]:
        return [*self.q_tile, *self.k_tile, self.num_warps, self.num_stages]


@dataclass(frozen=True)
class TritonConfig:
    """Launch shapes: `fwd` (forward: query tiles over key tiles), `bwd` (dq: query tiles over key tiles), `dkdv`
    (dk/dv: key tiles `k_tile` over query tiles `q_tile`; None = as `bwd`). `splits`: chunks of the dense text rows
    and columns (0 = from the device's SM count)."""

    fwd: TileConfig
    bwd: TileConfig
    dkdv: TileConfig | None = None
    splits: int = 0
    name: str = ""

    @property
    def dkdv_or_bwd(self) -> TileConfig:
        return self.dkdv or self.bwd

    def as_list(self) -> list[int]:
        return [*self.fwd.as_list(), *self.bwd.as_list(), *self.dkdv_or_bwd.as_list(), self.splits]

    @staticmethod
    def from_list(x: list[int]) -> "TritonConfig":
        def tile(c: list[int]) -> TileConfig:
            return TileConfig((c[0], c[1]), (c[2], c[3]), c[4], c[5])
        return TritonConfig(tile(x[0:6]), tile(x[6:12]), tile(x[12:18]), x[18])

    def describe(self) -> str:
        def one(c: TileConfig) -> str:
            return f"q{c.q_tile[0]}x{c.q_tile[1]} k{c.k_tile[0]}x{c.k_tile[1]} w{c.num_warps} s{c.num_stages}"
        return f"fwd {one(self.fwd)}, dq {one(self.bwd)}, dkdv {one(self.dkdv_or_bwd)}"


def _cfg(name, fwd, dq, dkdv) -> TritonConfig:
    return TritonConfig(TileConfig(*fwd), TileConfig(*dq), TileConfig(*dkdv), 0, name)


# Candidates for bf16/fp16 at head_dim <= 128 on H100/H200 and A100. Tiles keep rows of >= 8 contiguous tokens (2 KiB
# per row at d = 128 in bf16). The backward walks big own tiles over small other ones (dq: 64 queries over 32-key
# tiles; dk/dv: 64 keys over 32-query tiles), as flash-attention-2 does. Chosen from the compiled kernels' resource
# use (ptxas registers and spills for sm_90a / sm_80, d = 128, bf16; see the module docstring), not from timings:
# none exist yet; `sweep` on the card decides.
_DQ = ((8, 8), (4, 8), 8, 2)
_DKDV = ((4, 8), (8, 8), 8, 2)
CANDIDATES: tuple[TritonConfig, ...] = (
    _cfg("m64n64", ((8, 8), (8, 8), 8, 3), _DQ, _DKDV),
    _cfg("m128n64", ((8, 16), (8, 8), 8, 3), _DQ, _DKDV),
    _cfg("m128n64-rows32", ((4, 32), (4, 16), 8, 3), ((4, 16), (4, 8), 8, 2), ((4, 8), (4, 16), 8, 2)),
    _cfg("m64n32-w4", ((8, 8), (4, 8), 4, 3), _DQ, _DKDV),
    _cfg("m64n64-s2", ((8, 8), (8, 8), 8, 2), ((8, 8), (4, 8), 8, 1), ((4, 8), (8, 8), 8, 1)),
)
# head_dim > 128 (bf16/fp16): 32-token tiles. fp32 (IEEE dots, twice the bytes): 16-token tiles, the only ones
# without spilled registers at d = 128. Both correctness paths more than fast ones.
WIDE = _cfg("m32n32", ((4, 8), (4, 8), 4, 1), ((4, 8), (4, 8), 4, 1), ((4, 8), (4, 8), 4, 1))
SMALL = _cfg("m16n16-fp32", ((4, 4), (4, 4), 4, 1), ((4, 4), (4, 4), 4, 1), ((4, 4), (4, 4), 4, 1))

# Winners of `triton_clear.sweep(..., apply=True)` in this process: (window bucket, head_dim, dtype, capability).
TUNED: dict[tuple, TritonConfig] = {}


def config_key(window: int, head_dim: int, dtype: torch.dtype, capability: tuple[int, int] | None) -> tuple:
    bucket = 8 if window <= 8 else (16 if window <= 16 else 32)
    return bucket, int(head_dim), str(dtype), capability


def default_config(window: int, head_dim: int, dtype: torch.dtype,
                   device: torch.device | str | None = None) -> TritonConfig:
    """The config a call uses: a swept winner for this (window bucket, head_dim, dtype, card) if any, else a guess:
    64-query / 64-key tiles (less halo waste than 128-query ones, and no spilled registers in the compiled forward),
    fewer pipeline stages before Hopper, small blocks for fp32 (16 tokens) and head_dim > 128 (32)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    tuned = TUNED.get(config_key(window, head_dim, dtype, cap))
    if tuned is not None:
        return tuned
    if dtype == torch.float32:
        return SMALL
    if head_dim > 128:
        return WIDE
    by_name = {c.name: c for c in CANDIDATES}
    if cap is not None and cap[0] < 9:
        return by_name["m64n64-s2"]
    return by_name["m64n64"]


@dataclass(frozen=True)
class TileRelations:
    """For each tile of one tiling, the touched tiles of another: `index` [n, C] (full ones first), `counts` [n, 2]
    (full, touched). `tiles_x` / `other_x`: tiles per tile-row of each tiling (a tile index is row * tiles_x + col)."""

    n_tiles: int
    tiles_x: int
    other_x: int
    index: torch.Tensor
    counts: torch.Tensor

    @property
    def touched(self) -> int:
        return int(self.counts[:, 1].sum())

    @property
    def full(self) -> int:
        return int(self.counts[:, 0].sum())


def _rects(grid: tuple[int, int], tile: tuple[int, int]):
    h, w = grid
    a, b = tile
    ty, tx = -(-h // a), -(-w // b)
    y0 = (torch.arange(ty) * a).repeat_interleave(tx)
    x0 = (torch.arange(tx) * b).repeat(ty)
    y1 = (y0 + a - 1).clamp(max=h - 1)     # real extent: ragged edge tiles are smaller
    x1 = (x0 + b - 1).clamp(max=w - 1)
    ragged = (y0 + a > h) | (x0 + b > w)
    return y0, x0, y1, x1, ragged, ty, tx


@lru_cache(maxsize=64)
def _relations_cpu(grid: tuple[int, int], window: int, tile: tuple[int, int], other: tuple[int, int]
                   ) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    r = int(window)
    r2 = r * r
    ay0, ax0, ay1, ax1, _, _, atx = _rects(grid, tile)
    by0, bx0, by1, bx1, bragged, bty, btx = _rects(grid, other)
    # candidate rows/cols of the other tiling: every one within r - 1 of this tile's extent (clamped to the lattice)
    ny = min(bty, (tile[0] + 2 * (r - 1)) // other[0] + 2)
    nx = min(btx, (tile[1] + 2 * (r - 1)) // other[1] + 2)
    row0 = torch.div(ay0 - (r - 1), other[0], rounding_mode="floor").clamp(0, bty - ny)
    col0 = torch.div(ax0 - (r - 1), other[1], rounding_mode="floor").clamp(0, btx - nx)
    rows = row0[:, None] + torch.arange(ny).repeat_interleave(nx)[None]
    cols = col0[:, None] + torch.arange(nx).repeat(ny)[None]
    c = rows * btx + cols
    gy_min = torch.clamp(torch.maximum(by0[c] - ay1[:, None], ay0[:, None] - by1[c]), min=0)
    gx_min = torch.clamp(torch.maximum(bx0[c] - ax1[:, None], ax0[:, None] - bx1[c]), min=0)
    gy_max = torch.maximum(by1[c] - ay0[:, None], ay1[:, None] - by0[c])
    gx_max = torch.maximum(bx1[c] - ax0[:, None], ax1[:, None] - bx0[c])
    touch = gy_min ** 2 + gx_min ** 2 < r2
    full = touch & (gy_max ** 2 + gx_max ** 2 < r2) & ~bragged[c]
    rank = torch.where(full, 0, torch.where(touch, 1, 2)).to(torch.int8)
    order = torch.argsort(rank, dim=1, stable=True)
    counts = torch.stack([full.sum(1), touch.sum(1)], 1)
    width = max(int(counts[:, 1].max()), 1)
    index = torch.gather(c, 1, order)[:, :width]
    return ay0.numel(), atx, btx, index.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


@lru_cache(maxsize=64)
def tile_relations(grid: tuple[int, int], window: int, tile: tuple[int, int], other: tuple[int, int],
                   device: torch.device | str = "cpu") -> TileRelations:
    """Tiles of `other` touched by each tile of `tile` (both tilings of the same grid). Text length and down_factor
    do not enter: text and pooled keys are dense blocks the kernel adds itself. Cached per device."""
    n, tx, ox, index, counts = _relations_cpu(tuple(grid), int(window), tuple(tile), tuple(other))
    dev = torch.device(device)
    return TileRelations(n, tx, ox, index.to(dev), counts.to(dev))


def kernel_work(grid: tuple[int, int], text_len: int, window: int, down_factor: int, config: TritonConfig
                ) -> tuple[int, int]:
    """(all pairs, image-to-image pairs) the forward computes with `config`: touched tiles x tile areas, text and
    pooled keys rounded up to whole key blocks, text queries to whole query blocks."""
    h, w = grid
    t, hw = int(text_len), h * w
    p = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    c = config.fwd
    bm, bn = c.block_m, c.block_n
    rel = tile_relations(tuple(grid), int(window), c.q_tile, c.k_tile)
    img = rel.touched * bm * bn
    slots = rel.n_tiles * bm
    ceil = lambda x, m: -(-x // m) * m  # noqa: E731
    text_rows = ceil(t, bm) * ceil(t + hw, bn) if t else 0
    return text_rows + slots * (ceil(t, bn) + ceil(p, bn)) + img, img
