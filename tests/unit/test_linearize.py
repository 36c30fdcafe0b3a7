"""linearize / unlinearize on the tiny FLUX: exactness against stock diffusers, geometry from each call, settings."""

from __future__ import annotations

import math

import pytest
import torch

import clear_cli
from clear_cli.attention.context import FLUX_TRAIN_SEQ_LEN, grid_from_img_ids, proportional_scale
from clear_cli.attention.linearize import clear_processors, is_linearized
from clear_cli.attention.processors import ClearFluxAttnProcessor
from tiny_flux_inputs import build_transformer, image_ids, inputs

TOL = 1e-5


def run(model, x: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, **extra).sample


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


@pytest.mark.parametrize("grid,batch,text_len", [((4, 6), 2, 5), ((7, 3), 1, 1), ((5, 5), 3, 0)])
def test_whole_grid_window_matches_stock(grid, batch, text_len):
    tr = build_transformer()
    x = inputs(batch, grid, text_len)
    stock = run(tr, x)
    clear_cli.linearize(tr, window=grid[0] + grid[1] + 1, backend="reference")  # covers both grids
    assert maxdiff(run(tr, x), stock) < TOL
    # One model, any resolution / aspect ratio / batch / prompt length: a second shape right after.
    x2 = inputs(1, (grid[1], grid[0] + 1), text_len + 2, seed=3)
    lin2 = run(tr, x2)
    clear_cli.unlinearize(tr)
    assert maxdiff(lin2, run(tr, x2)) < TOL


def test_small_window_differs_and_down_factor_adds_pooled_keys():
    tr = build_transformer()
    x = inputs(2, (6, 8), 5)
    stock = run(tr, x)
    clear_cli.linearize(tr, window=2, backend="reference")
    local = run(tr, x)
    assert maxdiff(local, stock) > 1e-3
    clear_cli.linearize(tr, window=2, down_factor=2, backend="reference")
    pooled = run(tr, x)
    assert maxdiff(pooled, local) > 1e-4 and maxdiff(pooled, stock) > 1e-4


def test_unlinearize_restores_processors_exactly():
    tr = build_transformer()
    before = [m.attn.processor for m in [*tr.transformer_blocks, *tr.single_transformer_blocks]]
    pos_embed = tr.pos_embed
    x = inputs()
    stock = run(tr, x)
    clear_cli.linearize(tr, window=2, down_factor=2, ntk_factor=10, backend="reference")
    assert is_linearized(tr) and tr.pos_embed is not pos_embed
    assert all(isinstance(p, ClearFluxAttnProcessor) for p in clear_processors(tr))
    assert len(clear_processors(tr)) == 4
    clear_cli.unlinearize(tr)
    after = [m.attn.processor for m in [*tr.transformer_blocks, *tr.single_transformer_blocks]]
    assert all(a is b for a, b in zip(before, after))
    assert tr.pos_embed is pos_embed and not is_linearized(tr)
    assert not any("processor" in k for k in tr.state_dict())
    assert len(tr._forward_pre_hooks) == 0
    assert torch.equal(run(tr, x), stock)
    clear_cli.unlinearize(tr)  # a no-op on a stock model


def test_linearize_twice_replaces_settings_and_keeps_pooling_weights():
    tr = build_transformer()
    x = inputs(1, (4, 4), 3)
    clear_cli.linearize(tr, window=1, down_factor=2, backend="reference")
    procs = clear_processors(tr)
    with torch.no_grad():
        for p in procs:
            p.spatial_weight.copy_(torch.arange(4.0).reshape(1, 1, 1, 2, 1, 2, 1))
    clear_cli.linearize(tr, window=3, down_factor=2, backend="reference")
    assert clear_processors(tr) == procs  # same processors, new settings
    assert all(p._state.settings.window == 3 for p in procs)
    assert all(torch.equal(p.spatial_weight.flatten(), torch.arange(4.0)) for p in procs)
    assert len(tr._forward_pre_hooks) == 1
    # A new f gets fresh 1/f^2 weights; f = 1 drops them.
    clear_cli.linearize(tr, window=3, down_factor=4, backend="reference")
    assert all(torch.equal(p.spatial_weight, torch.full((1, 1, 1, 4, 1, 4, 1), 1 / 16)) for p in procs)
    clear_cli.linearize(tr, window=3, backend="reference")
    assert not any("spatial_weight" in k for k in tr.state_dict())
    # Settings were replaced, not merged: same output as a fresh linearize with the same settings.
    fresh = build_transformer()
    clear_cli.linearize(fresh, window=3, backend="reference")
    assert torch.equal(run(tr, x), run(fresh, x))


