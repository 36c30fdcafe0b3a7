"""Host side of the 3-D Triton kernel (no Triton import): launch configs and the 3-D tile relations.

A tile is ta frames x a rows x b contiguous tokens of the frame-major (T, H, W) grid. `video_tile_relations` lists,
per tile of one tiling, the tiles of another that some pair of their tokens may see (the boxes' smallest per-axis
gaps inside the ellipsoid), the "full" ones first (the largest gaps inside too, and the other tile not ragged: no mask
in the kernel), then the partial ones. The rule is symmetric, so the backward's key-side lists are the same function
with the tilings swapped. Built once per geometry with a few vectorised torch ops, never from an N x N mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from clear_cli.attention.video_geometry import Grid3, allowed, time_reach

Tile3 = tuple[int, int, int]


@dataclass(frozen=True)
class VideoTileConfig:
    """One kernel family's launch shape: query tile and key tile (frames, rows, contiguous tokens), warps, stages."""

    q_tile: Tile3
    k_tile: Tile3
    num_warps: int = 4
    num_stages: int = 2

    @property
    def block_m(self) -> int:
        return self.q_tile[0] * self.q_tile[1] * self.q_tile[2]

    @property
    def block_n(self) -> int:
        return self.k_tile[0] * self.k_tile[1] * self.k_tile[2]

    def as_list(self) -> list[int]:
        return [*self.q_tile, *self.k_tile, self.num_warps, self.num_stages]


@dataclass(frozen=True)
class VideoTritonConfig:
    """`fwd` (query tiles over key tiles), `bwd` (dq), `dkdv` (key tiles `k_tile` over query tiles `q_tile`; None = as
    `bwd`), `splits` (chunks of the dense global rows/columns; 0 = from the SM count)."""

    fwd: VideoTileConfig
    bwd: VideoTileConfig
    dkdv: VideoTileConfig | None = None
    splits: int = 0
    name: str = ""

    @property
    def dkdv_or_bwd(self) -> VideoTileConfig:
        return self.dkdv or self.bwd

    def as_list(self) -> list[int]:
        return [*self.fwd.as_list(), *self.bwd.as_list(), *self.dkdv_or_bwd.as_list(), self.splits]

    @staticmethod
    def from_list(x: list[int]) -> "VideoTritonConfig":
        def one(c: list[int]) -> VideoTileConfig:
            return VideoTileConfig((c[0], c[1], c[2]), (c[3], c[4], c[5]), c[6], c[7])
        return VideoTritonConfig(one(x[0:8]), one(x[8:16]), one(x[16:24]), x[24])

    def describe(self) -> str:
        def one(c: VideoTileConfig) -> str:
            return (f"q{'x'.join(map(str, c.q_tile))} k{'x'.join(map(str, c.k_tile))} "
                    f"w{c.num_warps} s{c.num_stages}")
        return f"fwd {one(self.fwd)}, dq {one(self.bwd)}, dkdv {one(self.dkdv_or_bwd)}"


def _family(name: str, tile: Tile3, half: Tile3, warps: int, stages: int) -> VideoTritonConfig:
    """A 64-token (or other) tile family: forward tile over tile; backward own tile over the half tile (as the 2-D
    kernel's flash-attention-2 style backward)."""
    return VideoTritonConfig(VideoTileConfig(tile, tile, warps, stages), VideoTileConfig(tile, half, warps, 2),
                             VideoTileConfig(half, tile, warps, 2), 0, name)


# bf16/fp16 at head_dim <= 128: 64-token tiles (the 2-D kernel's measured-register choice) in several 3-D shapes;
# which one wastes least depends on r_t against r, so `default_video_config` picks by exact kernel work.
CANDIDATES: tuple[VideoTritonConfig, ...] = (
    _family("t1y8x8", (1, 8, 8), (1, 4, 8), 8, 3),
    _family("t2y4x8", (2, 4, 8), (1, 4, 8), 8, 3),
    _family("t4y2x8", (4, 2, 8), (2, 2, 8), 8, 3),
    _family("t4y4x4", (4, 4, 4), (2, 4, 4), 8, 3),
    _family("t1y4x16", (1, 4, 16), (1, 2, 16), 8, 3),
)
# fp32 (IEEE dots, twice the bytes): 16-token tiles; head_dim > 128: 32-token tiles. Correctness paths.
SMALL = (_family("t1y4x4-fp32", (1, 4, 4), (1, 4, 4), 4, 1), _family("t2y2x4-fp32", (2, 2, 4), (2, 2, 4), 4, 1))
WIDE = (_family("t1y4x8", (1, 4, 8), (1, 4, 8), 4, 1), _family("t2y4x4", (2, 4, 4), (2, 4, 4), 4, 1))
TUNED: dict[tuple, VideoTritonConfig] = {}


@dataclass(frozen=True)
class VideoTileRelations:
    """Per tile of one tiling, the touched tiles of another: `index` [n, C] (full first), `counts` [n, 2] (full,
    touched). `tiles` / `other`: the (frames, rows, columns) tile-lattice sizes of each tiling."""

    n_tiles: int
    tiles: Tile3
    other: Tile3
    index: torch.Tensor
    counts: torch.Tensor

    @property
    def touched(self) -> int:
        return int(self.counts[:, 1].sum())

    @property
    def full(self) -> int:
        return int(self.counts[:, 0].sum())


