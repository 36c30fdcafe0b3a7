"""Distillation support: the teacher pass inside one transformer, attention capture, the trainable set, RoPE NTK."""

from __future__ import annotations

import pytest
import torch

import clear_cli
from clear_cli.attention.linearize import (
    attention_modules, capture_attention, clear_processors, default_attention_layers, teacher_mode,
    trainable_attention_parameters,
)
from tiny_flux_inputs import build_transformer, image_ids, inputs


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


TINY_TRAINABLE = sorted(
    [f"transformer_blocks.{b}.attn.{p}.{w}" for b in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0")
     for w in ("weight", "bias")]
    + [f"single_transformer_blocks.{b}.attn.{p}.{w}" for b in range(2) for p in ("to_q", "to_k", "to_v")
       for w in ("weight", "bias")]
)


def perturb_trainable(tr) -> None:
    """Stand-in for training: move every trainable weight."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainable_attention_parameters(tr).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_trainable_set_is_exactly_the_image_branch_projections():
    tr = build_transformer()
    clear_cli.linearize(tr, window=2, down_factor=2, backend="reference", keep_teacher=True)
    params = trainable_attention_parameters(tr, freeze_others=True)
    spatial = sorted(k for k in params if k.endswith("spatial_weight"))
    assert sorted(k for k in params if not k.endswith("spatial_weight")) == TINY_TRAINABLE
    assert len(spatial) == 4
    assert {n for n, p in tr.named_parameters() if p.requires_grad} == set(params)
    # Teacher copies are buffers outside the state dict (attention-weight files hold only the trained weights).
    assert not any("teacher" in k for k in tr.state_dict())
    assert all(p.has_teacher for p in clear_processors(tr))


def test_flux_dev_shapes_trainable_count_and_default_layers():
    """FLUX.1-dev's own architecture (built on the meta device: no memory): 1.79B trainable of 11.9B."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        tr = FluxTransformer2DModel(guidance_embeds=True)
    clear_cli.linearize(tr, window=16)
    assert len(attention_modules(tr)) == 57
    layers = default_attention_layers(tr)
    assert layers == list(range(20, 57, 4)) and len(layers) == 10
    single_index = {id(b.attn): j for j, b in enumerate(tr.single_transformer_blocks)}
    assert [single_index[id(attention_modules(tr)[i])] for i in layers] == list(range(1, 38, 4))
    n_train = sum(p.numel() for p in trainable_attention_parameters(tr).values())
    n_all = sum(p.numel() for p in tr.parameters())
    assert round(n_train / 1e9, 2) == 1.79 and round(n_all / 1e9, 1) == 11.9


@pytest.mark.parametrize("checkpointing", [False, True])
def test_teacher_pass_reproduces_the_original_model(checkpointing):
    tr = build_transformer()
    x = inputs(2, (4, 6), 5)
    with torch.no_grad():
        original = tr(**x).sample
    clear_cli.linearize(tr, window=1, down_factor=2, backend="reference", keep_teacher=True)
    trainable_attention_parameters(tr, freeze_others=True)
    perturb_trainable(tr)
    if checkpointing:
        tr.enable_gradient_checkpointing()
    tr.train()
    with teacher_mode(tr):
        with torch.no_grad():
            assert torch.equal(tr(**x).sample, original)
        teacher = tr(**x).sample  # grad enabled: checkpointing is active on this path
    assert torch.equal(teacher, original)
    assert not teacher.requires_grad  # the teacher touches only frozen weights and buffers
    student = tr(**x).sample
    assert maxdiff(student, original) > 1e-3 and student.requires_grad
    # Teacher copies follow the module across dtypes like any buffer.
    tr.to(torch.float64)
    assert clear_processors(tr)[0].teacher_to_q_weight.dtype == torch.float64


def test_student_gradients_reach_only_trainable_parameters():
    tr = build_transformer()
    clear_cli.linearize(tr, window=2, down_factor=2, backend="reference", keep_teacher=True)
    params = trainable_attention_parameters(tr, freeze_others=True)
    x = inputs(2, (4, 6), 5)
    tr(**x).sample.square().mean().backward()
    got = {n for n, p in tr.named_parameters() if p.grad is not None}
    assert got == set(params)
    assert all(params[n].grad.abs().sum() > 0 for n in got)
    assert all(b.grad is None for b in clear_processors(tr)[0].buffers())


def test_tiled_backend_gradients_match_reference():
    from clear_cli.attention import BACKENDS

    if "tiled" not in BACKENDS:
        pytest.skip("no tiled backend")
    x = inputs(2, (6, 4), 3)
    grads = []
    for backend in ("reference", "tiled"):
        tr = build_transformer()
        clear_cli.linearize(tr, window=2, down_factor=2, backend=backend, keep_teacher=True)
        params = trainable_attention_parameters(tr, freeze_others=True)
        tr(**x).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in params.items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)


