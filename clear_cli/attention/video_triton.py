"""3-D CLEAR attention in Triton, forward and backward, on 3-D tiles of the model's own frame-major layout.

The 2-D kernel (`triton_clear`) lifted to a (T, H, W) grid: a query tile is ta frames x a rows x b contiguous tokens,
addressed from (frame, row, column), so no gather or scatter surrounds the kernel. It walks the global (text) keys as
dense leading blocks, then the key tiles of `video_plan.video_tile_relations`: full tiles with no mask, partial ones
with the ellipsoid A dt^2 + B (dy^2 + dx^2) < C computed from indices (int64 where int32 could overflow), cut at the
borders. Backward as in 2-D: dq per query tile over its key tiles; dk/dv per key tile over the global queries and the
query tiles that see it (the relation with the tilings swapped: the rule is symmetric). Everything that does not
depend on the grid's shape (global-query forward with split-K merge, delta, global keys' dk/dv, global queries' dq)
is the 2-D module's kernels, reused as they are.

dtypes fp16, bf16, fp32 (IEEE dots), head_dim <= 256. Under TRITON_INTERPRET=1 the kernels run on the CPU (the tests
do so in a child process); the interpreter's bf16 dot is wrong (triton-lang/triton#11584): bf16 on a GPU only.
No pooled keys (down_factor) in 3-D. Under torch.compile the forward and backward are opaque custom ops
(`clear_cli::clear_video_triton_fwd` / `_bwd`): no graph break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from clear_cli.attention.geometry import default_scale
from clear_cli.attention.tracing import compiling, outside_graph
from clear_cli.attention.triton_clear import (
    _NEG, LOG2E, _attend, _bwd_dkdv_dense_kernel, _bwd_dq_text_kernel, _block_d, _chunks, _delta_kernel,
    _dense_keys, _dkdv_dense_queries, _dkdv_step, _dq_dense_keys, _dq_step, _fwd_text_kernel, _like, _load_rows,
    _merge_kernel, _prec, _store_rows, _strides, _unit_last, check_supported,
)
from clear_cli.attention.video_geometry import Grid3, ellipsoid_coeffs
from clear_cli.attention.video_plan import VideoTritonConfig, default_video_config, video_tile_relations

__all__ = ["clear_video_triton_attention"]


@triton.jit
def _coords(tile, offs, LY, LX, TA: tl.constexpr, TB: tl.constexpr, TC: tl.constexpr):
    """(frame, row, column) of each slot of tile `tile` (lattice LY x LX tiles per frame-block)."""
    t = (tile // (LY * LX)) * TA + offs // (TB * TC)
    y = ((tile // LX) % LY) * TB + (offs // TC) % TB
    x = (tile % LX) * TC + offs % TC
    return t, y, x


@triton.jit
def _inside(t0, y0, x0, t1, y1, x1, A, B, C, I64: tl.constexpr):
    dt = t0[:, None] - t1[None, :]
    dy = y0[:, None] - y1[None, :]
    dx = x0[:, None] - x1[None, :]
    if I64:
        dt = dt.to(tl.int64)
        dy = dy.to(tl.int64)
        dx = dx.to(tl.int64)
    return A * dt * dt + B * (dy * dy + dx * dx) < C


@triton.jit
def _fwd_video_kernel(Q, K, V, O, LSE, REL, CNT,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                      rel_stride, NH, T, N, GT, GH, GW, A, B, C, qk_scale, QLY, QLX, KLY, KLX,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, QT: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr,
                      KT: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr, PREC: tl.constexpr,
                      HAS_TEXT: tl.constexpr, I64: tl.constexpr):
    BM: tl.constexpr = QT * QA * QB
    BN: tl.constexpr = KT * KA * KB
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    qt, qy, qx = _coords(pid_t, offs_m, QLY, QLX, QT, QA, QB)
    q_ok = (qt < GT) & (qy < GH) & (qx < GW)
    q_rows = T + (qt * GH + qy) * GW + qx
    q = _load_rows(Q + b * sqb + h * sqh, q_rows, sqn, offs_d, q_ok, D, BLOCK_D, True)
    kb = K + b * skb + h * skh
    vb = V + b * svb + h * svh
    m_i = tl.full([BM], _NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    if HAS_TEXT:
        acc, m_i, l_i = _dense_keys(acc, m_i, l_i, q, kb, vb, skn, svn, 0, T, offs_n, offs_d, qk_scale,
                                    D, BLOCK_D, BN, PREC)
    n_full = tl.load(CNT + pid_t * 2)
    n_touch = tl.load(CNT + pid_t * 2 + 1)
    rel = REL + pid_t.to(tl.int64) * rel_stride
    for j in range(n_full):        # key tiles inside every query's ellipsoid, none ragged: no mask
        kt, ky, kx = _coords(tl.load(rel + j), offs_n, KLY, KLX, KT, KA, KB)
        rows = T + (kt * GH + ky) * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, rows < N, D, BLOCK_D, False)
        v = _load_rows(vb, rows, svn, offs_d, rows < N, D, BLOCK_D, False)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, 0, qk_scale, False, PREC)
    for j in range(n_full, n_touch):   # partial tiles: the ellipsoid from indices, cut at the borders
        kt, ky, kx = _coords(tl.load(rel + j), offs_n, KLY, KLX, KT, KA, KB)
        k_ok = (kt < GT) & (ky < GH) & (kx < GW)
        rows = T + (kt * GH + ky) * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, k_ok, D, BLOCK_D, True)
        v = _load_rows(vb, rows, svn, offs_d, k_ok, D, BLOCK_D, True)
        inside = _inside(qt, qy, qx, kt, ky, kx, A, B, C, I64) & k_ok[None, :]
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, inside, qk_scale, True, PREC)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    _store_rows(O + b * sob + h * soh, q_rows, son, offs_d, q_ok, acc / l_safe[:, None], D)
    tl.store(LSE + pid_bh.to(tl.int64) * N + q_rows, m_i + tl.math.log2(l_safe), mask=q_ok)


@triton.jit
def _bwd_dq_video_kernel(Q, K, V, DO, DQ, LSE, DELTA, REL, CNT,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                         rel_stride, NH, T, N, GT, GH, GW, A, B, C, qk_scale, sm_scale, QLY, QLX, KLY, KLX,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, QT: tl.constexpr, QA: tl.constexpr,
                         QB: tl.constexpr, KT: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
                         PREC: tl.constexpr, HAS_TEXT: tl.constexpr, I64: tl.constexpr):
    BM: tl.constexpr = QT * QA * QB
    BN: tl.constexpr = KT * KA * KB
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    qt, qy, qx = _coords(pid_t, offs_m, QLY, QLX, QT, QA, QB)
    q_ok = (qt < GT) & (qy < GH) & (qx < GW)
    q_rows = T + (qt * GH + qy) * GW + qx
    q = _load_rows(Q + b * sqb + h * sqh, q_rows, sqn, offs_d, q_ok, D, BLOCK_D, True)
    do = _load_rows(DO + b * sdb + h * sdh, q_rows, sdn, offs_d, q_ok, D, BLOCK_D, True)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + q_rows, mask=q_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + q_rows, mask=q_ok, other=0.0)
    kb = K + b * skb + h * skh
    vb = V + b * svb + h * svh
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    if HAS_TEXT:
        dq = _dq_dense_keys(dq, q, do, lse, delta, kb, vb, skn, svn, 0, T, offs_n, offs_d, qk_scale,
                            D, BLOCK_D, BN, PREC)
    n_full = tl.load(CNT + pid_t * 2)
    n_touch = tl.load(CNT + pid_t * 2 + 1)
    rel = REL + pid_t.to(tl.int64) * rel_stride
    for j in range(n_full):
        kt, ky, kx = _coords(tl.load(rel + j), offs_n, KLY, KLX, KT, KA, KB)
        rows = T + (kt * GH + ky) * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, rows < N, D, BLOCK_D, False)
        v = _load_rows(vb, rows, svn, offs_d, rows < N, D, BLOCK_D, False)
        dq = _dq_step(dq, q, do, k, v, lse, delta, 0, qk_scale, False, PREC)
    for j in range(n_full, n_touch):
        kt, ky, kx = _coords(tl.load(rel + j), offs_n, KLY, KLX, KT, KA, KB)
        k_ok = (kt < GT) & (ky < GH) & (kx < GW)
        rows = T + (kt * GH + ky) * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, k_ok, D, BLOCK_D, True)
        v = _load_rows(vb, rows, svn, offs_d, k_ok, D, BLOCK_D, True)
        inside = _inside(qt, qy, qx, kt, ky, kx, A, B, C, I64) & k_ok[None, :]
        dq = _dq_step(dq, q, do, k, v, lse, delta, inside, qk_scale, True, PREC)
    _store_rows(DQ + b * sgb + h * sgh, q_rows, sgn, offs_d, q_ok, dq * sm_scale, D)


@triton.jit
def _bwd_dkdv_video_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, REL, CNT,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                           sab, sah, san, scb, sch, scn,
                           rel_stride, NH, T, N, GT, GH, GW, A, B, C, qk_scale, sm_scale, KLY, KLX, QLY, QLX,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, QT: tl.constexpr, QA: tl.constexpr,
                           QB: tl.constexpr, KT: tl.constexpr, KA: tl.constexpr, KB: tl.constexpr,
                           PREC: tl.constexpr, HAS_TEXT: tl.constexpr, I64: tl.constexpr):
    """dk/dv of one video key tile: global queries (all see it) and the query tiles of its relation list."""
    BM: tl.constexpr = QT * QA * QB
    BN: tl.constexpr = KT * KA * KB
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    kt, ky, kx = _coords(pid_t, offs_n, KLY, KLX, KT, KA, KB)
    k_ok = (kt < GT) & (ky < GH) & (kx < GW)
    k_rows = T + (kt * GH + ky) * GW + kx
    k = _load_rows(K + b * skb + h * skh, k_rows, skn, offs_d, k_ok, D, BLOCK_D, True)
    v = _load_rows(V + b * svb + h * svh, k_rows, svn, offs_d, k_ok, D, BLOCK_D, True)
    qb = Q + b * sqb + h * sqh
    dob = DO + b * sdb + h * sdh
    lse_b = LSE + pid_bh.to(tl.int64) * N
    delta_b = DELTA + pid_bh.to(tl.int64) * N
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    if HAS_TEXT:
        dk, dv = _dkdv_dense_queries(dk, dv, k, v, qb, dob, lse_b, delta_b, sqn, sdn, 0, T, offs_m, offs_d,
                                     qk_scale, D, BLOCK_D, BM, PREC)
    n_full = tl.load(CNT + pid_t * 2)
    n_touch = tl.load(CNT + pid_t * 2 + 1)
    rel = REL + pid_t.to(tl.int64) * rel_stride
    for j in range(n_full):        # query tiles not ragged, all pairs inside: no mask
        qt, qy, qx = _coords(tl.load(rel + j), offs_m, QLY, QLX, QT, QA, QB)
        rows = T + (qt * GH + qy) * GW + qx
        q = _load_rows(qb, rows, sqn, offs_d, rows < N, D, BLOCK_D, False)
        do = _load_rows(dob, rows, sdn, offs_d, rows < N, D, BLOCK_D, False)
        lse = tl.load(lse_b + rows)
        delta = tl.load(delta_b + rows)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, 0, qk_scale, False, PREC)
    for j in range(n_full, n_touch):
        qt, qy, qx = _coords(tl.load(rel + j), offs_m, QLY, QLX, QT, QA, QB)
        q_ok = (qt < GT) & (qy < GH) & (qx < GW)
        rows = T + (qt * GH + qy) * GW + qx
        q = _load_rows(qb, rows, sqn, offs_d, q_ok, D, BLOCK_D, True)
        do = _load_rows(dob, rows, sdn, offs_d, q_ok, D, BLOCK_D, True)
        lse = tl.load(lse_b + rows, mask=q_ok, other=0.0)
        delta = tl.load(delta_b + rows, mask=q_ok, other=0.0)
        inside = _inside(kt, ky, kx, qt, qy, qx, A, B, C, I64) & q_ok[None, :]
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, inside, qk_scale, True, PREC)
    _store_rows(DK + b * sab + h * sah, k_rows, san, offs_d, k_ok, dk * sm_scale, D)
    _store_rows(DV + b * scb + h * sch, k_rows, scn, offs_d, k_ok, dv, D)


# ----------------------------------------------------------------------------------------------------- host code

def _rule_args(grid: Grid3, window: int, time_window: int) -> tuple[int, int, int, bool]:
    """(A, B, C, needs int64): int64 when a pair's value A dt^2 + B (dy^2 + dx^2) could pass int32."""
    a, b, c = ellipsoid_coeffs(window, time_window)
    t, h, w = grid
    t, h, w = t + 16, h + 16, w + 16   # pad slots of ragged tiles reach up to one tile (<= 16) past the grid
    return a, b, c, max(a * t * t + b * (h * h + w * w), c) >= 2**31


