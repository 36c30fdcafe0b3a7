"""A user's style LoRA stacked with a CLEAR LoRA in stock diffusers: two `load_lora_weights` with adapter names and
`set_adapters`. Each changes the output, together they add up (linear layers), and CLEAR attention runs on top."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

WINDOW = 2
STYLE_TARGETS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v", "transformer_blocks.0.ff.net.2",
                 "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp")


def _style_lora(path: Path, pipe, rank: int = 4, seed: int = 5) -> Path:
    """A style LoRA as PEFT/diffusers trainers write it: lora_A/lora_B of some linear layers, no bias, no alpha."""
    from safetensors.torch import save_file

    modules = dict(pipe.transformer.named_modules())
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in STYLE_TARGETS:
        w = modules[name].weight
        out[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, w.shape[1], generator=g) / w.shape[1] ** 0.5
        out[f"transformer.{name}.lora_B.weight"] = 0.3 * float(w.detach().abs().mean()) * torch.randn(w.shape[0], rank,
                                                                                             generator=g)
    save_file(out, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_random_pipe):
    from clear_cli.jobs.export import export
    from clear_cli.metrics.testing import write_student

    d = tmp_path_factory.mktemp("stack")
    student = write_student(d / "clear_attn.safetensors", tiny_random_pipe.transformer, window=WINDOW, noise=0.3)
    clear = export(student, format="lora", energy=1.0, out=d / "clear_lora.safetensors", progress=False).path
    return {"student": student, "clear": clear, "style": _style_lora(d / "style.safetensors", tiny_random_pipe)}


def _stacked(files):
    from clear_cli.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    pipe.load_lora_weights(str(files["clear"]), adapter_name="clear_attn")
    pipe.load_lora_weights(str(files["style"]), adapter_name="style")
    return pipe


def _latents(pipe) -> torch.Tensor:
    return pipe("a red circle", height=64, width=64, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(3)).images


def test_both_loras_apply_and_add_up(files):
    pipe = _stacked(files)
    assert sorted(pipe.get_list_adapters()["transformer"]) == ["clear_attn", "style"]
    layer = dict(pipe.transformer.named_modules())["transformer_blocks.0.attn.to_q"]  # both LoRAs touch it
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
    outs, lats = {}, {}
    for name, adapters in (("none", None), ("clear", ["clear_attn"]), ("style", ["style"]),
                           ("both", ["clear_attn", "style"])):
        if adapters is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(adapters, [1.0] * len(adapters))
        with torch.no_grad():
            outs[name] = layer(x)
        lats[name] = _latents(pipe)
    for a, b in (("none", "clear"), ("none", "style"), ("clear", "both"), ("style", "both")):
        assert (lats[a] - lats[b]).abs().max() > 1e-3, (a, b)  # each LoRA changes the image
        assert (outs[a] - outs[b]).abs().max() > 1e-3, (a, b)
    summed = outs["none"] + (outs["clear"] - outs["none"]) + (outs["style"] - outs["none"])
    assert torch.allclose(outs["both"], summed, atol=1e-5), (outs["both"] - summed).abs().max()


def test_clear_processors_with_both_loras_match_our_route(files):
    """Stock route (two LoRAs + linearize) = our route (the student's weights applied, then the style LoRA alone)."""
    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights

    stock = _stacked(files)
    stock.set_adapters(["clear_attn", "style"], [1.0, 1.0])
    linearize(stock, window=WINDOW)
    got = _latents(stock)
    assert torch.isfinite(got).all()

    ours = load_pipeline("tiny-random")
    linearize(ours, window=WINDOW)
    apply_attention_weights(ours.transformer, load_attention_weights(files["student"]))
    ours.load_lora_weights(str(files["style"]), adapter_name="style")
    want = _latents(ours)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()

    stock.set_adapters(["clear_attn"], [1.0])  # the check above could fail: without the style LoRA it differs
    assert (_latents(stock) - want).abs().max() > 1e-3
    unlinearize(stock)
