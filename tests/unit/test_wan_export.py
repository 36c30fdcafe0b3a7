"""`clear export --format lora` of Wan CLEAR weights (self-attention `blocks.N.attn1` projections): the stock
diffusers Wan loader (WanPipeline.load_lora_weights + fuse_lora) turns wan-tiny-random into the student."""

from __future__ import annotations

import torch

import clear_cli
from clear_cli.models import load_pipeline
from clear_cli.models.weights import save_attention_weights


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 7, 32, generator=g), return_dict=False)


def test_exported_wan_lora_fuses_into_the_student(tmp_path):
    pipe = load_pipeline("wan-tiny-random")
    g = torch.Generator().manual_seed(5)
    student = {}
    for i, blk in enumerate(pipe.transformer.blocks):
        for proj in ("to_q", "to_k", "to_v"):
            lin = blk.attn1.get_submodule(proj)
            student[f"blocks.{i}.attn1.{proj}.weight"] = lin.weight + 0.05 * torch.randn(lin.weight.shape, generator=g)
            student[f"blocks.{i}.attn1.{proj}.bias"] = lin.bias + 0.05 * torch.randn(lin.bias.shape, generator=g)
    src = save_attention_weights(tmp_path / "student.safetensors", student,
                                 {"window": 4, "down_factor": 1, "base_model": "wan-tiny-random"})
    res = clear_cli.export(str(src), format="lora", rank=24, out=str(tmp_path / "lora.safetensors"))
    assert len(res.layers) == 6 and not res.unchanged

    with torch.no_grad():
        stock = pipe.transformer(**_inputs())[0]
        pipe.transformer.load_state_dict(student, strict=False)
        want = pipe.transformer(**_inputs())[0]
        fresh = load_pipeline("wan-tiny-random")
        fresh.load_lora_weights(str(res.path))      # diffusers' WanLoraLoaderMixin, unchanged
        fresh.fuse_lora()
        fresh.unload_lora_weights()                  # keeps the fused weights, drops the adapters
        got = fresh.transformer(**_inputs())[0]
    sd = fresh.transformer.state_dict()
    assert max((sd[k] - v).abs().max().item() for k, v in student.items()) <= 1e-5
    assert (got - want).abs().max() <= 1e-5
    assert (want - stock).abs().max() > 1e-3    # the student differs from the base: the check can fail
