"""3-D CLEAR (space and time): the rule, exact counts, the tiled kernel and the 3-D tile relations against the dense
reference / brute force, on ragged, non-cubic grids, r_t = 0, windows beyond the volume and T = 1 (= the 2-D rule)."""

from __future__ import annotations

import itertools

import pytest
import torch

from clear_cli.attention import clear_attention
from clear_cli.attention.counting import count_pairs
from clear_cli.attention.video_geometry import (
    allowed, count_video_pairs, covers_volume, dense_video_mask, ellipsoid_offsets, ellipsoid_size,
    paper_video_pairs, reference_video_attention, video_image_pairs,
)
from clear_cli.attention.video_kernels import choose_video_backend, clear_video_attention
from clear_cli.attention.video_tiled import tiled_video_attention, video_tile_key_offsets


def _brute_allowed(dt, dy, dx, r, rt):
    if rt == 0:
        return dt == 0 and dy * dy + dx * dx < r * r
    return (dt / rt) ** 2 + (dy / r) ** 2 + (dx / r) ** 2 < 1 - 1e-12


@pytest.mark.parametrize("r, rt", [(1, 0), (3, 0), (3, 1), (3, 2), (4, 3), (2, 5), (7, 4)])
def test_rule_matches_the_real_ellipsoid(r, rt):
    rng = range(-max(r, rt) - 1, max(r, rt) + 2)
    for dt, dy, dx in itertools.product(rng, rng, rng):
        # exact rationals: the float form may round on the boundary, so compare where it is not within 1e-9
        exact = rt and abs((dt / rt) ** 2 + (dy / r) ** 2 + (dx / r) ** 2 - 1) < 1e-9
        if not exact:
            assert bool(allowed(dt, dy, dx, r, rt)) == _brute_allowed(dt, dy, dx, r, rt), (dt, dy, dx)
    assert len(ellipsoid_offsets(r, rt)) == ellipsoid_size(r, rt)


def test_boundary_is_strict():
    assert not allowed(0, 3, 0, 3, 2) and allowed(0, 2, 2, 3, 2) and not allowed(2, 0, 0, 3, 2)
    assert allowed(1, 0, 0, 3, 2) and not allowed(1, 0, 0, 3, 0)
    assert ellipsoid_size(8, 0) == 193 and ellipsoid_size(16, 0) == 793 and ellipsoid_size(8, 1) == 193


GRIDS = [((5, 7, 9), 3, 2), ((3, 5, 6), 2, 0), ((4, 6, 5), 10, 10), ((1, 9, 13), 4, 3), ((7, 3, 10), 2, 3),
         ((2, 1, 1), 1, 0), ((6, 4, 4), 1, 6), ((3, 8, 2), 5, 1)]


@pytest.mark.parametrize("grid, r, rt", GRIDS)
@pytest.mark.parametrize("g", [0, 3])
def test_exact_counts_match_the_dense_mask(grid, r, rt, g):
    mask = dense_video_mask(grid, g, r, rt)
    assert count_video_pairs(grid, g, r, rt) == int(mask.sum())
    assert video_image_pairs(grid, r, rt) == int(mask[g:, g:].sum())
    assert paper_video_pairs(grid, g, r, rt) >= count_video_pairs(grid, g, r, rt)


@pytest.mark.parametrize("h, w, r, g", [(9, 13, 4, 0), (5, 7, 1, 3), (8, 8, 20, 2)])
@pytest.mark.parametrize("rt", [0, 1, 3])
def test_one_frame_is_the_2d_rule(h, w, r, g, rt):
    assert count_video_pairs((1, h, w), g, r, rt) == count_pairs((h, w), g, r)
    n = g + h * w
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64) for _ in range(3))
    want = clear_attention(q, k, v, text_len=g, grid=(h, w), window=r, backend="reference")
    for backend in ("reference", "tiled", "auto"):
        got = clear_video_attention(q, k, v, text_len=g, grid=(1, h, w), window=r, time_window=rt, backend=backend)
        assert torch.allclose(got, want, atol=1e-12), backend