def _boxes(grid: Grid3, tile: Tile3):
    lattice = tuple(-(-g // s) for g, s in zip(grid, tile))
    n = lattice[0] * lattice[1] * lattice[2]
    i = torch.arange(n)
    idx = (i // (lattice[1] * lattice[2]), i // lattice[2] % lattice[1], i % lattice[2])
    lo = [idx[a] * tile[a] for a in range(3)]
    hi = [(lo[a] + tile[a] - 1).clamp(max=grid[a] - 1) for a in range(3)]   # real extent: ragged tiles are smaller
    ragged = (lo[0] + tile[0] > grid[0]) | (lo[1] + tile[1] > grid[1]) | (lo[2] + tile[2] > grid[2])
    return lo, hi, ragged, lattice


@lru_cache(maxsize=64)
def _relations_cpu(grid: Grid3, window: int, time_window: int, tile: Tile3, other: Tile3):
    reach = (time_reach(time_window), int(window) - 1, int(window) - 1)
    alo, ahi, _, alat = _boxes(grid, tile)
    blo, bhi, bragged, blat = _boxes(grid, other)
    # candidates per axis: the other tiles within `reach` of this tile's extent (clamped to the lattice)
    cand, start = [], []
    for a in range(3):
        cnt = min(blat[a], (tile[a] + 2 * reach[a]) // other[a] + 2)
        s0 = torch.div(alo[a] - reach[a], other[a], rounding_mode="floor").clamp(0, blat[a] - cnt)
        cand.append(cnt)
        start.append(s0)
    ct, cy, cx = cand
    j = torch.arange(ct * cy * cx)
    ot = start[0][:, None] + (j // (cy * cx))[None]
    oy = start[1][:, None] + (j // cx % cy)[None]
    ox = start[2][:, None] + (j % cx)[None]
    c = (ot * blat[1] + oy) * blat[2] + ox
    gmin, gmax = [], []
    for a in range(3):
        lo_b, hi_b = blo[a][c], bhi[a][c]
        gmin.append(torch.clamp(torch.maximum(lo_b - ahi[a][:, None], alo[a][:, None] - hi_b), min=0))
        gmax.append(torch.maximum(hi_b - alo[a][:, None], ahi[a][:, None] - lo_b))
    touch = allowed(gmin[0], gmin[1], gmin[2], window, time_window)
    full = touch & allowed(gmax[0], gmax[1], gmax[2], window, time_window) & ~bragged[c]
    rank = torch.where(full, 0, torch.where(touch, 1, 2)).to(torch.int8)
    order = torch.argsort(rank, dim=1, stable=True)
    counts = torch.stack([full.sum(1), touch.sum(1)], 1)
    width = max(int(counts[:, 1].max()), 1)
    index = torch.gather(c, 1, order)[:, :width]
    return c.shape[0], alat, blat, index.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


@lru_cache(maxsize=64)
def video_tile_relations(grid: Grid3, window: int, time_window: int, tile: Tile3, other: Tile3,
                         device: torch.device | str = "cpu") -> VideoTileRelations:
    """Tiles of `other` touched by each tile of `tile` (two tilings of one grid); cached per device."""
    n, alat, blat, index, counts = _relations_cpu(tuple(grid), int(window), int(time_window), tuple(tile),
                                                  tuple(other))
    dev = torch.device(device)
    return VideoTileRelations(n, alat, blat, index.to(dev), counts.to(dev))


def video_kernel_work(grid: Grid3, text_len: int, window: int, time_window: int, config: VideoTritonConfig
                      ) -> tuple[int, int]:
    """(all pairs, video-to-video pairs) the forward computes with `config`: touched tiles x tile sizes, global
    keys rounded up to whole key blocks, global queries to whole query blocks."""
    g, n_img = int(text_len), grid[0] * grid[1] * grid[2]
    c = config.fwd
    bm, bn = c.block_m, c.block_n
    rel = video_tile_relations(tuple(grid), int(window), int(time_window), c.q_tile, c.k_tile)
    img = rel.touched * bm * bn
    ceil = lambda x, m: -(-x // m) * m  # noqa: E731
    text_rows = ceil(g, bm) * ceil(g + n_img, bn) if g else 0
    return text_rows + rel.n_tiles * bm * ceil(g, bn) + img, img


def config_key(grid: Grid3, window: int, time_window: int, head_dim: int, dtype: torch.dtype,
               capability: tuple[int, int] | None) -> tuple:
    return tuple(grid), int(window), int(time_window), int(head_dim), str(dtype), capability


@lru_cache(maxsize=256)
def _least_work(grid: Grid3, window: int, time_window: int, pool: tuple[VideoTritonConfig, ...]) -> VideoTritonConfig:
    return min(pool, key=lambda c: video_kernel_work(grid, 0, window, time_window, c)[1])


def default_video_config(grid: Grid3, window: int, time_window: int, head_dim: int, dtype: torch.dtype,
                         device: torch.device | str | None = None) -> VideoTritonConfig:
    """The config a call uses: a swept winner for this shape and card if any, else the candidate of the right size
    class (64-token tiles; fp32 16, head_dim > 128 32) whose touched tiles hold the fewest pairs. Not a timing."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cap = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    tuned = TUNED.get(config_key(grid, window, time_window, head_dim, dtype, cap))
    if tuned is not None:
        return tuned
    pool = SMALL if dtype == torch.float32 else (WIDE if head_dim > 128 else CANDIDATES)
    return _least_work(tuple(grid), int(window), int(time_window), pool)
