"""Forward-only CPU CLEAR attention over column bands: halo keys read through strided views, no per-tile gather.

Image queries are cut into a x b tiles. Keys/values are copied band by band into one reused buffer (band tx holds
grid columns [tx*b - px, tx*b + b + px) of every row, zero outside the grid): inside a band the halo rectangle of
each tile is one contiguous run of rows, so all tiles of a band are one overlapping strided view that the fused CPU
SDPA kernel reads in place (each key copied (b + 2px) / b times in all, instead of once per tile that sees it, and
no index gather). The rectangle holds ~13% more keys than the union of the tile's circles; that costs less than
gathering the union tile by tile did. Border tiles of a band run in one call with one mask per tile, interior tiles
in one call sharing one broadcast mask.
Text and pooled keys ("global" keys, seen by every image query) are attended in one dense call per band and merged with
each tile run's local output by log-sum-exp, so tiles carry only image keys. Text queries attend densely.

The merge needs SDPA's logsumexp, which autograd does not differentiate: this path serves inference only;
`tiled_attention` keeps the differentiable path for training. Memory: the output, one band of (H + 2py)(b + 2px)
keys and values, and masks of a*b x (a + 2py)(b + 2px) per border class; never N^2.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale, pool_tokens, pool_weight

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
MASK_CACHE_BYTES = 128 * 2**20  # border masks beyond this many bytes are rebuilt per call instead of kept
WORKSPACE_BYTES = 256 * 2**20   # scratch kept between calls (per thread)


@dataclass(frozen=True)
class BandPlan:
    """Geometry of one (grid, window, tile): halo pads, per-tile-row/column border classes, the circle mask."""

    grid: tuple[int, int]
    tile: tuple[int, int]
    pad: tuple[int, int]          # (py, px): halo rows/columns on each side
    n_tiles: tuple[int, int]      # (n_ty, n_tx)
    row_class: tuple[tuple[int, int, int], ...]   # per ty: (first valid halo row, end, valid query rows)
    col_class: tuple[tuple[int, int, int], ...]   # per tx: (first valid halo col, end, valid query cols)
    rel: torch.Tensor             # [a*b, hh*ww] bool: query slot sees halo position (circle)
    segments: tuple[tuple[int, int], ...]   # tile-row runs [ty0, ty1): the interior run, border runs around it
    masks: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def halo(self) -> tuple[int, int]:
        return self.tile[0] + 2 * self.pad[0], self.tile[1] + 2 * self.pad[1]

    def mask(self, rc: tuple[int, int, int], cc: tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
        """Additive [a*b, hh*ww] mask of a tile whose rows/columns fall in classes rc / cc (cached while small)."""
        key = (rc, cc, dtype)
        m = self.masks.get(key)
        if m is not None:
            return m
        (a, b), (hh, ww) = self.tile, self.halo
        valid = torch.zeros(hh, ww, dtype=torch.bool, device=self.rel.device)
        valid[rc[0]:rc[1], cc[0]:cc[1]] = True
        ok = self.rel & valid.reshape(1, -1)
        if rc[2] < a or cc[2] < b:   # pad query slots (ragged edge tiles) see every key; their output is dropped
            pad_q = torch.ones(a, b, dtype=torch.bool, device=self.rel.device)
            pad_q[:rc[2], :cc[2]] = False
            ok |= pad_q.reshape(-1, 1)
        return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, float("-inf"))

    def run_mask(self, ty0: int, ty1: int, tx: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive [1, ty1-ty0, a*b, hh*ww] mask of tiles ty0..ty1-1 of band tx: one shared mask broadcast where
        their classes agree (interior), else one per tile (border runs), so each run is one kernel call."""
        key = (ty0, ty1, self.col_class[tx], dtype)
        m = self.masks.get(key)
        if m is not None:
            return m
        rcs = self.row_class[ty0:ty1]
        cc = self.col_class[tx]
        if all(rc == rcs[0] for rc in rcs):
            m = self.mask(rcs[0], cc, dtype)[None, None].expand(1, ty1 - ty0, -1, -1)
        else:
            m = torch.stack([self.mask(rc, cc, dtype) for rc in rcs])[None]
        size = sum(x.untyped_storage().nbytes() for x in self.masks.values())
        if size + m.untyped_storage().nbytes() <= MASK_CACHE_BYTES:
            self.masks[key] = m
        return m


def _classes(n: int, size: int, pad: int, extent: int) -> tuple[tuple[int, int, int], ...]:
    # tile i covers [i*size, i*size + size); its halo position j is grid index i*size - pad + j
    return tuple((max(0, pad - i * size), min(size + 2 * pad, extent - i * size + pad), min(size, extent - i * size))
                 for i in range(n))


