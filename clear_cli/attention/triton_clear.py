"""CLEAR attention in Triton, forward and backward, reading and writing the model's own token layout.

Layout: q/k/v/out `[B, heads, T + H*W, D]`, text first, image row-major; any strides with a unit last stride (the
processor's transposed views of `[B, N, heads, D]` are read in place, by strides; a non-unit last stride is made
contiguous first). The output is allocated like q, so the processor's transpose back is free. Pooled keys/values
(down_factor f > 1) come in as `[B, heads, (H/f)(W/f), D]` tensors computed in torch (`geometry.pool_tokens`), so
autograd gives the pooling weight its gradient; the kernels return the pooled tensors' gradients.

Kernels (one program per tile, or block, and batch-head):
- image queries: a query tile of a x b tokens is a rows of b contiguous tokens, addressed from (row, col), so no
  gather, scatter or concatenation surrounds the kernel. It walks the text keys (dense leading blocks), the key tiles
  of `triton_plan.tile_relations` (full tiles without any mask, then partial tiles with the circle computed from
  indices) and the pooled keys (dense trailing blocks) with an online softmax, and stores the output and the
  log-sum-exp (base 2) of each row. The text and pooled loops are compiled out when a call has none.
- text queries: every text and image key (no pooled ones), split over the keys into chunks (about 8 programs per SM
  in all) whose partial results a small kernel merges by their log-sum-exp, so 512 text queries fill the card.
- backward (flash-attention-2 style): delta = rowsum(dO * O) first; dq per image query tile over its key tiles;
  dk/dv per image key tile over the text queries and the query tiles that see it (the same relation with the
  tilings swapped: it is symmetric); text keys (seen by every query) and pooled keys (seen by every image query)
  per key block over query chunks; the text queries' dq over key chunks; chunk partials summed in fp32.
dtypes: bf16, fp16, fp32 (IEEE dots, no TF32); head_dim <= 256 (FLUX 128, the tiny model 32). No double backward.
Under torch.compile the forward and backward are opaque custom ops (`clear_cli::clear_triton_fwd` / `_bwd`): no graph
break, the tile lists are built at run time outside the graph.

Launch configs (`triton_plan`): `fwd` (query tile, key tile, warps, stages), `bwd` (dq: query tile over key tiles)
and `dkdv` (key tile over query tiles). The candidates and defaults were chosen from what the real compiler makes of
each kernel (registers, spills, shared memory for sm_90a and sm_80, read from the cubin by
tests/unit/_triton_aot.py without a GPU): a dense range is one bounds-masked loop (a separate masked tail block
doubled the spills), 8 warps for 64 x 64 blocks at d = 128, the backward's own tile twice the other one's. No timing
has been made: `sweep` on the card decides.

Interface (what the GPU bench imports, guarded by try/except ImportError):

    from clear_cli.attention.triton_clear import (
        CANDIDATES,          # tuple[TritonConfig, ...]: launch configs to sweep (bf16/fp16, d <= 128, sm80/sm90)
        TritonConfig, TileConfig,
        default_config,      # (window, head_dim, dtype, device) -> the TritonConfig a call uses
        clear_triton_attention,  # (q, k, v, *, text_len, grid, window, down_factor=1, down_weight=None,
                                 #  scale=None, config=None) -> out; differentiable
        sweep,               # (grid, text_len, window, *, down_factor=1, heads=24, head_dim=128, batch=1,
                             #  dtype=torch.bfloat16, backward=True, configs=CANDIDATES, repeats=5,
                             #  apply=True, device="cuda") -> list[dict], fastest first
        available,           # (device) -> (bool, reason)
    )

`sweep` times each config (forward, and forward + backward when `backward`) with CUDA events on random inputs in the
processor's layout, records a config that fails to compile or fit instead of raising, and with `apply` makes the
fastest the default for this (window bucket 8/16/32, head_dim, dtype, card) in this process. Each result: {"index"
(into configs), "name", "config" (its tiles, warps and stages in words), "fwd_ms", "fwd_bwd_ms" (medians; None if not
run), "error" (None, or why it failed)}. Every config compiles its own 8 kernels on first use (tens of seconds).

Triton kernels must be defined under `TRITON_INTERPRET=1` to run on the CPU (the tests do it in a child process):
`INTERPRET` records the mode this module was imported in. The interpreter's bf16 dot is wrong
(triton-lang/triton#11584), so bf16 is only checked on a GPU.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Optional

import torch
import triton
import triton.language as tl

from clear_cli.attention.geometry import default_scale, pool_tokens, pool_weight
from clear_cli.attention.triton_plan import (CANDIDATES, SMALL, TUNED, WIDE, TileConfig, TritonConfig,
                                             config_key, default_config, tile_relations)

__all__ = ["CANDIDATES", "SMALL", "WIDE", "TileConfig", "TritonConfig", "available", "clear_triton_attention",
           "default_config", "sweep", "INTERPRET", "MAX_HEAD_DIM", "DTYPES"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# running-max start: finite, so a row whose first blocks are all masked gets exp2(-inf) = 0, not NaN
_NEG = tl.constexpr(-1.0e30)


# --------------------------------------------------------------------------------------------------- device code

@triton.jit
def _load_rows(base, rows, stride, offs_d, ok, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    if MASK:
        x = tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
    elif BLOCK_D == D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=(offs_d[None, :] < D), other=0.0)
    return x


@triton.jit
def _store_rows(base, rows, stride, offs_d, ok, x, D: tl.constexpr):
    ptrs = base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _attend(acc, m_i, l_i, q, k, v, mask, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # accumulate inside the dot (no second [BM, D] fp32 tile in registers)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _dense_keys(acc, m_i, l_i, q, kb, vb, skn, svn, lo, hi, offs_n, offs_d, qk_scale,
                D: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    """Keys rows [lo, hi) of kb/vb in blocks of BN, bounds-masked (one loop: a separate masked tail block
    measured at many more spilled registers in the compiled kernels)."""
    for start in range(lo, hi, BN):
        rows = start + offs_n
        ok = rows < hi
        k = _load_rows(kb, rows, skn, offs_d, ok, D, BLOCK_D, True)
        v = _load_rows(vb, rows, svn, offs_d, ok, D, BLOCK_D, True)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, ok[None, :], qk_scale, True, PREC)
    return acc, m_i, l_i


@triton.jit
def _fwd_image_kernel(Q, K, V, KP, VP, O, LSE, REL, CNT,
                      sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, spb, sph, spn, sub, suh, sun, sob, soh, son,
                      rel_stride, NH, T, N, GH, GW, P, R2, qk_scale, QTX, KTX,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr,
                      KA: tl.constexpr, KB: tl.constexpr, PREC: tl.constexpr, HAS_TEXT: tl.constexpr,
                      HAS_POOL: tl.constexpr):
    BM: tl.constexpr = QA * QB
    BN: tl.constexpr = KA * KB
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    qy = (pid_t // QTX) * QA + offs_m // QB
    qx = (pid_t % QTX) * QB + offs_m % QB
    q_ok = (qy < GH) & (qx < GW)
    q_rows = T + qy * GW + qx
    q = _load_rows(Q + b * sqb + h * sqh, q_rows, sqn, offs_d, q_ok, D, BLOCK_D, True)
    kb = K + b * skb + h * skh
    vb = V + b * svb + h * svh
    m_i = tl.full([BM], _NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    if HAS_TEXT:   # compiled out without text (and below without pooled keys): fewer live ranges
        acc, m_i, l_i = _dense_keys(acc, m_i, l_i, q, kb, vb, skn, svn, 0, T, offs_n, offs_d, qk_scale,
                                    D, BLOCK_D, BN, PREC)
    n_full = tl.load(CNT + pid_t * 2)
    n_touch = tl.load(CNT + pid_t * 2 + 1)
    rel = REL + pid_t.to(tl.int64) * rel_stride
    for j in range(n_full):        # key tiles wholly inside every query's circle, none ragged: no mask
        kt = tl.load(rel + j)
        ky = (kt // KTX) * KA + offs_n // KB
        kx = (kt % KTX) * KB + offs_n % KB
        rows = T + ky * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, rows < N, D, BLOCK_D, False)
        v = _load_rows(vb, rows, svn, offs_d, rows < N, D, BLOCK_D, False)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, 0, qk_scale, False, PREC)
    for j in range(n_full, n_touch):   # partial tiles: the circle from indices, cut at the border
        kt = tl.load(rel + j)
        ky = (kt // KTX) * KA + offs_n // KB
        kx = (kt % KTX) * KB + offs_n % KB
        k_ok = (ky < GH) & (kx < GW)
        rows = T + ky * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, k_ok, D, BLOCK_D, True)
        v = _load_rows(vb, rows, svn, offs_d, k_ok, D, BLOCK_D, True)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        inside = (dy * dy + dx * dx < R2) & k_ok[None, :]
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, inside, qk_scale, True, PREC)
    if HAS_POOL:
        acc, m_i, l_i = _dense_keys(acc, m_i, l_i, q, KP + b * spb + h * sph, VP + b * sub + h * suh, spn, sun,
                                    0, P, offs_n, offs_d, qk_scale, D, BLOCK_D, BN, PREC)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    _store_rows(O + b * sob + h * soh, q_rows, son, offs_d, q_ok, acc / l_safe[:, None], D)
    tl.store(LSE + pid_bh.to(tl.int64) * N + q_rows, m_i + tl.math.log2(l_safe), mask=q_ok)


@triton.jit
def _fwd_text_kernel(Q, K, V, O, LSE, OP, LSEP,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                     NH, BH, N, NQ, KPS, qk_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     PREC: tl.constexpr, SPLIT: tl.constexpr):
    """Text queries [0, NQ) over key rows [s*KPS, (s+1)*KPS) of the N text + image keys (chunk s = program_id(1))."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    rows_q = pid_m * BM + offs_m
    q_ok = rows_q < NQ
    q = _load_rows(Q + b * sqb + h * sqh, rows_q, sqn, offs_d, q_ok, D, BLOCK_D, True)
    m_i = tl.full([BM], _NEG, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    lo = pid_s * KPS
    hi = tl.minimum(lo + KPS, N)
    acc, m_i, l_i = _dense_keys(acc, m_i, l_i, q, K + b * skb + h * skh, V + b * svb + h * svh, skn, svn,
                                lo, hi, offs_n, offs_d, qk_scale, D, BLOCK_D, BN, PREC)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    if SPLIT:
        idx = (pid_s * BH + pid_bh).to(tl.int64) * NQ + rows_q
        _store_rows(OP, idx, D, offs_d, q_ok, acc / l_safe[:, None], D)
        tl.store(LSEP + idx, m_i + tl.math.log2(l_safe), mask=q_ok)
    else:
        _store_rows(O + b * sob + h * soh, rows_q, son, offs_d, q_ok, acc / l_safe[:, None], D)
        tl.store(LSE + pid_bh.to(tl.int64) * N + rows_q, m_i + tl.math.log2(l_safe), mask=q_ok)


@triton.jit
def _merge_kernel(OP, LSEP, O, LSE, sob, soh, son, NH, BH, N, NQ, S,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr):
    """Merge S chunk results of the text queries by their log-sum-exp."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_m * BM + offs_m
    ok = rows < NQ
    m = tl.full([BM], _NEG, tl.float32)
    for s in range(S):
        m = tl.maximum(m, tl.load(LSEP + (s * BH + pid_bh).to(tl.int64) * NQ + rows, mask=ok, other=_NEG))
    tot = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BLOCK_D], tl.float32)
    for s in range(S):
        idx = (s * BH + pid_bh).to(tl.int64) * NQ + rows
        wgt = tl.math.exp2(tl.load(LSEP + idx, mask=ok, other=_NEG) - m)
        tot += wgt
        acc += wgt[:, None] * _load_rows(OP, idx, D, offs_d, ok, D, BLOCK_D, True)
    _store_rows(O + b * sob + h * soh, rows, son, offs_d, ok, acc / tot[:, None], D)
    tl.store(LSE + pid_bh.to(tl.int64) * N + rows, m + tl.math.log2(tot), mask=ok)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, son, sdb, sdh, sdn, NH, N,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_m * BM + tl.arange(0, BM)
    ok = rows < N
    o = _load_rows(O + b * sob + h * soh, rows, son, offs_d, ok, D, BLOCK_D, True).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdn, offs_d, ok, D, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + rows, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dq_step(dq, q, do, k, v, lse, delta, mask, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        p = tl.where(mask, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)


@triton.jit
def _dq_dense_keys(dq, q, do, lse, delta, kb, vb, skn, svn, lo, hi, offs_n, offs_d, qk_scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr):
    for start in range(lo, hi, BN):
        rows = start + offs_n
        ok = rows < hi
        k = _load_rows(kb, rows, skn, offs_d, ok, D, BLOCK_D, True)
        v = _load_rows(vb, rows, svn, offs_d, ok, D, BLOCK_D, True)
        dq = _dq_step(dq, q, do, k, v, lse, delta, ok[None, :], qk_scale, True, PREC)
    return dq


@triton.jit
def _bwd_dq_image_kernel(Q, K, V, KP, VP, DO, DQ, LSE, DELTA, REL, CNT,
                         sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, spb, sph, spn, sub, suh, sun,
                         sdb, sdh, sdn, sgb, sgh, sgn,
                         rel_stride, NH, T, N, GH, GW, P, R2, qk_scale, sm_scale, QTX, KTX,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr,
                         KA: tl.constexpr, KB: tl.constexpr, PREC: tl.constexpr, HAS_TEXT: tl.constexpr,
                         HAS_POOL: tl.constexpr):
    BM: tl.constexpr = QA * QB
    BN: tl.constexpr = KA * KB
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    qy = (pid_t // QTX) * QA + offs_m // QB
    qx = (pid_t % QTX) * QB + offs_m % QB
    q_ok = (qy < GH) & (qx < GW)
    q_rows = T + qy * GW + qx
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
        kt = tl.load(rel + j)
        ky = (kt // KTX) * KA + offs_n // KB
        kx = (kt % KTX) * KB + offs_n % KB
        rows = T + ky * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, rows < N, D, BLOCK_D, False)
        v = _load_rows(vb, rows, svn, offs_d, rows < N, D, BLOCK_D, False)
        dq = _dq_step(dq, q, do, k, v, lse, delta, 0, qk_scale, False, PREC)
    for j in range(n_full, n_touch):
        kt = tl.load(rel + j)
        ky = (kt // KTX) * KA + offs_n // KB
        kx = (kt % KTX) * KB + offs_n % KB
        k_ok = (ky < GH) & (kx < GW)
        rows = T + ky * GW + kx
        k = _load_rows(kb, rows, skn, offs_d, k_ok, D, BLOCK_D, True)
        v = _load_rows(vb, rows, svn, offs_d, k_ok, D, BLOCK_D, True)
        dy = qy[:, None] - ky[None, :]
        dx = qx[:, None] - kx[None, :]
        inside = (dy * dy + dx * dx < R2) & k_ok[None, :]
        dq = _dq_step(dq, q, do, k, v, lse, delta, inside, qk_scale, True, PREC)
    if HAS_POOL:
        dq = _dq_dense_keys(dq, q, do, lse, delta, KP + b * spb + h * sph, VP + b * sub + h * suh, spn, sun,
                            0, P, offs_n, offs_d, qk_scale, D, BLOCK_D, BN, PREC)
    _store_rows(DQ + b * sgb + h * sgh, q_rows, sgn, offs_d, q_ok, dq * sm_scale, D)


@triton.jit
def _dkdv_step(dk, dv, k, v, q, do, lse, delta, mask, qk_scale, MASKED: tl.constexpr, PREC: tl.constexpr):
    st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale        # [keys, queries]
    pt = tl.math.exp2(st - lse[None, :])
    if MASKED:
        pt = tl.where(mask, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dkdv_dense_queries(dk, dv, k, v, qb, dob, lse_b, delta_b, sqn, sdn, lo, hi, offs_m, offs_d, qk_scale,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """Query rows [lo, hi) in blocks of BM against one key block, bounds-masked."""
    for start in range(lo, hi, BM):
        rows = start + offs_m
        ok = rows < hi
        q = _load_rows(qb, rows, sqn, offs_d, ok, D, BLOCK_D, True)
        do = _load_rows(dob, rows, sdn, offs_d, ok, D, BLOCK_D, True)
        lse = tl.load(lse_b + rows, mask=ok, other=0.0)
        delta = tl.load(delta_b + rows, mask=ok, other=0.0)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, ok[None, :], qk_scale, True, PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_image_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, REL, CNT,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                           sab, sah, san, scb, sch, scn,
                           rel_stride, NH, T, N, GH, GW, R2, qk_scale, sm_scale, KTX, QTX,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr,
                           KA: tl.constexpr, KB: tl.constexpr, PREC: tl.constexpr, HAS_TEXT: tl.constexpr):
    """dk/dv of one image key tile: text queries (all see it) and the query tiles of its relation list."""
    BM: tl.constexpr = QA * QB
    BN: tl.constexpr = KA * KB
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    ky = (pid_t // KTX) * KA + offs_n // KB
    kx = (pid_t % KTX) * KB + offs_n % KB
    k_ok = (ky < GH) & (kx < GW)
    k_rows = T + ky * GW + kx
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
        qt = tl.load(rel + j)
        qy = (qt // QTX) * QA + offs_m // QB
        qx = (qt % QTX) * QB + offs_m % QB
        rows = T + qy * GW + qx
        q = _load_rows(qb, rows, sqn, offs_d, rows < N, D, BLOCK_D, False)
        do = _load_rows(dob, rows, sdn, offs_d, rows < N, D, BLOCK_D, False)
        lse = tl.load(lse_b + rows)
        delta = tl.load(delta_b + rows)
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, 0, qk_scale, False, PREC)
    for j in range(n_full, n_touch):
        qt = tl.load(rel + j)
        qy = (qt // QTX) * QA + offs_m // QB
        qx = (qt % QTX) * QB + offs_m % QB
        q_ok = (qy < GH) & (qx < GW)
        rows = T + qy * GW + qx
        q = _load_rows(qb, rows, sqn, offs_d, q_ok, D, BLOCK_D, True)
        do = _load_rows(dob, rows, sdn, offs_d, q_ok, D, BLOCK_D, True)
        lse = tl.load(lse_b + rows, mask=q_ok, other=0.0)
        delta = tl.load(delta_b + rows, mask=q_ok, other=0.0)
        dy = ky[:, None] - qy[None, :]
        dx = kx[:, None] - qx[None, :]
        inside = (dy * dy + dx * dx < R2) & q_ok[None, :]
        dk, dv = _dkdv_step(dk, dv, k, v, q, do, lse, delta, inside, qk_scale, True, PREC)
    _store_rows(DK + b * sab + h * sah, k_rows, san, offs_d, k_ok, dk * sm_scale, D)
    _store_rows(DV + b * scb + h * sch, k_rows, scn, offs_d, k_ok, dv, D)


@triton.jit
def _bwd_dkdv_dense_kernel(Q, KX, VX, DO, DKX, DVX, DKP, DVP, LSE, DELTA,
                           sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
                           sab, sah, san, scb, sch, scn,
                           NH, BH, N, NK, Q0, Q1, QPS, qk_scale, sm_scale,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                           PREC: tl.constexpr, SPLIT: tl.constexpr):
    """dk/dv of key rows [0, NK) of KX/VX (text keys, or pooled keys) over query rows [Q0, Q1), chunk s of QPS rows."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    k_rows = pid_n * BN + offs_n
    k_ok = k_rows < NK
    k = _load_rows(KX + b * skb + h * skh, k_rows, skn, offs_d, k_ok, D, BLOCK_D, True)
    v = _load_rows(VX + b * svb + h * svh, k_rows, svn, offs_d, k_ok, D, BLOCK_D, True)
    dk = tl.zeros([BN, BLOCK_D], tl.float32)
    dv = tl.zeros([BN, BLOCK_D], tl.float32)
    lo = Q0 + pid_s * QPS
    hi = tl.minimum(lo + QPS, Q1)
    dk, dv = _dkdv_dense_queries(dk, dv, k, v, Q + b * sqb + h * sqh, DO + b * sdb + h * sdh,
                                 LSE + pid_bh.to(tl.int64) * N, DELTA + pid_bh.to(tl.int64) * N, sqn, sdn,
                                 lo, hi, offs_m, offs_d, qk_scale, D, BLOCK_D, BM, PREC)
    if SPLIT:
        idx = (pid_s * BH + pid_bh).to(tl.int64) * NK + k_rows
        _store_rows(DKP, idx, D, offs_d, k_ok, dk * sm_scale, D)
        _store_rows(DVP, idx, D, offs_d, k_ok, dv, D)
    else:
        _store_rows(DKX + b * sab + h * sah, k_rows, san, offs_d, k_ok, dk * sm_scale, D)
        _store_rows(DVX + b * scb + h * sch, k_rows, scn, offs_d, k_ok, dv, D)


@triton.jit
def _bwd_dq_text_kernel(Q, K, V, DO, DQ, DQP, LSE, DELTA,
                        sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sgb, sgh, sgn,
                        NH, BH, N, NQ, KPS, qk_scale, sm_scale,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        PREC: tl.constexpr, SPLIT: tl.constexpr):
    """dq of text queries [0, NQ) over key rows [s*KPS, (s+1)*KPS) of the text + image keys."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // NH).to(tl.int64)
    h = (pid_bh % NH).to(tl.int64)
    offs_m = tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_m * BM + offs_m
    ok = rows < NQ
    q = _load_rows(Q + b * sqb + h * sqh, rows, sqn, offs_d, ok, D, BLOCK_D, True)
    do = _load_rows(DO + b * sdb + h * sdh, rows, sdn, offs_d, ok, D, BLOCK_D, True)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + rows, mask=ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + rows, mask=ok, other=0.0)
    dq = tl.zeros([BM, BLOCK_D], tl.float32)
    lo = pid_s * KPS
    hi = tl.minimum(lo + KPS, N)
    dq = _dq_dense_keys(dq, q, do, lse, delta, K + b * skb + h * skh, V + b * svb + h * svh, skn, svn, lo, hi,
                        offs_n, offs_d, qk_scale, D, BLOCK_D, BN, PREC)
    if SPLIT:
        _store_rows(DQP, (pid_s * BH + pid_bh).to(tl.int64) * NQ + rows, D, offs_d, ok, dq * sm_scale, D)
    else:
        _store_rows(DQ + b * sgb + h * sgh, rows, sgn, offs_d, ok, dq * sm_scale, D)


# ----------------------------------------------------------------------------------------------------- host code

def available(device: torch.device | str) -> tuple[bool, str]:
    """Whether these kernels can run on `device`, and why not."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        if INTERPRET:
            return False, "this process defined the kernels for the Triton interpreter (TRITON_INTERPRET=1)"
        return True, "CUDA"
    if dev.type == "cpu" and INTERPRET:
        return True, "the Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1), not on {dev.type}"


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor laid out like x (kept strides, e.g. the processor's [B, N, heads, D] memory) with a unit last
    stride; the fake (compile-time) implementations use the same rule."""
    if x.stride(-1) == 1:
        return torch.empty_like(x, dtype=dtype)
    return torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact; other dtypes ignore it


def _target_programs(device: torch.device) -> int:
    # several programs per SM: chunks finish at different times, so more (smaller) ones leave a shorter tail; the
    # merge reads and writes only chunks x T x D floats per head
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _chunks(n_rows: int, block: int, base_programs: int, splits: int, device: torch.device) -> tuple[int, int]:
    """(number of chunks, rows per chunk, a block multiple) for a dense row range split across programs."""
    n_blocks = -(-n_rows // block)
    if splits <= 0:
        target = _target_programs(device)
        splits = -(-target // max(base_programs, 1)) if base_programs < target else 1
        splits = min(splits, max(n_blocks // 4, 1), 64)   # >= 4 blocks of work per chunk
    splits = max(1, min(splits, n_blocks))
    per = -(-n_blocks // splits) * block
    return -(-n_rows // per), per


def _forward(q, k, v, kp, vp, text_len: int, grid: tuple[int, int], window: int, scale: float,
             cfg: TritonConfig) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    bsz, nh, n, d = q.shape
    t, (gh, gw) = text_len, grid
    bh = bsz * nh
    o = _like(q)
    lse = torch.empty(bh, n, device=q.device, dtype=torch.float32)
    if kp is None:
        kp, vp, p = k, v, 0
    else:
        kp, vp, p = _unit_last(kp), _unit_last(vp), kp.shape[2]
    c = cfg.fwd
    rel = tile_relations((gh, gw), window, c.q_tile, c.k_tile, q.device)
    bd = _block_d(d)
    qk_scale = scale * LOG2E
    prec = _prec(q.dtype)
    launch = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    _fwd_image_kernel[(rel.n_tiles, bh)](
        q, k, v, kp, vp, o, lse, rel.index, rel.counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(kp), *_strides(vp), *_strides(o),
        rel.index.stride(0), nh, t, n, gh, gw, p, window * window, qk_scale, rel.tiles_x, rel.other_x,
        D=d, BLOCK_D=bd, QA=c.q_tile[0], QB=c.q_tile[1], KA=c.k_tile[0], KB=c.k_tile[1], PREC=prec,
        HAS_TEXT=t > 0, HAS_POOL=p > 0, **launch)
    if t:
        bm, bn = c.block_m, c.block_n
        n_m = -(-t // bm)
        s, per = _chunks(n, bn, n_m * bh, cfg.splits, q.device)
        if s > 1:
            op = torch.empty(s, bh, t, d, device=q.device, dtype=torch.float32)
            lsep = torch.empty(s, bh, t, device=q.device, dtype=torch.float32)
        else:
            op = lsep = lse
        _fwd_text_kernel[(n_m, s, bh)](
            q, k, v, o, lse, op, lsep, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            nh, bh, n, t, per, qk_scale, D=d, BLOCK_D=bd, BM=bm, BN=bn, PREC=prec, SPLIT=s > 1, **launch)
        if s > 1:
            # small row blocks: the merge holds one [rows, D] fp32 accumulator and streams the chunks
            _merge_kernel[(-(-t // 32), bh)](op, lsep, o, lse, *_strides(o), nh, bh, n, t, s, D=d, BLOCK_D=bd,
                                             BM=32, num_warps=4)
    return o, lse


def _backward(do, q, k, v, kp, vp, o, lse, text_len: int, grid: tuple[int, int], window: int, scale: float,
              cfg: TritonConfig):
    q, k, v, o, do = _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(o), _unit_last(do)
    bsz, nh, n, d = q.shape
    t, (gh, gw) = text_len, grid
    bh = bsz * nh
    bd = _block_d(d)
    qk_scale = scale * LOG2E
    prec = _prec(q.dtype)
    c = cfg.bwd
    bm, bn = c.block_m, c.block_n
    launch = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    delta = torch.empty(bh, n, device=q.device, dtype=torch.float32)
    _delta_kernel[(-(-n // 64), bh)](o, do, delta, *_strides(o), *_strides(do), nh, n, D=d, BLOCK_D=bd, BM=64,
                                     num_warps=4)
    dq, dk, dv = _like(q), _like(k), _like(v)
    has_pool = kp is not None
    if has_pool:
        kp, vp = _unit_last(kp), _unit_last(vp)
        p = kp.shape[2]
        dkp, dvp = _like(kp), _like(vp)
    else:
        kp, vp, p = k, v, 0
    cd = cfg.dkdv_or_bwd
    rel = tile_relations((gh, gw), window, c.q_tile, c.k_tile, q.device)
    rel_t = tile_relations((gh, gw), window, cd.k_tile, cd.q_tile, q.device)
    _bwd_dq_image_kernel[(rel.n_tiles, bh)](
        q, k, v, kp, vp, do, dq, lse, delta, rel.index, rel.counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(kp), *_strides(vp), *_strides(do), *_strides(dq),
        rel.index.stride(0), nh, t, n, gh, gw, p, window * window, qk_scale, scale, rel.tiles_x, rel.other_x,
        D=d, BLOCK_D=bd, QA=c.q_tile[0], QB=c.q_tile[1], KA=c.k_tile[0], KB=c.k_tile[1], PREC=prec,
        HAS_TEXT=t > 0, HAS_POOL=p > 0, **launch)
    _bwd_dkdv_image_kernel[(rel_t.n_tiles, bh)](
        q, k, v, do, dk, dv, lse, delta, rel_t.index, rel_t.counts,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        rel_t.index.stride(0), nh, t, n, gh, gw, window * window, qk_scale, scale, rel_t.tiles_x, rel_t.other_x,
        D=d, BLOCK_D=bd, QA=cd.q_tile[0], QB=cd.q_tile[1], KA=cd.k_tile[0], KB=cd.k_tile[1], PREC=prec,
        HAS_TEXT=t > 0, num_warps=cd.num_warps, num_stages=cd.num_stages)

    def dense_dkdv(kx, vx, dkx, dvx, nk, q0, q1):
        bm_k, bn_k = cd.block_m, cd.block_n
        n_n = -(-nk // bn_k)
        s, per = _chunks(q1 - q0, bm_k, n_n * bh, cfg.splits, q.device)
        if s > 1:
            dkp_ = torch.empty(s, bh, nk, d, device=q.device, dtype=torch.float32)
            dvp_ = torch.empty_like(dkp_)
        else:
            dkp_ = dvp_ = dkx
        _bwd_dkdv_dense_kernel[(n_n, s, bh)](
            q, kx, vx, do, dkx, dvx, dkp_, dvp_, lse, delta,
            *_strides(q), *_strides(kx), *_strides(vx), *_strides(do), *_strides(dkx), *_strides(dvx),
            nh, bh, n, nk, q0, q1, per, qk_scale, scale, D=d, BLOCK_D=bd, BM=bm_k, BN=bn_k, PREC=prec,
            SPLIT=s > 1, num_warps=cd.num_warps, num_stages=cd.num_stages)
        if s > 1:
            dkx.copy_(dkp_.sum(0).view(bsz, nh, nk, d))
            dvx.copy_(dvp_.sum(0).view(bsz, nh, nk, d))

    if t:
        dense_dkdv(k, v, dk[:, :, :t], dv[:, :, :t], t, 0, n)       # text keys: every query
        n_m = -(-t // bm)
        s, per = _chunks(n, bn, n_m * bh, cfg.splits, q.device)
        dqp = torch.empty(s, bh, t, d, device=q.device, dtype=torch.float32) if s > 1 else dq
        _bwd_dq_text_kernel[(n_m, s, bh)](
            q, k, v, do, dq, dqp, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *_strides(dq), nh, bh, n, t, per, qk_scale, scale, D=d, BLOCK_D=bd, BM=bm, BN=bn, PREC=prec,
            SPLIT=s > 1, **launch)
        if s > 1:
            dq[:, :, :t].copy_(dqp.sum(0).view(bsz, nh, t, d))
    if has_pool:
        dense_dkdv(kp, vp, dkp, dvp, p, t, n)                       # pooled keys: every image query
        return dq, dk, dv, dkp, dvp
    return dq, dk, dv, None, None


# Opaque custom ops, so that torch.compile traces a call without a graph break (the plan lookups and launches run
# at run time, outside the graph) and fake tensors give the shapes.
@torch.library.custom_op("clear_cli::clear_triton_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor], vp: Optional[torch.Tensor],
            text_len: int, grid_h: int, grid_w: int, window: int, scale: float, cfg: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, kp, vp, text_len, (grid_h, grid_w), window, scale, TritonConfig.from_list(cfg))


@_fwd_op.register_fake
def _(q, k, v, kp, vp, text_len, grid_h, grid_w, window, scale, cfg):
    b, nh, n, _ = q.shape
    return _like(q), q.new_empty(b * nh, n, dtype=torch.float32)


@torch.library.custom_op("clear_cli::clear_triton_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kp: Optional[torch.Tensor],
            vp: Optional[torch.Tensor], o: torch.Tensor, lse: torch.Tensor, text_len: int, grid_h: int, grid_w: int,
            window: int, scale: float, cfg: list[int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dkp, dvp = _backward(do, q, k, v, kp, vp, o, lse, text_len, (grid_h, grid_w), window, scale,
                                     TritonConfig.from_list(cfg))
    if dkp is None:   # custom ops return tensors only: empty ones stand for "no pooled keys"
        dkp, dvp = q.new_empty(0), q.new_empty(0)
    return dq, dk, dv, dkp, dvp


@_bwd_op.register_fake
def _(do, q, k, v, kp, vp, o, lse, text_len, grid_h, grid_w, window, scale, cfg):
    if kp is None:
        return _like(q), _like(k), _like(v), q.new_empty(0), q.new_empty(0)
    return _like(q), _like(k), _like(v), _like(kp), _like(vp)


class ClearTritonAttention(torch.autograd.Function):
    """out = CLEAR attention(q, k, v, pooled kp, vp); gradients for all five (kp/vp: None without pooling)."""

    @staticmethod
    def forward(ctx, q, k, v, kp, vp, text_len, grid, window, scale, cfg_list):
        o, lse = _fwd_op(q, k, v, kp, vp, text_len, grid[0], grid[1], window, scale, cfg_list)
        ctx.save_for_backward(q, k, v, kp, vp, o, lse)
        ctx.args = (text_len, grid[0], grid[1], window, scale, cfg_list)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, kp, vp, o, lse = ctx.saved_tensors
        dq, dk, dv, dkp, dvp = _bwd_op(do, q, k, v, kp, vp, o, lse, *ctx.args)
        if kp is None:
            dkp = dvp = None
        return dq, dk, dv, dkp, dvp, None, None, None, None, None


def check_supported(q: torch.Tensor) -> None:
    """ValueError naming the problem when these kernels cannot run q's device, dtype or head_dim."""
    ok, why = available(q.device)
    if not ok:
        raise ValueError(f"backend 'triton' cannot run here: {why}")
    if q.dtype not in DTYPES:
        raise ValueError(f"backend 'triton' takes fp16, bf16 or fp32, not {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"backend 'triton' takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")


def clear_triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, text_len: int,
                           grid: tuple[int, int], window: int, down_factor: int = 1,
                           down_weight: torch.Tensor | None = None, scale: float | None = None,
                           config: TritonConfig | None = None) -> torch.Tensor:
    """CLEAR attention (DESIGN.md §2) by the Triton kernels; inputs already checked by `clear_attention`."""
    check_supported(q)
    t, f = int(text_len), int(down_factor)
    h, w = int(grid[0]), int(grid[1])
    sc = default_scale(q.shape[-1], scale)
    cfg = config or default_config(window, q.shape[-1], q.dtype, q.device)
    kp = vp = None
    if f > 1:
        wt = pool_weight(down_weight, f, k)
        kp = pool_tokens(k[:, :, t:], (h, w), f, wt)
        vp = pool_tokens(v[:, :, t:], (h, w), f, wt)
    return ClearTritonAttention.apply(q, k, v, kp, vp, t, (h, w), int(window), sc, cfg.as_list())


# ------------------------------------------------------------------------------------------------------ the sweep

def _time_ms(fn, repeats: int) -> float:
    fn()                                   # compile + warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def sweep(grid: tuple[int, int], text_len: int, window: int, *, down_factor: int = 1, heads: int = 24,
          head_dim: int = 128, batch: int = 1, dtype: torch.dtype = torch.bfloat16, backward: bool = True,
          configs: tuple[TritonConfig, ...] | list[TritonConfig] | None = None, repeats: int = 5,
          apply: bool = True, device: torch.device | str = "cuda") -> list[dict]:
    """Time each config on random inputs of this shape on the current CUDA device; fastest first (failures last).

    With `apply`, the fastest (by fwd+bwd when `backward`, else fwd) becomes `default_config` for this window
    bucket, head_dim, dtype and card in this process.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        raise ValueError("sweep times kernels on a CUDA device; none is available here")
    h, w = grid
    n = text_len + h * w
    gen = torch.Generator(device=dev).manual_seed(0)
    # the processor's layout: [B, heads, N, D] views of [B, N, heads, D] memory
    q, k, v = (torch.randn(batch, n, heads, head_dim, device=dev, dtype=dtype, generator=gen).transpose(1, 2)
               for _ in range(3))
    dw = torch.full((down_factor, down_factor), 1.0 / down_factor ** 2, device=dev, dtype=dtype) \
        if down_factor > 1 else None
    do = torch.randn_like(q)
    kw = dict(text_len=text_len, grid=(h, w), window=window, down_factor=down_factor, down_weight=dw)
    results = []
    for i, cfg in enumerate(configs or CANDIDATES):
        row = {"index": i, "name": cfg.name, "config": cfg.describe(), "fwd_ms": None, "fwd_bwd_ms": None,
               "error": None}
        try:
            with torch.no_grad():
                row["fwd_ms"] = _time_ms(lambda: clear_triton_attention(q, k, v, config=cfg, **kw), repeats)
            if backward:
                leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]

                def step():
                    out = clear_triton_attention(*leaves, config=cfg, **kw)
                    torch.autograd.grad(out, leaves, do)

                row["fwd_bwd_ms"] = _time_ms(step, repeats)
        except Exception as e:  # a config that does not compile or fit here: record it, try the next
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            torch.cuda.empty_cache()
        results.append(row)
    metric = "fwd_bwd_ms" if backward else "fwd_ms"
    results.sort(key=lambda r: (r[metric] is None, r[metric] or math.inf))
    if apply and results and results[0][metric] is not None:
        best = (configs or CANDIDATES)[results[0]["index"]]
        TUNED[config_key(window, head_dim, dtype, torch.cuda.get_device_capability(dev))] = best
    return results