def test_spatial_weight_state_dict_keys_and_shape():
    tr = build_transformer()
    clear_cli.linearize(tr, window=4, down_factor=4)
    keys = {k: v for k, v in tr.state_dict().items() if k.endswith("spatial_weight")}
    assert sorted(keys) == [
        "single_transformer_blocks.0.attn.processor.spatial_weight",
        "single_transformer_blocks.1.attn.processor.spatial_weight",
        "transformer_blocks.0.attn.processor.spatial_weight",
        "transformer_blocks.1.attn.processor.spatial_weight",
    ]
    for v in keys.values():
        assert v.shape == (1, 1, 1, 4, 1, 4, 1) and torch.allclose(v, torch.full_like(v, 1 / 16))
    # The published checkpoints' layout loads straight into the linearized transformer.
    new = {k: torch.rand_like(v) for k, v in keys.items()}
    missing, unexpected = tr.load_state_dict(new, strict=False)
    assert not unexpected
    assert torch.equal(tr.transformer_blocks[1].attn.processor.spatial_weight,
                       new["transformer_blocks.1.attn.processor.spatial_weight"])


def test_grid_comes_from_img_ids_and_bad_grids_name_the_numbers():
    assert grid_from_img_ids(image_ids(3, 5)) == (3, 5)
    assert grid_from_img_ids(image_ids(1, 7)) == (1, 7)
    assert grid_from_img_ids(image_ids(7, 1)) == (7, 1)
    assert grid_from_img_ids(image_ids(2, 3)[None]) == (2, 3)  # deprecated 3-d ids
    shifted = image_ids(3, 4) * 2 + 5  # offset / scaled positions are still a 3x4 grid
    assert grid_from_img_ids(shifted) == (3, 4)
    col_major = image_ids(3, 4).reshape(3, 4, 3).transpose(0, 1).reshape(12, 3)
    with pytest.raises(ValueError, match=r"not a row-major .*12 tokens|first row has 1 tokens"):
        grid_from_img_ids(col_major)
    shuffled = image_ids(4, 4)[torch.tensor([0, 1, 3, 2] + list(range(4, 16)))]
    with pytest.raises(ValueError, match="not a row-major 4x4 grid"):
        grid_from_img_ids(shuffled)
    with pytest.raises(ValueError, match="first row has 4 tokens, which does not divide the 10"):
        grid_from_img_ids(image_ids(4, 4)[:10])
    # FluxPipeline's bf16 ids past 4K: rows 256/257 (and columns) round to one value; still the same grid
    assert grid_from_img_ids(image_ids(300, 520).to(torch.bfloat16)) == (300, 520)
    assert grid_from_img_ids(image_ids(2, 600).to(torch.float16)) == (2, 600)
    with pytest.raises(ValueError, match="not a row-major 300x520 grid"):
        grid_from_img_ids(image_ids(300, 520).to(torch.bfloat16).float())  # rounded ids in fp32 are not a grid
    with pytest.raises(ValueError, match="not a row-major 4x4 grid"):
        grid_from_img_ids(shuffled.to(torch.bfloat16))

    tr = build_transformer()
    clear_cli.linearize(tr, window=2, backend="reference")
    x = inputs(1, (4, 4), 3)
    x["img_ids"] = image_ids(4, 5)
    with pytest.raises(ValueError, match="img_ids hold 20 positions but the image sequence has 16 tokens"):
        run(tr, x)
    x["img_ids"] = col_major.repeat(2, 1)[:16]
    with pytest.raises(ValueError, match="row-major"):
        run(tr, x)


