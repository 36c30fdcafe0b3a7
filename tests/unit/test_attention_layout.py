"""The token layout (clear_cli/attention/layout.py): grids read from img_ids, the `global` reference rule on every
backend against its dense mask, the measured rules, counting, and a Kontext-style call through the transformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clear_cli
from clear_cli.attention.counting import count_pairs
from clear_cli.attention.layout import (
    attend, from_kernel_order, layout_mask, layout_pairs, read_layout, single, to_kernel_order,
)
from clear_cli.attention.reference import dense_mask
from tiny_flux_inputs import build_transformer, image_ids, inputs


def kontext_ids(target: tuple[int, int], *refs: tuple[int, int]) -> torch.Tensor:
    parts = [image_ids(*target)]
    for i, r in enumerate(refs, start=1):
        ids = image_ids(*r)
        ids[:, 0] = i
        parts.append(ids)
    return torch.cat(parts)


def test_read_layout_splits_images_by_id_and_names_bad_grids():
    lay = read_layout(kontext_ids((4, 6), (3, 5)), text_len=7)
    assert [(g.image_id, g.start, g.h, g.w) for g in lay.grids] == [(0, 0, 4, 6), (1, 24, 3, 5)]
    assert (lay.n_image, lay.n_reference, lay.global_len, lay.seq_len) == (39, 15, 22, 46)
    assert lay.describe() == "7 text + target 4x6 + reference 3x5 (id 1)"
    assert read_layout(image_ids(3, 4), 2) == single(2, (3, 4))
    assert read_layout(kontext_ids((2, 2), (1, 3), (2, 1)), 0).references[1].shape == (2, 1)
    bad = kontext_ids((2, 3), (2, 2))
    bad[-2:, 1:] = bad[-2:, 1:].flip(0)  # the reference's last row reversed
    with pytest.raises(ValueError, match=r"img_ids of image 1 \(tokens 6..9\) are not a row-major 2x2 grid"):
        read_layout(bad, 0)
    split = torch.cat([kontext_ids((2, 2), (1, 2)), image_ids(1, 2) + torch.tensor([0.0, 5, 0])])
    with pytest.raises(ValueError, match="image id 0 appears in two separate runs"):
        read_layout(split, 0)
    with pytest.raises(ValueError, match="img_ids hold 10 positions but the image sequence has 9"):
        read_layout(kontext_ids((2, 3), (2, 2)), 0, n_image=9)


def test_kernel_order_round_trip():
    lay = read_layout(kontext_ids((3, 4), (2, 2)), text_len=3)
    x = torch.arange(lay.seq_len).view(1, 1, -1, 1)
    k = to_kernel_order(x, lay).flatten().tolist()
    assert k == [0, 1, 2] + list(range(15, 19)) + list(range(3, 15))  # text, reference, then the target
    assert torch.equal(from_kernel_order(to_kernel_order(x, lay), lay), x)
    plain = single(3, (3, 4))
    assert to_kernel_order(x[:, :, :15], plain) is not None and torch.equal(to_kernel_order(x[:, :, :15], plain),
                                                                            x[:, :, :15])


# (text_len, target, references, window): ragged / non-square targets, larger and smaller references, text 0,
# window 1 and larger than every image
CASES = [
    (3, (4, 6), [(3, 5)], 2),
    (0, (5, 3), [(6, 7)], 1),
    (2, (3, 3), [(2, 4), (1, 2)], 3),
    (4, (6, 8), [(6, 8)], 20),
    (1, (1, 7), [(2, 2)], 2),
]


def _qkv(n: int, seed: int = 0, heads: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("backend", ["reference", "tiled", "flex", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_global_rule_matches_its_dense_mask_on_every_backend(case, backend):
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    t, target, refs, r = case
    lay = read_layout(kontext_ids(target, *refs), t)
    q, k, v = _qkv(lay.seq_len, seed=len(refs) + r)
    if backend == "flex":
        q, k, v = (x.float() for x in (q, k, v))  # FlexAttention on CPU: fp32
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=layout_mask(lay, r, "global"))
    got = attend(q, k, v, lay, window=r, backend=backend)
    assert (got - want).abs().max() < (1e-5 if q.dtype == torch.float32 else 1e-10)


def test_global_rule_with_pooled_keys_and_single_image_mask():
    lay = read_layout(kontext_ids((4, 4), (2, 3)), 2)
    q, k, v = _qkv(lay.seq_len)
    # f = 2: pooled keys from the target only, seen by target queries (references are global like text)
    got = attend(q, k, v, lay, window=2, down_factor=2, backend="tiled")
    want = attend(q, k, v, lay, window=2, down_factor=2, backend="reference")
    assert (got - want).abs().max() < 1e-10
    assert not torch.allclose(got, attend(q, k, v, lay, window=2, backend="reference"))
    # one image: the layout mask is the plain CLEAR mask
    assert torch.equal(layout_mask(single(3, (4, 5)), 3), dense_mask((4, 5), 3, 3))


def test_measured_rules_differ_where_they_should():
    lay = read_layout(kontext_ids((3, 4), (3, 4)), 2)
    g, s, o = (layout_mask(lay, 2, rule) for rule in ("global", "shared", "own"))
    t, n = 2, 12
    tgt, ref = slice(t, t + n), slice(t + n, t + 2 * n)
    assert g[tgt, ref].all() and g[ref].all()            # references are global
    assert torch.equal(s[tgt, ref], s[tgt, tgt])          # same circle across images (same-size, same origin)
    assert not o[tgt, ref].any() and not o[ref, tgt].any()  # own: no cross-image pairs
    assert torch.equal(g[tgt, tgt], s[tgt, tgt]) and torch.equal(s[tgt, tgt], o[tgt, tgt])
    with pytest.raises(ValueError, match="reference rule 'x' is not one of"):
        layout_mask(lay, 2, "x")


def test_pairs_follow_the_layout():
    lay = read_layout(kontext_ids((6, 8), (4, 5)), 5)
    for r in (1, 3, 30):
        assert layout_pairs(lay, r) == int(layout_mask(lay, r).sum())
    assert layout_pairs(single(5, (6, 8)), 3) == count_pairs((6, 8), 5, 3)


def run(model, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, return_dict=False)[0]


def test_kontext_call_through_the_transformer():
    """Target 4x6 with a 3x4 reference (another size): a whole-target window is full attention under `global`;
    every rule runs; `own` and a small window differ."""
    tr = build_transformer()
    x = inputs(2, (4, 6), 5)
    ids = kontext_ids((4, 6), (3, 4))
    x["hidden_states"] = torch.randn(2, 36, 64, generator=torch.Generator().manual_seed(3))
    x["img_ids"] = ids
    stock = run(tr, x)
    clear_cli.linearize(tr, window=7, backend="reference")
    assert (run(tr, x) - stock).abs().max() < 1e-5
    clear_cli.linearize(tr, window=7, backend="tiled")
    assert (run(tr, x) - stock).abs().max() < 1e-5
    clear_cli.linearize(tr, window=8, backend="reference", reference_rule="shared")  # covers both images
    assert (run(tr, x) - stock).abs().max() < 1e-5
    clear_cli.linearize(tr, window=7, backend="reference", reference_rule="own")
    assert (run(tr, x) - stock).abs().max() > 1e-4
    clear_cli.linearize(tr, window=2, backend="reference")
    small = run(tr, x)
    clear_cli.linearize(tr, window=2, backend="tiled")
    assert (run(tr, x) - small).abs().max() < 1e-5 and (small - stock).abs().max() > 1e-4


def test_bench_counts_follow_the_layout():
    from clear_cli.attention.counting import full_pairs
    from clear_cli.jobs.bench import AttentionBenchConfig, bench_attention

    cfg = AttentionBenchConfig(res=["256"], window=4, text_len=8, timing=False, reference_res="128x192")
    row = bench_attention(cfg)[0]
    lay = read_layout(kontext_ids((16, 16), (12, 8)), 8)
    assert row["reference"] == [12, 8] and row["tokens"] == lay.seq_len
    assert row["flop_ratio"] == full_pairs((16, 16), lay.global_len) / layout_pairs(lay, 4)
    plain = bench_attention(AttentionBenchConfig(res=["256"], window=4, text_len=8, timing=False))[0]
    assert plain["reference"] is None and plain["tokens"] == 8 + 256