def _forward(q, k, v, text_len: int, grid: Grid3, window: int, time_window: int, scale: float,
             cfg: VideoTritonConfig):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    bsz, nh, n, d = q.shape
    g, (gt, gh, gw) = text_len, grid
    bh = bsz * nh
    o = _like(q)
    lse = torch.empty(bh, n, device=q.device, dtype=torch.float32)
    c = cfg.fwd
    rel = video_tile_relations(grid, window, time_window, c.q_tile, c.k_tile, q.device)
    bd = _block_d(d)
    qk_scale = scale * LOG2E
    prec = _prec(q.dtype)
    ra, rb, rc, i64 = _rule_args(grid, window, time_window)
    launch = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    _fwd_video_kernel[(rel.n_tiles, bh)](
        q, k, v, o, lse, rel.index, rel.counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        rel.index.stride(0), nh, g, n, gt, gh, gw, ra, rb, rc, qk_scale, rel.tiles[1], rel.tiles[2],
        rel.other[1], rel.other[2], D=d, BLOCK_D=bd, QT=c.q_tile[0], QA=c.q_tile[1], QB=c.q_tile[2],
        KT=c.k_tile[0], KA=c.k_tile[1], KB=c.k_tile[2], PREC=prec, HAS_TEXT=g > 0, I64=i64, **launch)
    if g:   # global queries: every key, split over the keys (the 2-D kernels, layout-free)
        bm, bn = c.block_m, c.block_n
        n_m = -(-g // bm)
        s, per = _chunks(n, bn, n_m * bh, cfg.splits, q.device)
        if s > 1:
            op = torch.empty(s, bh, g, d, device=q.device, dtype=torch.float32)
            lsep = torch.empty(s, bh, g, device=q.device, dtype=torch.float32)
        else:
            op = lsep = lse
        _fwd_text_kernel[(n_m, s, bh)](
            q, k, v, o, lse, op, lsep, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            nh, bh, n, g, per, qk_scale, D=d, BLOCK_D=bd, BM=bm, BN=bn, PREC=prec, SPLIT=s > 1, **launch)
        if s > 1:
            _merge_kernel[(-(-g // 32), bh)](op, lsep, o, lse, *_strides(o), nh, bh, n, g, s, D=d, BLOCK_D=bd,
                                             BM=32, num_warps=4)
    return o, lse


def _backward(do, q, k, v, o, lse, text_len: int, grid: Grid3, window: int, time_window: int, scale: float,
              cfg: VideoTritonConfig):
    q, k, v, o, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(o), _unit_last(do)
    bsz, nh, n, d = q.shape
    g, (gt, gh, gw) = text_len, grid
    bh = bsz * nh
    bd = _block_d(d)
    qk_scale = scale * LOG2E
    prec = _prec(q.dtype)
    ra, rb, rc, i64 = _rule_args(grid, window, time_window)
    c, cd = cfg.bwd, cfg.dkdv_or_bwd
    launch = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    delta = torch.empty(bh, n, device=q.device, dtype=torch.float32)
    _delta_kernel[(-(-n // 64), bh)](o, do, delta, *_strides(o), *_strides(do), nh, n, D=d, BLOCK_D=bd, BM=64,
                                     num_warps=4)
    dq, dk, dv = _like(q), _like(k), _like(v)
    rel = video_tile_relations(grid, window, time_window, c.q_tile, c.k_tile, q.device)
    rel_t = video_tile_relations(grid, window, time_window, cd.k_tile, cd.q_tile, q.device)
    _bwd_dq_video_kernel[(rel.n_tiles, bh)](
        q, k, v, do, dq, lse, delta, rel.index, rel.counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        rel.index.stride(0), nh, g, n, gt, gh, gw, ra, rb, rc, qk_scale, scale, rel.tiles[1], rel.tiles[2],
        rel.other[1], rel.other[2], D=d, BLOCK_D=bd, QT=c.q_tile[0], QA=c.q_tile[1], QB=c.q_tile[2],
        KT=c.k_tile[0], KA=c.k_tile[1], KB=c.k_tile[2], PREC=prec, HAS_TEXT=g > 0, I64=i64, **launch)
    _bwd_dkdv_video_kernel[(rel_t.n_tiles, bh)](
        q, k, v, do, dk, dv, lse, delta, rel_t.index, rel_t.counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        rel_t.index.stride(0), nh, g, n, gt, gh, gw, ra, rb, rc, qk_scale, scale, rel_t.tiles[1], rel_t.tiles[2],
        rel_t.other[1], rel_t.other[2], D=d, BLOCK_D=bd, QT=cd.q_tile[0], QA=cd.q_tile[1], QB=cd.q_tile[2],
        KT=cd.k_tile[0], KA=cd.k_tile[1], KB=cd.k_tile[2], PREC=prec, HAS_TEXT=g > 0, I64=i64,
        num_warps=cd.num_warps, num_stages=cd.num_stages)
    if g:
        # global keys: every query sees them
        bm_k, bn_k = cd.block_m, cd.block_n
        n_n = -(-g // bn_k)
        s, per = _chunks(n, bm_k, n_n * bh, cfg.splits, q.device)
        dkx, dvx = dk[:, :, :g], dv[:, :, :g]
        if s > 1:
            dkp = torch.empty(s, bh, g, d, device=q.device, dtype=torch.float32)
            dvp = torch.empty_like(dkp)
        else:
            dkp = dvp = dkx
        _bwd_dkdv_dense_kernel[(n_n, s, bh)](
            q, k, v, do, dkx, dvx, dkp, dvp, lse, delta,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dkx), *_strides(dvx),
            nh, bh, n, g, 0, n, per, qk_scale, scale, D=d, BLOCK_D=bd, BM=bm_k, BN=bn_k, PREC=prec,
            SPLIT=s > 1, num_warps=cd.num_warps, num_stages=cd.num_stages)
        if s > 1:
            dkx.copy_(dkp.sum(0).view(bsz, nh, g, d))
            dvx.copy_(dvp.sum(0).view(bsz, nh, g, d))
        # global queries' dq: every key
        bm, bn = c.block_m, c.block_n
        n_m = -(-g // bm)
        s, per = _chunks(n, bn, n_m * bh, cfg.splits, q.device)
        dqp = torch.empty(s, bh, g, d, device=q.device, dtype=torch.float32) if s > 1 else dq
        _bwd_dq_text_kernel[(n_m, s, bh)](
            q, k, v, do, dq, dqp, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), nh, bh, n, g, per, qk_scale, scale, D=d, BLOCK_D=bd, BM=bm, BN=bn, PREC=prec,
            SPLIT=s > 1, **launch)
        if s > 1:
            dq[:, :, :g].copy_(dqp.sum(0).view(bsz, nh, g, d))
    return dq, dk, dv


# Opaque custom ops, so that torch.compile traces a call without a graph break (the tile lists are built and the
# kernels launched at run time, outside the graph) and fake tensors give the shapes.
@torch.library.custom_op("clear_cli::clear_video_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, grid_t: int, grid_h: int, grid_w: int,
            window: int, time_window: int, scale: float, cfg: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, text_len, (grid_t, grid_h, grid_w), window, time_window, scale,
                    VideoTritonConfig.from_list(cfg))


@_fwd_op.register_fake
def _(q, k, v, text_len, grid_t, grid_h, grid_w, window, time_window, scale, cfg):
    b, nh, n, _ = q.shape
    return _like(q), q.new_empty(b * nh, n, dtype=torch.float32)


@torch.library.custom_op("clear_cli::clear_video_triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            text_len: int, grid_t: int, grid_h: int, grid_w: int, window: int, time_window: int, scale: float,
            cfg: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(do, q, k, v, o, lse, text_len, (grid_t, grid_h, grid_w), window, time_window, scale,
                     VideoTritonConfig.from_list(cfg))


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, text_len, grid_t, grid_h, grid_w, window, time_window, scale, cfg):
    return _like(q), _like(k), _like(v)


class ClearVideoTritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, text_len, grid, window, time_window, scale, cfg_list):
        o, lse = _fwd_op(q, k, v, text_len, *grid, window, time_window, scale, cfg_list)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (text_len, *grid, window, time_window, scale, cfg_list)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do, q, k, v, o, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


def clear_video_triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int, grid: Grid3,
                                 window: int, time_window: int, scale: float | None = None,
                                 config: VideoTritonConfig | None = None) -> torch.Tensor:
    """3-D CLEAR attention by the Triton kernels; inputs already checked by `clear_video_attention`."""
    check_supported(q)
    grid = (int(grid[0]), int(grid[1]), int(grid[2]))
    sc = default_scale(q.shape[-1], scale)
    if config is not None:
        cfg = config.as_list()
    else:
        choose = _traced_config if compiling() else _config_list
        cfg = choose(grid, int(window), int(time_window), int(q.shape[-1]), q.dtype, q.device)
    return ClearVideoTritonAttention.apply(q, k, v, int(text_len), grid, int(window), int(time_window), sc, cfg)


def _config_list(*args) -> list[int]:
    return default_video_config(*args).as_list()


_traced_config = outside_graph(_config_list)   # under torch.compile: chosen at trace time, a graph constant
