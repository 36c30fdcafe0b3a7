"""Patch parallelism without processes: bands, halo plans, byte counting, and P simulated ranks (threads) running the
real band attention and the real transformer against the single-process result."""

from __future__ import annotations

import pytest
import torch

from clear_cli.attention import clear_attention
from clear_cli.errors import UsageError
from clear_cli.parallel import (
    BandGroup, DryComm, ThreadGroup, band_attention, band_context, band_processors, halo_plan, key_rows, split_bands,
)


# ------------------------------------------------------------------------------------------- bands and halos

def test_split_bands_even_and_in_units_of_f():
    assert split_bands(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert split_bands(16, 3, down_factor=4) == [(0, 8), (8, 12), (12, 16)]
    assert split_bands(5, 1) == [(0, 5)]
    for h, p, f in [(64, 8, 1), (64, 5, 4), (30, 7, 2)]:
        bands = split_bands(h, p, f)
        assert bands[0][0] == 0 and bands[-1][1] == h
        assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
        assert all((e - s) % f == 0 and e > s for s, e in bands)
        assert max(e - s for s, e in bands) - min(e - s for s, e in bands) <= f


def test_split_bands_refuses_more_processes_than_rows():
    with pytest.raises(UsageError, match="3 processes but the image has only 2 token rows") as e:
        split_bands(2, 3)
    assert "at most 2 processes" in e.value.one_line() and "\n" not in e.value.one_line()
    with pytest.raises(UsageError, match="only 2 bands of 4 rows"):
        split_bands(8, 3, down_factor=4)


def test_halo_plan_thick_and_thin_bands():
    # reach 1 < band height: each band gets one row from each neighbour
    plan = halo_plan(split_bands(8, 2), window=2)
    assert [(t.src, t.dst, t.start, t.stop) for t in plan] == [(1, 0, 4, 5), (0, 1, 3, 4)]
    # reach 5 > band height 2: halos span several neighbours
    bands = split_bands(8, 4)
    plan = halo_plan(bands, window=6)
    into_0 = [(t.src, t.start, t.stop) for t in plan if t.dst == 0]
    assert into_0 == [(1, 2, 4), (2, 4, 6), (3, 6, 7)]  # band rows 0..1 reach 5 rows further: rows 2..6, 3 owners
    for dst, band in enumerate(bands):
        lo, hi = key_rows(band, 8, 6)
        got = sorted([(t.start, t.stop) for t in plan if t.dst == dst] + [band])
        assert got[0][0] == lo and got[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))  # contiguous cover, no overlap


# ------------------------------------------------------------------------------------------- band attention

def _band_run(grid, text_len, window, down_factor, procs, seed=0):
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, text_len + h * w, 8, generator=g) for _ in range(3))
    dw = torch.rand(down_factor, down_factor, generator=g) if down_factor > 1 else None
    ref = clear_attention(q, k, v, text_len=text_len, grid=grid, window=window, down_factor=down_factor,
                          down_weight=dw, backend="reference")

    def work(comm):
        group = BandGroup.split(comm, grid, down_factor)

        def local(x):
            return torch.cat([x[:, :, :text_len], group.rows(x[:, :, text_len:], dim=2)], dim=2)

        out = band_attention(local(q), local(k), local(v), text_len=text_len, group=group, window=window,
                             down_weight=dw)
        return out, group, dict(comm.stats.sent), dict(comm.stats.equivalent)

    return ref, ThreadGroup(procs).run(work)


@pytest.mark.parametrize("grid,text_len,window,f,procs", [
    ((8, 8), 4, 2, 1, 2),     # bands of 4 rows, reach 1: thicker than the reach
    ((8, 8), 4, 6, 1, 3),     # bands of 3/3/2 rows, reach 5: halos span two neighbours
    ((7, 5), 3, 4, 1, 4),     # uneven bands of 2/2/2/1 rows, non-square grid
    ((8, 6), 0, 3, 1, 3),     # no text tokens
    ((8, 8), 4, 3, 2, 3),     # pooled tokens, f = 2: bands 4/2/2
    ((16, 8), 3, 9, 4, 3),    # pooled tokens, f = 4, bands 8/4/4 thinner than the reach 8
])
def test_band_attention_matches_single_process(grid, text_len, window, f, procs):
    ref, results = _band_run(grid, text_len, window, f, procs)
    image = torch.cat([out[:, :, text_len:] for out, *_ in results], dim=2)
    torch.testing.assert_close(image, ref[:, :, text_len:], atol=1e-5, rtol=1e-5)
    for out, *_ in results:  # text queries: the exact merge, identical on every process
        torch.testing.assert_close(out[:, :, :text_len], ref[:, :, :text_len], atol=1e-5, rtol=1e-5)
        assert torch.equal(out[:, :, :text_len], results[0][0][:, :, :text_len])