def test_proportional_attention_scale():
    d = 128
    n_train = 64 * 64 + 512
    assert FLUX_TRAIN_SEQ_LEN == n_train
    assert proportional_scale(n_train, n_train, d) == pytest.approx(1 / math.sqrt(d))
    n_8k = 512 * 512 + 512
    assert proportional_scale(n_8k, n_train, d) == pytest.approx(math.sqrt(math.log(n_8k) / math.log(n_train) / d))
    assert proportional_scale(n_8k, n_train, d, 10) == pytest.approx(
        math.sqrt(math.log(10 * n_8k) / math.log(10 * n_train) / d))
    assert proportional_scale(n_8k, n_train, d) > 1 / math.sqrt(d)

    # In the model: N is the joint length T + H*W of each call; with a whole-grid window, proportional attention
    # equals stock attention with the same scale.
    from clear_cli.attention.context import ClearSettings

    tr = build_transformer()
    x = inputs(1, (4, 6), 5)
    clear_cli.linearize(tr, window=10, backend="reference", proportional_attention=True, train_seq_len=40)
    procs = clear_processors(tr)
    assert procs[0]._state.settings == ClearSettings(window=10, backend="reference", proportional_attention=True,
                                                     train_seq_len=40, log_scale_factor=1.0)
    seen = []
    import clear_cli.attention.processors as P

    real = P.proportional_scale

    def spy(n, n_train, head_dim, c):
        seen.append((n, n_train, head_dim, c))
        return real(n, n_train, head_dim, c)

    P.proportional_scale = spy
    try:
        prop = run(tr, x)
    finally:
        P.proportional_scale = real
    assert set(seen) == {(5 + 24, 40, 32, 1.0)}
    clear_cli.linearize(tr, window=10, backend="reference")
    assert maxdiff(prop, run(tr, x)) > 1e-4
    clear_cli.linearize(tr, window=10, down_factor=2, backend="reference", proportional_attention=True)
    assert procs[0]._state.settings.log_scale_factor == 10.0  # the authors' pooled variant: log(10 N)
    assert procs[0]._state.settings.train_seq_len == FLUX_TRAIN_SEQ_LEN


def test_bad_settings_are_value_errors():
    tr = build_transformer()
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        clear_cli.linearize(tr, window=0)
    with pytest.raises(ValueError, match="down_factor"):
        clear_cli.linearize(tr, down_factor=0)
    with pytest.raises(ValueError, match="backend 'fast'"):
        clear_cli.linearize(tr, backend="fast")
    with pytest.raises(ValueError, match="linearize found a Linear .no FluxAttention modules.; it supports Flux"):
        clear_cli.linearize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="reference_rule 'near' is not one of global, shared, own"):
        clear_cli.linearize(tr, reference_rule="near")
    with pytest.raises(ValueError, match="runs on backend='reference' with down_factor 1 only"):
        clear_cli.linearize(tr, backend="tiled", reference_rule="shared")
    assert not is_linearized(tr)
    clear_cli.linearize(tr, window=2, down_factor=4, backend="reference")
    with pytest.raises(ValueError, match="down_factor 4 does not divide the token grid 4x6"):
        run(tr, inputs(1, (4, 6), 2))


def test_fused_projections_are_supported():
    tr = build_transformer()
    x = inputs(2, (4, 5), 3)
    clear_cli.linearize(tr, window=2, backend="reference")
    unfused = run(tr, x)
    tr.fuse_qkv_projections()
    assert tr.transformer_blocks[0].attn.fused_projections
    assert maxdiff(run(tr, x), unfused) < TOL
    with pytest.raises(ValueError, match="keep_teacher needs unfused projections"):
        clear_cli.linearize(tr, window=2, backend="reference", keep_teacher=True)