def test_same_frame_only_is_per_frame_2d():
    t, h, w, r = 3, 6, 7, 3
    q, k, v = (torch.randn(1, 2, t * h * w, 16, dtype=torch.float64) for _ in range(3))
    got = clear_video_attention(q, k, v, grid=(t, h, w), window=r, time_window=0, backend="tiled")
    for f in range(t):
        s = slice(f * h * w, (f + 1) * h * w)
        want = clear_attention(q[:, :, s], k[:, :, s], v[:, :, s], text_len=0, grid=(h, w), window=r,
                               backend="reference")
        assert torch.allclose(got[:, :, s], want, atol=1e-12)


TILES = [None, (1, 4, 4), (2, 4, 8), (4, 4, 4), (4, 8, 16), (3, 2, 5)]


@pytest.mark.parametrize("grid, r, rt", GRIDS)
@pytest.mark.parametrize("g, tile", [(0, None), (3, (2, 4, 8)), (0, (4, 4, 4)), (1, (3, 2, 5)), (0, (4, 8, 16))])
def test_tiled_matches_reference_forward_backward(grid, r, rt, g, tile):
    n = g + grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(hash((grid, r, rt, g)) % 2**31)
    q, k, v, do = (torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    kw = dict(text_len=g, grid=grid, window=r, time_window=rt)
    ref = reference_video_attention(*leaves, **kw)
    ref_g = torch.autograd.grad(ref, leaves, do)
    out = tiled_video_attention(*leaves, tile=tile, **kw)
    got_g = torch.autograd.grad(out, leaves, do)
    assert torch.allclose(out, ref, atol=1e-10)
    for a, b in zip(got_g, ref_g):
        assert torch.allclose(a, b, atol=1e-10)


def test_tiled_fp32_processor_layout():
    grid, g = (4, 6, 10), 0
    x = torch.randn(1, 240, 3, 32)       # [B, N, heads, D] memory, handed over as transposed views
    q = k = v = x.transpose(1, 2)
    kw = dict(text_len=g, grid=grid, window=3, time_window=2)
    assert torch.allclose(tiled_video_attention(q, k, v, **kw), reference_video_attention(q, k, v, **kw), atol=1e-5)


@pytest.mark.parametrize("tile, r, rt", [((1, 4, 4), 3, 0), ((2, 4, 8), 3, 2), ((4, 4, 4), 5, 1), ((3, 2, 5), 2, 4)])
def test_tile_key_offsets_are_the_union_of_ellipsoids(tile, r, rt):
    ta, a, b = tile
    want = set()
    for qt, qy, qx in itertools.product(range(ta), range(a), range(b)):
        want |= {(qt + dt, qy + dy, qx + dx) for dt, dy, dx in ellipsoid_offsets(r, rt)}
    assert set(video_tile_key_offsets(tile, r, rt)) == want
    grid = (3, 5, 6)   # with the grid: the same union, less whatever no key of the volume can reach
    inside = {o for o in want if all(-(g - 1) <= o[i] <= tile[i] - 1 + g - 1 for i, g in enumerate(grid))}
    assert set(video_tile_key_offsets(tile, r, rt, grid)) == inside


def test_huge_window_costs_no_more_than_the_volume():
    grid = (3, 4, 5)
    assert len(video_tile_key_offsets((1, 4, 4), 10_000, 5_000, grid)) == (1 + 4) * (4 + 6) * (4 + 8)
    q, k, v = (torch.randn(1, 1, 60, 8, dtype=torch.float64) for _ in range(3))
    got = tiled_video_attention(q, k, v, text_len=0, grid=grid, window=10_000, time_window=5_000, tile=(1, 4, 4))
    assert torch.allclose(got, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-12)


def test_auto_whole_volume_shortcut_is_exact():
    grid = (3, 4, 5)
    q, k, v = (torch.randn(1, 1, 60, 8, dtype=torch.float64) for _ in range(3))
    assert covers_volume(grid, 7, 3) and not covers_volume(grid, 7, 2) and not covers_volume(grid, 5, 30)
    assert choose_video_backend(q, grid, 7, 3) == "sdpa" and choose_video_backend(q, grid, 5, 30) == "tiled"
    for r, rt in ((7, 3), (5, 30)):
        got = clear_video_attention(q, k, v, grid=grid, window=r, time_window=rt)
        want = reference_video_attention(q, k, v, text_len=0, grid=grid, window=r, time_window=rt)
        assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("kw, match", [
    (dict(grid=(2, 3), window=2, time_window=1), r"\(T, H, W\)"),
    (dict(grid=(2, 3, 4), window=0, time_window=1), "window must be"),
    (dict(grid=(2, 3, 4), window=2, time_window=-1), "time_window must be"),
    (dict(grid=(2, 3, 5), window=2, time_window=1), "sequence length 24"),
    (dict(grid=(2, 3, 4), window=2, time_window=1, backend="natten"), "not one of"),
])
def test_bad_input_names_the_problem(kw, match):
    q = torch.randn(1, 1, 24, 8)
    with pytest.raises(ValueError, match=match):
        clear_video_attention(q, q, q, **kw)


def test_triton_backend_refused_on_cpu_without_interpreter():
    q = torch.randn(1, 1, 24, 8)
    with pytest.raises(ValueError, match="triton"):
        clear_video_attention(q, q, q, grid=(2, 3, 4), window=2, time_window=1, backend="triton")


# ------------------------------------------------------------------------------------- 3-D tile relations (torch)

def _brute_relations(grid, r, rt, tile, other):
    def boxes(tl_):
        lat = [-(-g // s) for g, s in zip(grid, tl_)]
        out = []
        for i, j, k in itertools.product(*map(range, lat)):
            o = (i * tl_[0], j * tl_[1], k * tl_[2])
            pts = [(o[0] + a, o[1] + b, o[2] + c) for a, b, c in itertools.product(*map(range, tl_))]
            real = [p for p in pts if all(p[x] < grid[x] for x in range(3))]
            out.append((real, len(real) < len(pts)))
        return out
    mine, theirs = boxes(tile), boxes(other)
    res = []
    for pts, _ in mine:
        rel = {}
        for j, (opts, ragged) in enumerate(theirs):
            ins = [bool(allowed(p[0] - q[0], p[1] - q[1], p[2] - q[2], r, rt)) for p in pts for q in opts]
            if any(ins):
                rel[j] = "full" if all(ins) and not ragged else "partial"
        res.append(rel)
    return res


@pytest.mark.parametrize("grid, r, rt, tile, other", [
    ((5, 6, 7), 3, 2, (2, 2, 4), (1, 4, 4)), ((3, 5, 9), 3, 0, (1, 4, 4), (2, 2, 4)),
    ((3, 4, 5), 30, 9, (2, 2, 4), (4, 2, 2)), ((1, 9, 13), 4, 3, (1, 4, 4), (1, 4, 8)),
    ((6, 5, 5), 2, 4, (4, 2, 2), (2, 4, 4)), ((4, 8, 8), 1, 1, (2, 4, 4), (2, 4, 4)),
])
def test_video_tile_relations_match_brute_force(grid, r, rt, tile, other):
    from clear_cli.attention.video_plan import video_tile_relations

    rel = video_tile_relations(grid, r, rt, tile, other)
    want = _brute_relations(grid, r, rt, tile, other)
    assert rel.n_tiles == len(want)
    for i, expect in enumerate(want):
        n_full, n_touch = rel.counts[i].tolist()
        idx = rel.index[i, :n_touch].tolist()
        got = {j: ("full" if pos < n_full else "partial") for pos, j in enumerate(idx)}
        assert len(idx) == len(set(idx)) and got == expect, f"tile {i}"


def test_video_kernel_work_bounds_exact_and_config_round_trip():
    from clear_cli.attention.video_plan import CANDIDATES, SMALL, VideoTritonConfig, default_video_config, \
        video_kernel_work

    grid = (21, 30, 52)
    exact = video_image_pairs(grid, 8, 3)
    for cfg in CANDIDATES:
        total, img = video_kernel_work(grid, 0, 8, 3, cfg)
        assert img >= exact and img % (cfg.fwd.block_m * cfg.fwd.block_n) == 0 and total == img
        back = VideoTritonConfig.from_list(cfg.as_list())
        assert (back.fwd, back.bwd, back.dkdv, back.splits) == (cfg.fwd, cfg.bwd, cfg.dkdv_or_bwd, cfg.splits)
    best = default_video_config(grid, 8, 3, 128, torch.bfloat16)
    assert best in CANDIDATES
    assert video_kernel_work(grid, 0, 8, 3, best)[1] == min(video_kernel_work(grid, 0, 8, 3, c)[1] for c in CANDIDATES)
    assert default_video_config(grid, 8, 3, 128, torch.float32) in SMALL
    # same frame only: single-frame tiles waste nothing in time
    assert default_video_config(grid, 8, 0, 128, torch.bfloat16).fwd.q_tile[0] == 1


def test_tiled_under_torch_compile_fullgraph():
    """Plans and masks are graph constants (built at trace time): no graph break, the reference's values and grads."""
    grid, kw = (3, 4, 5), dict(text_len=2, window=2, time_window=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 62, 8, generator=g) for _ in range(3))
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = reference_video_attention(*ref_leaves, grid=grid, **kw)
    ref_g = torch.autograd.grad(ref.square().sum(), ref_leaves)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: clear_video_attention(q, k, v, grid=grid, backend="tiled", **kw),
                       fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = fn(*leaves)
    got_g = torch.autograd.grad(out.square().sum(), leaves)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(got_g, ref_g):
        assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("grid, r, rt", GRIDS)
@pytest.mark.parametrize("g, tiles", [(0, (None, None)), (3, ((2, 8, 8), (2, 4, 8))), (1, ((2, 4, 16), (1, 4, 16)))])
def test_flex_block_mask_forward_matches_reference(grid, r, rt, g, tiles):
    """FlexAttention with the 3-D block mask (eager; the CPU runs it forward only)."""
    from clear_cli.attention.video_flex import flex_video_attention

    n = g + grid[0] * grid[1] * grid[2]
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    kw = dict(text_len=g, grid=grid, window=r, time_window=rt)
    got = flex_video_attention(q, k, v, q_tile=tiles[0], kv_tile=tiles[1], **kw)
    assert torch.allclose(got, reference_video_attention(q, k, v, **kw), atol=1e-5)


def test_auto_falls_back_for_that_shape_only(monkeypatch):
    from clear_cli.attention import video_kernels as vk

    def broken(*a, **k):
        raise RuntimeError("does not compile")

    monkeypatch.setitem(vk.AUTO_ORDER, "cpu", ("triton", "tiled"))
    monkeypatch.setattr(vk, "_usable", lambda name, q: (True, ""))
    monkeypatch.setitem(vk._RUN, "triton", broken)
    monkeypatch.setattr(vk, "_BROKEN", set())
    q, k, v = (torch.randn(1, 1, 60, 8, dtype=torch.float64) for _ in range(3))
    kw = dict(grid=(3, 4, 5), window=2, time_window=1)
    assert vk.choose_video_backend(q, **kw) == "triton"
    with pytest.warns(UserWarning, match="triton kernel failed.*using tiled"):
        out = clear_video_attention(q, k, v, **kw)
    assert torch.allclose(out, reference_video_attention(q, k, v, text_len=0, **kw), atol=1e-12)
    assert vk.choose_video_backend(q, **kw) == "tiled"                           # remembered for this shape
    assert vk.choose_video_backend(q, grid=(3, 4, 5), window=3, time_window=1) == "triton"   # not for others
