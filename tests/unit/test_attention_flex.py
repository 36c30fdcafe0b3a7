"""FlexAttention backend: block layout built from geometry (checked against the dense rule), forward against the
reference on CPU (eager FlexAttention, small sizes) and a CUDA variant, and the work ratios of the layout."""

from __future__ import annotations

import pytest
import torch

from clear_cli.attention import clear_attention
from clear_cli.attention.counting import image_pairs
from clear_cli.attention.reference import dense_mask

flex = pytest.importorskip("clear_cli.attention.flex")
try:
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("this torch has no FlexAttention", allow_module_level=True)

CASES = [  # (batch, H, W, text_len, window, down_factor, q_tile, kv_tile)
    (1, 5, 7, 3, 2, 1, (2, 4), (2, 2)),
    (2, 6, 8, 0, 1, 2, (4, 4), (2, 4)),
    (1, 8, 8, 5, 20, 4, (8, 8), (8, 8)),
    (2, 9, 13, 7, 3, 1, (4, 8), (4, 4)),
    (1, 20, 24, 3, 3, 1, (4, 4), (2, 8)),
    (1, 12, 12, 1, 4, 2, None, None),
]


def _blocks_to_dense(plan) -> torch.Tensor:
    """Expand the block mask: full blocks -> all True, partial blocks -> mask_mod, others -> False."""
    bm = plan.block_mask
    qb, kb = bm.BLOCK_SIZE
    lq, lk = plan.lq, plan.lk
    out = torch.zeros(lq, lk, dtype=torch.bool)
    qi = torch.arange(lq)[:, None]
    ki = torch.arange(lk)[None, :]
    mm = bm.mask_mod(0, 0, qi, ki)
    for row in range(bm.kv_num_blocks.shape[-1]):
        rs = slice(row * qb, (row + 1) * qb)
        for j in bm.kv_indices[0, 0, row, : int(bm.kv_num_blocks[0, 0, row])].tolist():
            cs = slice(j * kb, (j + 1) * kb)
            out[rs, cs] = mm[rs, cs]
        for j in bm.full_kv_indices[0, 0, row, : int(bm.full_kv_num_blocks[0, 0, row])].tolist():
            out[row * qb:(row + 1) * qb, j * kb:(j + 1) * kb] = True
    return out


def test_cuda_uses_128_token_blocks_that_keep_the_rule():
    """torch 2.11's CUDA kernels need block sizes divisible by 128; the CUDA tiles must still give CLEAR's mask."""
    qt, kt = flex.default_tiles(16, "cuda")
    assert qt[0] * qt[1] == 128 and kt[0] * kt[1] == 128
    assert flex.default_tiles(16, "cpu") != (qt, kt)
    for h, w, t, r, f in ((20, 36, 5, 3, 1), (17, 9, 0, 16, 1), (16, 24, 7, 4, 2)):
        test_block_layout_reproduces_dense_rule((1, h, w, t, r, f, qt, kt))


@pytest.mark.parametrize("case", CASES)
def test_block_layout_reproduces_dense_rule(case):
    _, h, w, t, r, f, qt, kt = case
    dq, dk = flex.default_tiles(r)
    qt, kt = qt or dq, kt or dk
    plan = flex.flex_plan((h, w), t, r, f, qt, kt, torch.device("cpu"))
    got = _blocks_to_dense(plan)
    ref = dense_mask((h, w), t, r, f)                           # [T+HW, T+HW+P], pooled columns last
    hw, kb = h * w, kt[0] * kt[1]
    p = (h // f) * (w // f) if f > 1 else 0
    # which key slots are real, recomputed from the tiling (independent of the plan's mask_mod)
    from clear_cli.attention.geometry import tile_order
    k_slot, _, _ = tile_order((h, w), kt, "cpu")
    nt, npool = -(-t // kb) * kb, -(-p // kb) * kb
    real_k = torch.cat([torch.arange(nt) < t, k_slot < hw, torch.arange(npool) < p])
    assert real_k.numel() == plan.lk
    q_slot, _, _ = tile_order((h, w), qt, "cpu")
    real_q = q_slot < hw
    g = got[real_q]
    assert not g[:, ~real_k].any(), "a padded key slot is visible"
    want = ref[t + q_slot[real_q]][:, plan.kv_index[real_k]]
    assert torch.equal(g[:, real_k], want)


@pytest.mark.parametrize("case", CASES + [(1, 64, 64, 16, 4, 1, None, None)])
def test_block_index_rows_span_every_kv_block(case):
    """torch <= 2.11 builds the backward's Q-block lists from the index rows' width (not seq_lengths):
    a row narrower than the KV block count scattered out of bounds on CUDA at 8K."""
    _, h, w, t, r, f, qt, kt = case
    dq, dk = flex.default_tiles(r)
    qt, kt = qt or dq, kt or dk
    plan = flex.flex_plan((h, w), t, r, f, qt, kt, torch.device("cpu"))
    bm = plan.block_mask
    n_kv = -(-plan.lk // bm.BLOCK_SIZE[1])
    for num, idx in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        assert idx.shape[-1] == n_kv
        used = torch.arange(n_kv)[None, None, None] < num[..., None]
        assert not used.any() or int(idx[used].max()) < n_kv
        # the old transpose: one row of width n_kv per Q block, scattered by the listed indices
        dense = torch.zeros(idx.shape[-2], idx.shape[-1] + 1, dtype=torch.int32)
        dense[torch.arange(idx.shape[-2])[:, None], torch.where(used[0, 0], idx[0, 0], idx.shape[-1])] = 1
        assert int(dense[:, :n_kv].sum()) == int(num.sum())


@pytest.mark.parametrize("case", CASES)
def test_flex_cpu_forward_matches_reference(case):
    b, h, w, t, r, f, qt, kt = case
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, b, 2, t + h * w, 8, generator=g).unbind(0)
    dw = torch.rand(f, f, generator=g) if f > 1 else None
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    out = flex.flex_attention_clear(q, k, v, q_tile=qt, kv_tile=kt, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("res, targets", [(256, (3.0, 2.0, 1.5)), (512, (3.0, 2.0, 1.5))])
def test_block_work_ratio_targets(res, targets):
    for r, target in zip((8, 16, 32), targets):
        ratio = flex.image_block_work((res, res), r) / image_pairs((res, res), r)
        assert 1.0 <= ratio <= target + 0.005, (res, r, ratio)


def test_row_major_layout_matches_published_waste():
    ratios = [flex.row_major_block_work((256, 256), r) / image_pairs((256, 256), r) for r in (8, 16, 32)]
    assert [round(x, 1) for x in ratios] == [20.1, 10.2, 5.3]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flex_cuda_forward_backward(dtype, tol):
    torch.manual_seed(0)
    h, w, t, r, f = 24, 40, 13, 5, 2
    q, k, v = (torch.randn(2, 4, t + h * w, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dw = torch.rand(f, f, device="cuda", dtype=dtype, requires_grad=True)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    out = clear_attention(q, k, v, backend="flex", **kw)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [q, k, v, dw], g), torch.autograd.grad(ref, [q, k, v, dw], g)):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)