def test_pipeline_two_steps_matches_stock():
    pipe = clear_cli.load_pipeline("tiny-random")
    kw = dict(prompt=["a red circle", "two blue squares on green"], height=64, width=96, num_inference_steps=2,
              guidance_scale=3.5, output_type="latent")
    stock = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert clear_cli.linearize(pipe, window=64, backend="reference") is pipe
    lin = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert maxdiff(lin, stock) < TOL
    clear_cli.linearize(pipe, window=1, backend="reference")
    local = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert maxdiff(local, stock) > 1e-4
    clear_cli.unlinearize(pipe)
    assert torch.equal(pipe(**kw, generator=torch.Generator().manual_seed(0)).images, stock)


def test_controlnet_residuals_keep_working():
    from diffusers import FluxControlNetModel

    from clear_cli.models import tiny

    cfg = {k: v for k, v in tiny.TRANSFORMER.items() if k != "out_channels"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        cn = FluxControlNetModel(**{**cfg, "num_layers": 1, "num_single_layers": 1}).eval()
        for p in cn.parameters():  # controlnet blocks start at zero: give them weights so residuals are non-zero
            if p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=0.05)
    tr = build_transformer()
    x = inputs(2, (4, 6), 5)
    cond = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(9))

    def control():
        with torch.no_grad():
            out = cn(controlnet_cond=cond, return_dict=False, **x)
        return dict(controlnet_block_samples=out[0], controlnet_single_block_samples=out[1])

    c = control()
    assert c["controlnet_block_samples"][0].abs().max() > 0
    stock = run(tr, x, **c)
    assert maxdiff(stock, run(tr, x)) > 1e-4  # the residuals matter
    clear_cli.linearize(tr, window=7, backend="reference")
    assert maxdiff(run(tr, x, **c), stock) < TOL
    # The ControlNet holds FluxAttention too and can itself be linearized.
    clear_cli.linearize(cn, window=7, backend="reference")
    assert maxdiff(run(tr, x, **control()), stock) < TOL
    clear_cli.linearize(tr, window=2, backend="reference")
    assert maxdiff(run(tr, x, **c), stock) > 1e-4


def test_tiled_backend_matches_reference_in_the_model():
    from clear_cli.attention import BACKENDS

    if "tiled" not in BACKENDS:
        pytest.skip("no tiled backend")
    tr = build_transformer()
    x = inputs(2, (9, 7), 5)
    for window, f in ((3, 1), (2, 1)):
        clear_cli.linearize(tr, window=window, down_factor=f, backend="reference")
        ref = run(tr, x)
        clear_cli.linearize(tr, window=window, down_factor=f, backend="tiled")
        assert maxdiff(run(tr, x), ref) < TOL
    x = inputs(1, (8, 6), 3)
    clear_cli.linearize(tr, window=3, down_factor=2, backend="reference")
    ref = run(tr, x)
    clear_cli.linearize(tr, window=3, down_factor=2, backend="tiled")
    assert maxdiff(run(tr, x), ref) < TOL


def test_deep_copy_carries_its_own_state():
    import copy

    tr = build_transformer()
    x = inputs(1, (4, 6), 5)
    stock = run(tr, x)
    clear_cli.linearize(tr, window=2, down_factor=2, backend="reference")
    local = run(tr, x)
    twin = copy.deepcopy(tr)
    assert clear_processors(twin)[0]._state is twin._clear_state is not tr._clear_state
    assert torch.equal(run(twin, x), local)
    clear_cli.unlinearize(twin)
    assert maxdiff(run(twin, x), stock) < TOL
    assert torch.equal(run(tr, x), local) and len(tr._forward_pre_hooks) == 1


def test_wrappers_are_unwrapped():
    class Wrapper(torch.nn.Module):  # like DDP / FSDP: the real model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kw):
            return self.module(**kw)

    tr = build_transformer()
    x = inputs(1, (4, 6), 5)
    stock = run(tr, x)
    wrapped = Wrapper(tr)
    clear_cli.linearize(wrapped, window=2, backend="reference")
    assert is_linearized(tr) and len(tr._forward_pre_hooks) == 1 and not wrapped._forward_pre_hooks
    assert maxdiff(run(wrapped, x), stock) > 1e-4
    clear_cli.unlinearize(wrapped)
    assert torch.equal(run(wrapped, x), stock)
