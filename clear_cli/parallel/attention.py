"""Exact CLEAR attention for one band of image rows, with halo exchange, pooled-token all-gather and LSE merge.

Each process holds the text tokens (identical everywhere) and the image tokens of its band [start, stop) of rows.
- Image queries of the band see every text key, the keys strictly inside their circle and (f > 1) every pooled key.
  The circle reaches r-1 rows, so the band's keys plus the halo rows from its neighbours are all it needs
  (`exchange_halos`, point-to-point); pooled keys are small: each band pools its own rows (bands are multiples of
  f rows) and they are all-gathered (`gather_pooled`). A tiled kernel attends over [text | pooled | circle].
- Text queries see every text and image key (no pooled key): each process attends over its own band's image keys
  (process 0 also over the text keys, so each key counts once) and the partial results are merged exactly with a
  log-sum-exp combination (`merge_text`: all-reduce of the max, then of the weighted sums and weights).
The result equals single-process `clear_attention` on the whole grid, restricted to the band, up to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale, pool_tokens, pool_weight, tile_key_offsets, tile_order
from clear_cli.parallel.bands import halo_plan, key_rows, split_bands
from clear_cli.parallel.comm import Comm, nbytes

# Gathered keys + masks of one chunk of tiles: small on CPU (heap-recycled buffers), large on GPUs, where each
# chunk is a kernel launch and a Python iteration.
CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 1024 * 2**20}
LSE_CHUNK_BYTES = 128 * 2**20  # fp32 scores of one chunk of heads (text queries)


@dataclass(frozen=True)
class BandGroup:
    """One image split over the processes of `comm`: the token grid and every process's band of rows."""

    comm: Comm
    grid: tuple[int, int]
    bands: tuple[tuple[int, int], ...]
    down_factor: int = 1

    @classmethod
    def split(cls, comm: Comm, grid: tuple[int, int], down_factor: int = 1) -> BandGroup:
        bands = split_bands(int(grid[0]), comm.size, down_factor)
        return cls(comm, (int(grid[0]), int(grid[1])), tuple(bands), int(down_factor))

    @property
    def band(self) -> tuple[int, int]:
        return self.bands[self.comm.rank]

    @property
    def band_grid(self) -> tuple[int, int]:
        s, e = self.band
        return e - s, self.grid[1]

    def rows(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This band's image tokens of a full row-major token sequence (dim = the token dimension)."""
        s, e = self.band
        w = self.grid[1]
        return x.narrow(dim, s * w, (e - s) * w)

    def gather_rows(self, x: torch.Tensor, dim: int = 1, kind: str = "gather") -> torch.Tensor:
        """The inverse of `rows`: every band's tokens, joined in row order (on every process)."""
        w = self.grid[1]
        sizes = [(e - s) * w for s, e in self.bands]
        return torch.cat(self.comm.all_gather(x, kind, sizes=sizes, dim=dim), dim=dim)


def exchange_halos(k_img: torch.Tensor, v_img: torch.Tensor, group: BandGroup, window: int
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keys/values of the rows the band's queries can reach: [B, heads, (hi-lo)*W, d] each, and lo.

    Sends this band's rows inside each other band's reach, receives the rows of its own reach from their owners.
    """
    comm, (s, e), w = group.comm, group.band, group.grid[1]
    b, nh, _, d = k_img.shape
    sends, recvs, pieces = [], [], []
    for t in halo_plan(list(group.bands), window):
        if t.src == comm.rank:
            a = (t.start - s) * w
            n = t.rows * w
            sends.append((t.dst, torch.stack([k_img[:, :, a:a + n], v_img[:, :, a:a + n]])))
        elif t.dst == comm.rank:
            buf = k_img.new_empty(2, b, nh, t.rows * w, d)
            recvs.append((t.src, buf))
            pieces.append((t.start, buf))
    comm.exchange(sends, recvs, "halo")
    pieces.append((s, torch.stack([k_img, v_img])))
    pieces.sort(key=lambda p: p[0])
    lo, hi = key_rows(group.band, group.grid[0], window)
    if pieces[0][0] != lo or sum(p.shape[3] for _, p in pieces) != (hi - lo) * w:
        raise RuntimeError(f"halo rows do not cover {lo}..{hi} for band {s}..{e}")  # a bug, not user input
    kv = torch.cat([p for _, p in pieces], dim=3) if len(pieces) > 1 else pieces[0][1]
    return kv[0], kv[1], lo


def gather_pooled(k_img: torch.Tensor, v_img: torch.Tensor, group: BandGroup, down_weight: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """All (H/f)(W/f) pooled keys/values, row-major: each band pools its own rows, then all-gather."""
    f, w = group.down_factor, group.grid[1]
    wt = pool_weight(down_weight, f, k_img)
    both = torch.stack([pool_tokens(k_img, group.band_grid, f, wt), pool_tokens(v_img, group.band_grid, f, wt)])
    sizes = [((e - s) // f) * (w // f) for s, e in group.bands]
    pooled = torch.cat(group.comm.all_gather(both, "pooled", sizes=sizes, dim=3), dim=3)
    return pooled[0], pooled[1]


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention in fp32 returning (output, log-sum-exp of the scores) per query; chunked over heads."""
    b, nh, lq, d = q.shape
    lk = k.shape[2]
    q2, k2, v2 = (x.reshape(b * nh, x.shape[2], d) for x in (q, k, v))
    step = max(1, LSE_CHUNK_BYTES // max(1, lq * lk * 4))
    outs, lses = [], []
    for i in range(0, b * nh, step):
        s = torch.matmul(q2[i:i + step].float(), k2[i:i + step].float().transpose(1, 2)) * scale
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), v2[i:i + step].float()))
        lses.append(lse)
    return torch.cat(outs).view(b, nh, lq, d), torch.cat(lses).view(b, nh, lq)


