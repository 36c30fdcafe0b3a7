"""FlexAttention backend: every block layout is checked against the dense rule (blocks expanded, index-computed
mask), keeps ROWS_GUARANTEED_SAFE true, and matches the reference on CPU (eager FlexAttention, small sizes) on many
shapes; kernel options divide the sparse blocks; the layout table, its override and the per-shape fallback; a CUDA
variant (marked gpu) runs every layout forward and backward."""

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
# shapes for the named layouts (8x16 / 8x8 / 4x8 tiles): ragged edges both ways, T = 0 and odd, r = 1 and > grid
LAYOUT_SHAPES = [  # (batch, H, W, text_len, window, down_factor)
    (1, 20, 36, 5, 3, 1),
    (2, 17, 9, 0, 16, 1),
    (1, 16, 24, 7, 4, 2),
    (1, 12, 20, 1, 1, 4),
    (2, 8, 16, 130, 40, 1),
    (1, 24, 40, 0, 5, 2),
]
LAYOUT_NAMES = list(flex.LAYOUTS)


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


def _check_layout(h, w, t, r, f, qt, kt, text_queries=False):
    """The expanded blocks give CLEAR's rule on real (query, key) pairs, no padded key is seen by a real query,
    and every row (pads included) sees at least one key, which is what ROWS_GUARANTEED_SAFE promises."""
    plan = flex.flex_plan((h, w), t, r, f, qt, kt, torch.device("cpu"), text_queries)
    got = _blocks_to_dense(plan)
    ref = dense_mask((h, w), t, r, f)                           # [T+HW, T+HW+P], pooled columns last
    hw, kb = h * w, kt[0] * kt[1]
    p = (h // f) * (w // f) if f > 1 else 0
    # which key and query slots are real, recomputed from the tiling (independent of the plan's mask_mod)
    from clear_cli.attention.geometry import tile_order
    k_slot, _, _ = tile_order((h, w), kt, "cpu")
    nt, npool = -(-t // kb) * kb, -(-p // kb) * kb
    real_k = torch.cat([torch.arange(nt) < t, k_slot < hw, torch.arange(npool) < p])
    assert real_k.numel() == plan.lk
    q_slot, _, _ = tile_order((h, w), qt, "cpu")
    qb = qt[0] * qt[1]
    n_text_q = -(-t // qb) * qb if text_queries else 0
    q_rows = torch.cat([torch.where(torch.arange(n_text_q) < t, torch.arange(n_text_q), -1),
                        torch.where(q_slot < hw, t + q_slot, -1)])      # joint row of each query slot, -1 = pad
    assert q_rows.numel() == plan.lq
    real_q = q_rows >= 0
    g = got[real_q]
    assert not g[:, ~real_k].any(), "a padded key is visible"
    want = ref[q_rows[real_q]][:, plan.kv_index[real_k]]
    assert torch.equal(g[:, real_k], want)
    assert got.any(1).all(), "a row sees no key: ROWS_GUARANTEED_SAFE would be false"
    # the plan maps every output row back to its slot
    expect = torch.arange(t + hw) if text_queries else torch.arange(hw) + t
    assert torch.equal(q_rows[plan.q_out], expect)
    return plan, got


@pytest.mark.parametrize("case", CASES)
def test_block_layout_reproduces_dense_rule(case):
    _, h, w, t, r, f, qt, kt = case
    dq, dk = flex.default_tiles(r)
    _check_layout(h, w, t, r, f, qt or dq, kt or dk)


@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
def test_every_layout_reproduces_dense_rule(name, shape):
    _, h, w, t, r, f = shape
    lay = flex.LAYOUTS[name]
    plan, got = _check_layout(h, w, t, r, f, lay.q_tile, lay.kv_tile, lay.text_queries)
    # the work count quotes exactly the listed blocks
    qb, kb = lay.block_size
    bm = plan.block_mask
    listed = int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()) * qb * kb
    total, img = flex.layout_work((h, w), t, r, f, lay)
    text_sdpa = 0 if lay.text_queries else t * (t + h * w)
    assert total == listed + text_sdpa
    assert img >= image_pairs((h, w), r)


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


def _qkv(b, h, w, t, f, seed=1, heads=2, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, heads, t + h * w, d, generator=g).unbind(0)
    dw = torch.rand(f, f, generator=g) if f > 1 else None
    return q, k, v, dict(text_len=t, grid=(h, w), down_factor=f, down_weight=dw)


@pytest.mark.parametrize("case", CASES)
def test_flex_cpu_forward_matches_reference(case):
    b, h, w, t, r, f, qt, kt = case
    q, k, v, kw = _qkv(b, h, w, t, f)
    ref = clear_attention(q, k, v, backend="reference", window=r, **kw)
    out = flex.flex_attention_clear(q, k, v, q_tile=qt, kv_tile=kt, window=r, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
def test_every_layout_forward_matches_reference(name, shape):
    b, h, w, t, r, f = shape
    q, k, v, kw = _qkv(b, h, w, t, f, seed=h * w + t)
    ref = clear_attention(q, k, v, backend="reference", window=r, **kw)
    out = flex.flex_attention_clear(q, k, v, layout=name, window=r, **kw)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


# torch 2.11 kernel defaults for head_dim 128 (torch/_inductor template heuristics): forward (BLOCK_M, BLOCK_N),
# backward (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2), per card
DEFAULTS = {
    ("H100", torch.bfloat16): ((128, 64), (64, 128, 128, 64)),
    ("A100", torch.bfloat16): ((128, 64), (64, 64, 64, 64)),
    ("B200", torch.bfloat16): ((128, 128), (64, 128, 128, 64)),
    ("H100", torch.float32): ((32, 64), (16, 16, 16, 16)),
    ("A100", torch.float32): ((128, 32), (16, 16, 16, 16)),
    ("B200", torch.float32): ((32, 64), (16, 16, 16, 16)),
}


@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("card, dtype", list(DEFAULTS))
def test_kernel_blocks_divide_the_sparse_blocks(name, card, dtype):
    lay = flex.LAYOUTS[name]
    qb, kb = lay.block_size
    opts = lay.kernel_options(dtype)
    assert opts["ROWS_GUARANTEED_SAFE"] is True
    (fm, fn), (m1, n1, m2, n2) = DEFAULTS[(card, dtype)]
    fm, fn = opts.get("fwd_BLOCK_M", fm), opts.get("fwd_BLOCK_N", fn)
    m1, n1 = opts.get("bwd_BLOCK_M1", m1), opts.get("bwd_BLOCK_N1", n1)
    m2, n2 = opts.get("bwd_BLOCK_M2", m2), opts.get("bwd_BLOCK_N2", n2)
    assert qb % fm == 0 and kb % fn == 0, (card, dtype, opts)
    assert qb % m1 == 0 and qb % m2 == 0 and kb % n1 == 0 and kb % n2 == 0, (card, dtype, opts)
    if name == "128x128":   # the layout measured on the H200 runs torch's own choice
        assert set(opts) == {"ROWS_GUARANTEED_SAFE"}


def test_layout_table_and_override(monkeypatch):
    monkeypatch.delenv(flex.LAYOUT_ENV, raising=False)
    assert flex.choose_layout(16, "cuda").block_size == (128, 64)   # the 128-query / 64-key blocks
    assert flex.choose_layout(16, "cuda", backward=True).name in flex.LAYOUTS
    assert flex.choose_layout(8, "cpu").name == "64x64" and flex.choose_layout(32, "cpu").name == "64x32"
    for (_, _), rows in flex.LAYOUT_TABLE.items():
        assert [w for w, _ in rows] == sorted(w for w, _ in rows) and all(n in flex.LAYOUTS for _, n in rows)
    monkeypatch.setenv(flex.LAYOUT_ENV, "128x64t")
    assert flex.choose_layout(3, "cpu").text_queries
    monkeypatch.setenv(flex.LAYOUT_ENV, "96x96")
    with pytest.raises(ValueError, match="128x64"):
        flex.choose_layout(3, "cpu")
    with pytest.raises(ValueError, match="not one of"):
        flex.flex_attention_clear(*_qkv(1, 4, 4, 2, 1)[:3], text_len=2, grid=(4, 4), window=2, layout="huge")


def test_failing_layout_falls_back_for_that_shape_only(monkeypatch):
    """A layout that fails (a kernel that does not compile) falls back to 128x128 for that shape, says so once,
    and is still tried for other shapes."""
    monkeypatch.delenv(flex.LAYOUT_ENV, raising=False)
    monkeypatch.setattr(flex, "_FAILED", set())
    monkeypatch.setattr(flex, "_WARNED", [])
    real, ran = flex._run, []

    def run(q, k, v, lay, *a):
        ran.append((lay.name, q.shape[2]))
        if lay.name != flex.FALLBACK_LAYOUT and q.shape[2] == 2 + 64:
            raise RuntimeError("no valid kernel config")
        return real(q, k, v, lay, *a)

    monkeypatch.setattr(flex, "_run", run)
    q, k, v, kw = _qkv(1, 8, 8, 2, 1)
    with pytest.warns(UserWarning, match="falls back|using 128x128"):
        out = flex.flex_attention_clear(q, k, v, window=3, **kw)
    torch.testing.assert_close(out, clear_attention(q, k, v, backend="reference", window=3, **kw), atol=1e-5, rtol=0)
    flex.flex_attention_clear(q, k, v, window=3, **kw)               # known to fail: straight to the fallback
    q2, k2, v2, kw2 = _qkv(1, 4, 8, 2, 1)
    flex.flex_attention_clear(q2, k2, v2, window=3, **kw2)
    assert ran == [("64x64", 66), ("128x128", 66), ("128x128", 66), ("64x64", 34)]


@pytest.mark.parametrize("name", ["128x64", "128x64t"])
def test_flex_traces_without_graph_break(name):
    """Under torch.compile (fullgraph) the plan is a graph constant and the BlockMask is rebuilt around it."""
    import torch._dynamo as dynamo

    b, h, w, t, r, f = 1, 12, 20, 5, 3, 2
    q, k, v, kw = _qkv(b, h, w, t, f)
    ref = clear_attention(q, k, v, backend="reference", window=r, **kw)
    dynamo.reset()
    fn = torch.compile(lambda q, k, v: flex.flex_attention_clear(q, k, v, layout=name, window=r, **kw),
                       fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(fn(q, k, v), ref, atol=1e-5, rtol=0)
    dynamo.reset()


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
@pytest.mark.parametrize("name", LAYOUT_NAMES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flex_cuda_forward_backward(name, dtype, tol):
    torch.manual_seed(0)
    h, w, t, r, f = 24, 40, 13, 5, 2
    q, k, v = (torch.randn(2, 4, t + h * w, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dw = torch.rand(f, f, device="cuda", dtype=dtype, requires_grad=True)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    out = flex.flex_attention_clear(q, k, v, layout=name, **kw)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, [q, k, v, dw], g), torch.autograd.grad(ref, [q, k, v, dw], g)):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)