def test_band_attention_counts_the_bytes_it_sends():
    # 8x8 grid, 2 processes, r = 3 (reach 2 rows), 2 heads x 8 fp32, 4 text tokens
    _, results = _band_run((8, 8), 4, 3, 1, 2)
    row_kv = 2 * 2 * 8 * 8 * 4  # K and V, 2 heads, 8 tokens per row, head_dim 8, fp32
    for _, _, sent, equivalent in results:
        assert sent["halo"] == 2 * row_kv  # two rows to the one neighbour
        # text merge: all-reduce of the max [1,2,4] and of the weighted sums + weights [1,2,4,9], fp32, ring 2(P-1)/P
        assert sent["text"] == (2 * 4 + 2 * 4 * 9) * 4
        assert equivalent["kv_all_gather"] == 4 * row_kv  # the other band's 4 rows of K and V
        assert "pooled" not in sent


def test_dry_comm_counts_what_the_real_exchange_sends():
    """The figures' counting-only run on meta tensors books the same bytes as a real (threaded) run."""
    from clear_cli.parallel.traffic import layer_bytes

    _, results = _band_run((16, 8), 3, 5, 2, 3)
    dry = layer_bytes((16, 8), 3, 5, down_factor=2, text_len=3, heads=2, head_dim=8, dtype=torch.float32)
    for (_, _, sent, equivalent), d in zip(results, dry):
        assert {k: d.get(k, 0) for k in sent} == sent
        assert d["kv_all_gather"] == equivalent["kv_all_gather"]


def test_flux_8k_halo_bytes():
    """FLUX at 8K, 8 processes, r = 8: an interior band sends 7 rows each way of bf16 K and V (3072 wide)."""
    from clear_cli.parallel.traffic import layer_bytes

    ranks = layer_bytes((512, 512), 8, 8)
    assert ranks[3]["halo"] == 2 * 7 * 512 * 3072 * 2 * 2
    assert ranks[0]["halo"] == 7 * 512 * 3072 * 2 * 2
    assert ranks[3]["kv_all_gather"] == 7 * 64 * 512 * 3072 * 2 * 2


def test_dry_comm_moves_nothing():
    c = DryComm(1, 4)
    t = torch.ones(3)
    assert c.all_reduce_(t, "sum", "x") is t and torch.equal(t, torch.ones(3))
    assert c.stats.sent["x"] == 2 * 3 * 12 // 4


# ------------------------------------------------------------------------------------------- the transformer

@pytest.mark.parametrize("size,window,f,procs,prop", [
    (8, 2, 1, 2, False),
    (8, 6, 1, 3, True),     # thin bands, proportional attention + NTK RoPE (global N, true positions)
    (16, 9, 4, 3, False),   # pooled tokens, bands 8/4/4 thinner than the reach
])
def test_transformer_on_bands_matches_whole_image(tiny_random_pipe, size, window, f, procs, prop):
    from clear_cli import linearize, unlinearize

    pipe = tiny_random_pipe
    tr = pipe.transformer
    linearize(tr, window=window, down_factor=f, proportional_attention=prop, train_seq_len=100,
              ntk_factor=10.0 if prop else None)
    try:
        g = torch.Generator().manual_seed(1)
        t, c = 32, tr.config.in_channels
        x = torch.randn(1, size * size, c, generator=g)
        ids = pipe._prepare_latent_image_ids(1, size, size, "cpu", torch.float32)
        kw = dict(timestep=torch.full([1], 0.5), pooled_projections=torch.randn(1, tr.config.pooled_projection_dim,
                  generator=g), encoder_hidden_states=torch.randn(1, t, tr.config.joint_attention_dim, generator=g),
                  txt_ids=torch.zeros(t, 3), return_dict=False,
                  guidance=torch.full([1], 3.5) if tr.config.guidance_embeds else None)
        with torch.no_grad():
            ref = tr(hidden_states=x, img_ids=ids, **kw)[0]

            def work(comm):
                group = BandGroup.split(comm, (size, size), f)
                with band_context(group):
                    out = tr(hidden_states=group.rows(x), img_ids=group.rows(ids, 0), **kw)[0]
                return group.gather_rows(out)

            with band_processors(tr) as n:
                assert n == 4  # 2 double + 2 single blocks
                outs = ThreadGroup(procs).run(work)
            # outside a band context the swapped processors are plain CLEAR processors again
            assert type(tr.transformer_blocks[0].attn.processor).__name__ == "ClearFluxAttnProcessor"
        for out in outs:
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    finally:
        unlinearize(tr)


# ------------------------------------------------------------------------------------------- the command line

def test_parallel_without_a_launch_is_one_line(cli, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    code, out, err = cli("gen", "a red circle", "--model", "tiny-random", "--parallel", "patch", "--out", "/nonexistent")
    assert code == 2
    assert err.count("\n") == 1 and "--parallel patch needs a distributed launch" in err and "torchrun" in err
    code, _, err = cli("gen", "x", "--model", "tiny-random", "--parallel", "pipeline")
    assert code == 2 and "--parallel 'pipeline' is not one of none, patch, data" in err