def merge_text(out: torch.Tensor, lse: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Exact softmax over the union of every process's keys from the per-process (output, log-sum-exp)."""
    m = comm.all_reduce_(lse.clone(), "max", "text")
    wgt = torch.exp(lse - m)
    buf = torch.cat([out * wgt[..., None], wgt[..., None]], dim=-1)
    comm.all_reduce_(buf, "sum", "text")
    return buf[..., :-1] / buf[..., -1:]


@dataclass(frozen=True)
class BandPlan:
    """Query tiles over the band and, for each, the sub-grid keys its circles reach (index tensors, cached)."""

    tile: tuple[int, int]
    slot_to_token: torch.Tensor  # [tiles*a*b] band token of each tile-major slot; band_rows*W marks a pad slot
    key_index: torch.Tensor      # [tiles, K] sub-grid token of each key; sub_rows*W (a zero row) when outside
    rel: torch.Tensor            # [a*b, K] circle of each query of a tile over the tile's keys
    key_valid: torch.Tensor      # [tiles, K] key inside the sub-grid
    pad_query: torch.Tensor      # [tiles, a*b] slot outside the band (its output is dropped)

    @property
    def n_tiles(self) -> int:
        return int(self.key_index.shape[0])


def band_tile(band_rows: int, width: int) -> tuple[int, int]:
    return min(8, band_rows), min(16, width)


@lru_cache(maxsize=32)
def band_plan(band_rows: int, sub_rows: int, top: int, width: int, window: int, tile: tuple[int, int],
              device: torch.device) -> BandPlan:
    """Plan for a band of `band_rows` rows starting `top` rows into a key sub-grid of `sub_rows` rows."""
    a, b = tile
    slot_to_token, _, origin = tile_order((band_rows, width), tile, device)
    offs = torch.tensor(tile_key_offsets(tile, window), dtype=torch.long, device=device)
    ky = top + origin[:, 0:1] + offs[None, :, 0]
    kx = origin[:, 1:2] + offs[None, :, 1]
    valid = (ky >= 0) & (ky < sub_rows) & (kx >= 0) & (kx < width)
    key_index = torch.where(valid, ky.clamp(0, sub_rows - 1) * width + kx.clamp(0, width - 1),
                            torch.full_like(ky, sub_rows * width))
    pad_query = (slot_to_token == band_rows * width).reshape(-1, a * b)
    qy = torch.arange(a, device=device).repeat_interleave(b)
    qx = torch.arange(b, device=device).repeat(a)
    rel = (qy[:, None] - offs[None, :, 0]) ** 2 + (qx[:, None] - offs[None, :, 1]) ** 2 < window * window
    return BandPlan(tile, slot_to_token, key_index, rel, valid, pad_query)


def band_image_attention(q_img: torch.Tensor, k_ctx: torch.Tensor, v_ctx: torch.Tensor, k_sub: torch.Tensor,
                         v_sub: torch.Tensor, *, band_rows: int, top: int, width: int, window: int, scale: float,
                         tile: tuple[int, int] | None = None) -> torch.Tensor:
    """Image queries of a band [B, heads, band_rows*W, d] over context keys seen by all (text, pooled) and the
    circle keys in the sub-grid `k_sub` (rows of the band's reach; the band starts `top` rows into it)."""
    b, nh, n_q, d = q_img.shape
    sub_rows = k_sub.shape[2] // width
    tc = k_ctx.shape[2]
    plan = band_plan(band_rows, sub_rows, top, width, int(window), tile or band_tile(band_rows, width), q_img.device)
    ab = plan.tile[0] * plan.tile[1]
    n_keys = tc + plan.key_index.shape[1]
    zero = q_img.new_zeros(b, nh, 1, d)
    k_src = torch.cat([k_ctx, k_sub, zero], dim=2)
    v_src = torch.cat([v_ctx, v_sub, zero], dim=2)
    q_src = torch.cat([q_img, zero], dim=2)
    out = q_img.new_empty(b, nh, n_q + 1, d)  # + a dump row for pad slots
    ctx_index = torch.arange(tc, device=q_img.device)
    per_tile = n_keys * (2 * b * nh * d + ab) * q_img.element_size()
    chunk = max(1, CHUNK_BYTES.get(q_img.device.type, CHUNK_BYTES["cpu"]) // per_tile)
    for c0 in range(0, plan.n_tiles, chunk):
        c1 = min(plan.n_tiles, c0 + chunk)
        nc = c1 - c0
        idx = torch.cat([ctx_index.expand(nc, tc), tc + plan.key_index[c0:c1]], dim=1).reshape(-1)
        kc = k_src.index_select(2, idx).view(b * nh, nc, n_keys, d)
        vc = v_src.index_select(2, idx).view(b * nh, nc, n_keys, d)
        slots = plan.slot_to_token[c0 * ab:c1 * ab]
        qc = q_src.index_select(2, slots).view(b * nh, nc, ab, d)
        img = plan.rel[None] & plan.key_valid[c0:c1, None, :]
        img |= plan.pad_query[c0:c1, :, None]  # pad slots see everything: no empty rows (their output is dropped)
        mask = q_img.new_zeros(nc, ab, n_keys)
        mask[..., tc:].masked_fill_(~img, float("-inf"))
        oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
        out.index_copy_(2, slots, oc.reshape(b, nh, nc * ab, d))
    return out[:, :, :n_q]


@dataclass
class BandKeys:
    """What the band's queries attend to besides its own tokens, after communication."""

    k_sub: torch.Tensor  # [B, heads, (hi-lo)*W, d] keys of the rows in reach (band + halo)
    v_sub: torch.Tensor
    lo: int              # first row of k_sub
    k_ctx: torch.Tensor  # [B, heads, T (+ pooled), d] keys every image query sees: text, then pooled (f > 1)
    v_ctx: torch.Tensor


def band_communicate(k: torch.Tensor, v: torch.Tensor, *, text_len: int, group: BandGroup, window: int,
                     down_weight: torch.Tensor | None = None) -> BandKeys:
    """The image queries' communication: halo exchange and (f > 1) pooled all-gather. Also books what sequence
    parallelism would send instead (every band's image keys and values to every process, padded to the longest
    band as `Comm.all_gather` sends uneven chunks). Runs on meta tensors with a DryComm (the figures)."""
    t, comm = int(text_len), group.comm
    hb, w = group.band_grid
    k_img, v_img = k[:, :, t:], v[:, :, t:]
    k_sub, v_sub, lo = exchange_halos(k_img, v_img, group, window)
    longest = max(e - s for s, e in group.bands)
    comm.would_all_gather(2 * nbytes(k_img) // hb * longest, "kv_all_gather")
    k_ctx, v_ctx = k[:, :, :t], v[:, :, :t]
    if group.down_factor > 1:
        pk, pv = gather_pooled(k_img, v_img, group, down_weight)
        k_ctx, v_ctx = torch.cat([k_ctx, pk], dim=2), torch.cat([v_ctx, pv], dim=2)
    return BandKeys(k_sub, v_sub, lo, k_ctx, v_ctx)


def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, group: BandGroup,
                   window: int, down_weight: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """CLEAR attention for this process's band: q/k/v `[B, heads, text_len + band_rows*W, d]` (text first, the band's
    image tokens row-major), returns the same shape; equal to `clear_attention` on the whole grid, restricted."""
    t = int(text_len)
    hb, w = group.band_grid
    if q.shape[2] != t + hb * w or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"band attention expects {t} text + {hb}x{w} band tokens, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    sc = default_scale(q.shape[-1], scale)
    keys = band_communicate(k, v, text_len=t, group=group, window=window, down_weight=down_weight)
    out_img = band_image_attention(q[:, :, t:], keys.k_ctx, keys.v_ctx, keys.k_sub, keys.v_sub, band_rows=hb,
                                   top=group.band[0] - keys.lo, width=w, window=window, scale=sc)
    if not t:
        return out_img
    if group.comm.rank == 0:  # text keys counted on exactly one process
        kt, vt = k, v
    else:
        kt, vt = k[:, :, t:], v[:, :, t:]
    o_text, lse = attend_lse(q[:, :, :t], kt, vt, sc)
    o_text = merge_text(o_text, lse, group.comm).to(q.dtype)
    return torch.cat([o_text, out_img], dim=2)