@lru_cache(maxsize=32)
def band_plan(grid: tuple[int, int], window: int, tile: tuple[int, int], device: torch.device) -> BandPlan:
    h, w = grid
    a, b = tile
    # a halo never needs to reach further than the grid itself
    py, px = min(window - 1, h - 1), min(window - 1, w - 1)
    n_ty, n_tx = -(-h // a), -(-w // b)
    hh, ww = a + 2 * py, b + 2 * px
    qy = torch.arange(a, device=device).repeat_interleave(b)
    qx = torch.arange(b, device=device).repeat(a)
    ky = torch.arange(hh, device=device).repeat_interleave(ww) - py
    kx = torch.arange(ww, device=device).repeat(hh) - px
    rel = (qy[:, None] - ky[None]) ** 2 + (qx[:, None] - kx[None]) ** 2 < window * window
    rows = _classes(n_ty, a, py, h)
    inner = [i for i, rc in enumerate(rows) if rc == (0, hh, a)]
    if inner:   # inner tile rows are consecutive: borders above, the interior run, borders below
        cuts = [0, inner[0], inner[-1] + 1, n_ty]
        segments = tuple((s, e) for s, e in zip(cuts, cuts[1:]) if e > s)
    else:
        segments = ((0, n_ty),)
    return BandPlan(grid, tile, (py, px), (n_ty, n_tx), rows, _classes(n_tx, b, px, w), rel, segments)


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.bufs: dict = {}


_WS = _Workspace()


def _scratch(name: str, shape: tuple[int, ...], like: torch.Tensor, geo: tuple, zero: bool = False,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """A scratch buffer kept between calls of the same geometry (per thread, up to WORKSPACE_BYTES in all).

    Fresh large buffers are mmap'd by glibc and page-fault on first touch, which cost ~10% of a 64x64 call.
    Buffers from `zero=True` are zeroed once, when made; callers only ever write the same region of them again.
    """
    dtype = dtype or like.dtype
    key = (shape, dtype, like.device, geo, torch.is_inference_mode_enabled())
    hit = _WS.bufs.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    buf = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=like.device)
    nbytes = buf.numel() * buf.element_size()
    _WS.bufs.pop(name, None)
    if nbytes + sum(b.numel() * b.element_size() for _, b in _WS.bufs.values()) <= WORKSPACE_BYTES:
        _WS.bufs[name] = (key, buf)
    return buf


# Tile shape by window, measured (fp32, 4 heads x 64, one AVX-512 core): the fused kernel runs its 32-query blocks
# about as fast as larger ones, so short tiles (less halo per query) win; 2 x 8 below r = 12, 4 x 8 from there
# (checked at r = 2, 4, 8, 16, 24, 32 against 1x16 ... 8x16).
def choose_band_tile(grid: tuple[int, int], window: int) -> tuple[int, int]:
    h, w = grid
    a, b = (2, 8) if window < 12 else (4, 8)
    return min(a, h), min(b, w)


def band_work(grid: tuple[int, int], text_len: int, window: int, down_factor: int = 1) -> tuple[int, int]:
    """(all pairs computed, image-to-image pairs computed) by `band_attention`'s schedule, pad slots included."""
    h, w = grid
    a, b = choose_band_tile(grid, window)
    py, px = min(window - 1, h - 1), min(window - 1, w - 1)
    slots = -(-h // a) * a * -(-w // b) * b
    p = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    img = slots * (a + 2 * py) * (b + 2 * px)
    return text_len * (text_len + h * w) + slots * (text_len + p) + img, img


# over 80 lines: one CPU kernel whose steps share a dozen views of the same scratch buffers (bands, tiles, pads);
# split, each step would take them all as arguments, and the hot loop would read across functions.
def band_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: tuple[int, int],
                   window: int, down_factor: int = 1, down_weight: torch.Tensor | None = None,
                   scale: float | None = None, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """CLEAR attention (same contract as `clear_attention`), CPU, no autograd. Inputs are checked by the caller."""
    bsz, nh, n, d = q.shape
    bh, c = bsz * nh, bsz * nh * d
    t, f = text_len, down_factor
    h, w = grid
    sc = default_scale(d, scale)
    tile = tuple(tile) if tile is not None else choose_band_tile(grid, window)
    plan = band_plan((h, w), int(window), tile, q.device)
    a, b = tile
    ab = a * b
    py, px = plan.pad
    n_ty, n_tx = plan.n_tiles
    hh, ww = plan.halo
    hp, wp = n_ty * a, n_tx * b

    geo = (bsz, nh, d, h, w, a, b, py, px)
    ragged = (hp, wp) != (h, w)

    def img(x: torch.Tensor) -> torch.Tensor:    # [B, nh, H, W, d] view of the image tokens
        return x[:, :, t:].view(bsz, nh, h, w, d)

    q_src = img(q)
    out = q.new_empty(n, bsz, nh, d)             # token-major, returned as a [B, nh, N, d] view
    if ragged:   # pad queries to whole tiles; outputs go to a padded buffer, cropped at the end
        q_src = F.pad(q_src, (0, 0, 0, wp - w, 0, hp - h))
        out_img = _scratch("out", (hp, wp, bsz, nh, d), q, geo)
    else:
        out_img = out[t:].view(h, w, bsz, nh, d)
    # out_img[ty0:ty1 tile rows, band tx] as [B, nh, run, a, b, d]
    out_tiles = out_img.view(n_ty, a, n_tx, b, bsz, nh, d)

    # global keys every image query sees: text, then pooled (f > 1). One dense call per band; each tile run's local
    # output is merged with it by log-sum-exp.
    glob = []
    if t:
        glob.append((k[:, :, :t], v[:, :, :t]))
    if f > 1:
        wt = pool_weight(down_weight, f, k)
        glob.append((pool_tokens(k[:, :, t:], grid, f, wt), pool_tokens(v[:, :, t:], grid, f, wt)))
    if glob:
        kg = torch.cat([x for x, _ in glob], dim=2).reshape(1, bh, -1, d)
        vg = torch.cat([y for _, y in glob], dim=2).reshape(1, bh, -1, d)

    # keys/values of one column band, token-major [hp + 2py rows, ww, bh*d], zero outside the grid (masked keys must
    # be finite: 0 * NaN would poison the sum). Rows above/below the grid are zeroed once and never written.
    k_band = _scratch("kb", (hp + 2 * py, ww, bsz, nh, d), q, geo, zero=True)
    v_band = _scratch("vb", (hp + 2 * py, ww, bsz, nh, d), q, geo, zero=True)
    q_band = _scratch("qb", (n_ty, a, b, bsz, nh, d), q, geo)   # this band's queries, tile-major
    q_rows = q_src.view(bsz, nh, n_ty, a, wp, d)
    k_img, v_img = img(k), img(v)
    k_len = hh * ww
    for tx in range(n_tx):
        x0 = tx * b - px                         # grid column of band column 0
        c0, c1 = max(0, x0), min(w, x0 + ww)
        for band, src in ((k_band, k_img), (v_band, v_img)):
            band[py:py + h, c0 - x0:c1 - x0].copy_(src[:, :, :, c0:c1].permute(2, 3, 0, 1, 4))
            if c0 > x0:
                band[:, :c0 - x0].zero_()
            if c1 < x0 + ww:
                band[:, c1 - x0:].zero_()
        q_band.copy_(q_rows[:, :, :, :, tx * b:tx * b + b].view(bsz, nh, n_ty, a, b, d).permute(2, 3, 4, 0, 1, 5))
        if glob:   # this band's queries against the global keys (small outputs, reused from the heap)
            o_glob, lse_glob = _flash(q_band.view(1, n_ty * ab, bh, d).permute(0, 2, 1, 3), kg, vg, 0.0, False,
                                      scale=sc)
            o_glob = o_glob.reshape(bsz, nh, n_ty, a, b, d)
            lse_glob = lse_glob.reshape(bsz, nh, n_ty, a, b)
        for ty0, ty1 in plan.segments:
            run = ty1 - ty0
            qv = q_band[ty0:ty1].view(run, ab, bh, d).permute(2, 0, 1, 3)
            # overlapping windows: tile ty reads band rows [ty*a, ty*a + hh)
            win = dict(size=(bh, run, k_len, d), stride=(d, a * ww * c, c, 1), storage_offset=ty0 * a * ww * c)
            o, lse = _flash(qv, k_band.view(-1).as_strided(**win), v_band.view(-1).as_strided(**win), 0.0, False,
                            attn_mask=plan.run_mask(ty0, ty1, tx, q.dtype), scale=sc)
            o = o.reshape(bsz, nh, run, a, b, d)
            dst = out_tiles[ty0:ty1, :, tx].permute(3, 4, 0, 1, 2, 5)
            if glob:
                wgt = torch.sigmoid(lse_glob[:, :, ty0:ty1] - lse.reshape(bsz, nh, run, a, b))
                torch.lerp(o, o_glob[:, :, ty0:ty1], wgt.unsqueeze(-1).to(o.dtype), out=dst)
            else:
                dst.copy_(o)

    if ragged:
        out[t:].view(h, w, bsz, nh, d).copy_(out_img[:h, :w])
    if t:
        out[:t].copy_(F.scaled_dot_product_attention(q[:, :, :t], k, v, scale=sc).permute(2, 0, 1, 3))
    return out.permute(1, 2, 0, 3)