def test_checkpointing_recomputes_each_block_in_its_own_pass_mode():
    """Backward after other passes (a teacher pass, another shape) still recomputes the student's own blocks."""
    x = inputs(2, (4, 6), 5)
    grads = []
    for checkpointing in (False, True):
        tr = build_transformer()
        clear_cli.linearize(tr, window=2, down_factor=2, backend="reference", keep_teacher=True)
        params = trainable_attention_parameters(tr, freeze_others=True)
        perturb_trainable(tr)
        if checkpointing:
            tr.enable_gradient_checkpointing()
        loss = tr(**x).sample.square().mean()
        with teacher_mode(tr):
            tr(**inputs(1, (3, 5), 4))  # passes of another mode (and shape) between forward and backward
            tr(**x)
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_capture_attention_for_the_attention_loss():
    tr = build_transformer()
    clear_cli.linearize(tr, window=1, backend="reference", keep_teacher=True)
    params = trainable_attention_parameters(tr, freeze_others=True)
    tr.enable_gradient_checkpointing()
    x = inputs(2, (4, 6), 5)
    layers = [0, 2, 3]
    with teacher_mode(tr), capture_attention(tr, layers) as t_out, torch.no_grad():
        tr(**x)
    with capture_attention(tr, layers) as s_out:
        pred = tr(**x).sample
    assert sorted(t_out) == sorted(s_out) == layers
    for i in layers:  # double and single blocks alike: [batch, T + H*W, dim]
        assert t_out[i].shape == s_out[i].shape == (2, 5 + 24, 128)
        assert not t_out[i].requires_grad and s_out[i].requires_grad
    kept = {i: s_out[i] for i in layers}
    l_attn = sum(torch.nn.functional.mse_loss(s_out[i], t_out[i]) for i in layers) / len(layers)
    assert l_attn > 0
    (l_attn + pred.square().mean()).backward()
    assert all(s_out[i] is kept[i] for i in layers)  # recomputation did not overwrite the captured outputs
    assert all(p.grad is not None for p in params.values())
    # Outside a capture block nothing is recorded; with an unchanged model and a whole-grid window the student's
    # attention outputs equal the teacher's.
    tr2 = build_transformer()
    clear_cli.linearize(tr2, window=20, backend="reference", keep_teacher=True)
    with torch.no_grad():
        with teacher_mode(tr2), capture_attention(tr2, [1, 3]) as t2:
            tr2(**x)
        with capture_attention(tr2, [1, 3]) as s2:
            tr2(**x)
    assert all(maxdiff(t2[i], s2[i]) < 1e-5 for i in (1, 3))
    assert default_attention_layers(tr2) == []  # 2 double + 2 single: no index % 4 == 0 single block


def test_teacher_and_capture_misuse_are_value_errors():
    tr = build_transformer()
    with pytest.raises(ValueError, match="not linearized"):
        with teacher_mode(tr):
            pass
    clear_cli.linearize(tr, window=2, backend="reference")
    with pytest.raises(ValueError, match="keep_teacher=True"):
        with teacher_mode(tr):
            pass
    with pytest.raises(ValueError, match=r"attention layers \[4, 9\] do not exist: this model has processors 0..3"):
        with capture_attention(tr, [1, 4, 9]):
            pass


def test_relinearize_keeps_the_original_teacher_copies():
    tr = build_transformer()
    x = inputs(1, (4, 4), 3)
    with torch.no_grad():
        original = tr(**x).sample
    clear_cli.linearize(tr, window=2, backend="reference", keep_teacher=True)
    perturb_trainable(tr)
    clear_cli.linearize(tr, window=3, down_factor=2, backend="reference", keep_teacher=True)
    with teacher_mode(tr), torch.no_grad():
        assert torch.equal(tr(**x).sample, original)
    clear_cli.linearize(tr, window=3, backend="reference")  # keep_teacher=False drops them
    assert not any(p.has_teacher for p in clear_processors(tr))


def test_rope_ntk_factor():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from clear_cli.attention.rope import NTKFluxPosEmbed, restore_rope, rope_ntk_factor, scale_rope

    ids = torch.cat([torch.zeros(3, 3), image_ids(5, 7)])
    stock = FluxPosEmbed(theta=10000, axes_dim=[4, 14, 14])
    for a, b in zip(NTKFluxPosEmbed(10000, [4, 14, 14], 1.0)(ids), stock(ids)):
        assert torch.equal(a, b)
    for a, b in zip(NTKFluxPosEmbed(10000, [4, 14, 14], 10.0)(ids), FluxPosEmbed(100000, [4, 14, 14])(ids)):
        assert torch.equal(a, b)

    tr = build_transformer()
    original = tr.pos_embed
    scale_rope(tr, 10)
    scale_rope(tr, 4)  # replaces, does not compound
    assert rope_ntk_factor(tr) == 4.0 and tr.pos_embed.original is original
    assert not any("pos_embed" in k for k in tr.state_dict())
    restore_rope(tr)
    assert tr.pos_embed is original and rope_ntk_factor(tr) is None

    # Through linearize: ntk changes the output; linearize without it restores stock RoPE.
    x = inputs(1, (4, 6), 5)
    clear_cli.linearize(tr, window=20, backend="reference")
    plain = tr(**x).sample.detach()
    clear_cli.linearize(tr, window=20, backend="reference", ntk_factor=10)
    assert rope_ntk_factor(tr) == 10.0
    assert maxdiff(tr(**x).sample.detach(), plain) > 1e-4
    clear_cli.linearize(tr, window=20, backend="reference")
    assert tr.pos_embed is original
    with pytest.raises(ValueError, match="ntk_factor must be > 0"):
        clear_cli.linearize(tr, ntk_factor=0)
