"""`clear_cli.export`: LoRA / full / ComfyUI files that stock loaders read and that reproduce the student."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from clear_cli.jobs.export import choose_rank, export

WINDOW = 2  # small enough to matter on the tiny model's 8x8 token grid


def _make_student(path: Path, down_factor: int, *, metadata: bool = True, seed: int = 0) -> Path:
    """A 'distilled' tiny student: tiny-random, linearized, trainable attention weights perturbed, saved."""
    from clear_cli.attention.linearize import linearize, trainable_attention_parameters
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import save_attention_weights

    pipe = load_pipeline("tiny-random")
    linearize(pipe, window=WINDOW, down_factor=down_factor)
    g = torch.Generator().manual_seed(seed)
    params = trainable_attention_parameters(pipe)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * float(p.detach().abs().mean()))
    meta = {"window": WINDOW, "down_factor": down_factor, "base_model": "tiny-random", "steps": 7} if metadata else {}
    return save_attention_weights(path, dict(params), meta)


def _latents(pipe) -> torch.Tensor:
    return pipe("a red circle", height=128, width=128, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(1)).images


def _student_latents(path: Path, down_factor: int) -> torch.Tensor:
    from clear_cli.attention.linearize import linearize
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights

    pipe = load_pipeline("tiny-random")
    linearize(pipe, window=WINDOW, down_factor=down_factor)
    apply_attention_weights(pipe.transformer, load_attention_weights(path))
    return _latents(pipe)


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict[int, Path]:
    d = tmp_path_factory.mktemp("students")
    return {f: _make_student(d / f"student_f{f}.safetensors", f) for f in (1, 4)}


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# Words that send diffusers 0.42's FLUX LoRA loader down another converter (lora_pipeline.py, lora_state_dict),
# or make it pop a key as a network alpha.
_OTHER_DIALECTS = ("processor", ".lora_down.weight", "alpha", "base_model", "query_norm.scale", "dora_scale")


@pytest.mark.parametrize("f", [1, 4])
def test_full_rank_lora_through_stock_loader_reproduces_student(students, tmp_path, f):
    from diffusers import FluxPipeline as StockFlux

    from clear_cli.attention.linearize import linearize
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import load_attention_weights, load_tensors

    lora = tmp_path / "lora.safetensors"
    res = export(students[f], format="lora", energy=1.0, out=lora, progress=False)
    assert res.window == WINDOW and res.down_factor == f and res.base_model == "tiny-random"
    assert all(r.error < 1e-5 for r in res.layers)

    keys = _keys(lora)
    assert not [k for k in keys if any(w in k for w in _OTHER_DIALECTS)]
    assert all(k.startswith("transformer.") for k in keys if "lora" in k)
    pools = [k for k in keys if k.startswith("clear_pool.")]
    assert len(pools) == (4 if f > 1 else 0)  # every FluxAttention of the tiny model pools when f > 1
    # diffusers' lora_state_dict hands the keys on untouched: no converter ran on them.
    assert sorted(StockFlux.lora_state_dict(str(lora))) == sorted(keys)

    pipe = load_pipeline("tiny-random")
    pipe.load_lora_weights(str(lora))  # stock diffusers + PEFT
    linearize(pipe, window=WINDOW, down_factor=f)
    if f > 1:  # the pooling weights ride outside the transformer prefix; our reader restores them
        load_tensors(pipe.transformer, load_attention_weights(lora).tensors)
    got = _latents(pipe)
    want = _student_latents(students[f], f)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()

    base = load_pipeline("tiny-random")
    linearize(base, window=WINDOW, down_factor=f)
    assert (_latents(base) - want).abs().max() > 1e-3  # the check above could fail


def test_error_falls_as_rank_grows(students, tmp_path):
    errors = []
    for rank in (1, 4, 16, 128):
        res = export(students[1], format="lora", rank=rank, out=tmp_path / f"r{rank}.safetensors", progress=False)
        assert {r.rank for r in res.layers} == {min(rank, 128)}
        errors.append(max(r.error for r in res.layers))
        meta = _meta(res.path)
        assert int(meta["rank"]) == rank and re.search(r'"transformer_blocks\.0\.attn\.to_q": \d+', meta["ranks"])
    assert errors[0] > errors[1] > errors[2] > errors[3] and errors[3] < 1e-5 and errors[0] > 0.5
    low = export(students[1], format="lora", energy=0.5, out=tmp_path / "e50.safetensors", progress=False)
    high = export(students[1], format="lora", energy=0.99, out=tmp_path / "e99.safetensors", progress=False)
    assert max(r.rank for r in low.layers) < min(r.rank for r in high.layers) <= 128
    assert all(r.error <= (1 - 0.5) ** 0.5 + 1e-6 for r in low.layers)
    assert low.size_bytes < high.size_bytes


def test_choose_rank_rules():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14
    assert choose_rank(s, 2, None) == 2 and choose_rank(s, 99, None) == 4
    assert choose_rank(s, None, 9 / 14) == 1 and choose_rank(s, None, 9 / 14 + 1e-3) == 2
    assert choose_rank(s, None, 1.0) == 3  # the numerical rank, not the zero singular value
    assert choose_rank(torch.zeros(3), None, 0.9) == 1


def test_full_format_is_the_published_layout_with_metadata(students, tmp_path):
    from clear_cli.models.weights import load_attention_weights

    res = export(students[4], format="full", out=tmp_path / "full.safetensors", progress=False)
    src = load_attention_weights(students[4])
    got = load_attention_weights(res.path)
    assert got.kind == "clear" and (got.window, got.down_factor) == (WINDOW, 4)
    assert sorted(got.tensors) == sorted(src.tensors)  # own keys, no prefix, processor.spatial_weight kept
    assert any(k.endswith(".attn.processor.spatial_weight") for k in got.tensors)
    assert all(torch.equal(got.tensors[k], src.tensors[k]) for k in src.tensors)
    assert got.metadata["steps"] == "7" and got.metadata["base_model"] == "tiny-random"


def test_lora_and_full_give_the_same_model(students, tmp_path):
    """What `clear gen --weights LORA` and `--weights FULL` load (apply_attention_weights) agree at full rank."""
    from clear_cli.attention.linearize import linearize
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights

    lora = export(students[4], format="lora", energy=1.0, out=tmp_path / "l.safetensors", progress=False).path
    full = export(students[4], format="full", out=tmp_path / "f.safetensors", progress=False).path
    states = []
    for path in (lora, full):
        pipe = load_pipeline("tiny-random")
        linearize(pipe, window=WINDOW, down_factor=4)
        apply_attention_weights(pipe.transformer, load_attention_weights(path))
        states.append(pipe.transformer.state_dict())
    assert states[0].keys() == states[1].keys()
    worst = max((states[0][k] - states[1][k]).abs().max().item() for k in states[0])
    assert worst < 1e-5
    # and a LoRA turns back into the full file (materialized on the base model)
    back = load_attention_weights(export(lora, format="full", out=tmp_path / "b.safetensors", progress=False).path)
    src = load_attention_weights(students[4])
    assert back.window == WINDOW and sorted(back.tensors) == sorted(src.tensors)
    assert max((back.tensors[k] - src.tensors[k]).abs().max().item() for k in src.tensors) < 1e-5


def test_mixed_ranks_load_at_scale_one_in_stock_diffusers(students, tmp_path):
    """--energy gives every layer its own rank: diffusers must still apply B @ A unscaled (no alpha keys)."""
    from clear_cli.attention.linearize import linearize
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights

    res = export(students[1], format="lora", energy=0.8, out=tmp_path / "mixed.safetensors", progress=False)
    ranks = {r.rank for r in res.layers}
    assert len(ranks) > 1, ranks
    stock = load_pipeline("tiny-random")
    stock.load_lora_weights(str(res.path))
    ours = load_pipeline("tiny-random")
    apply_attention_weights(ours.transformer, load_attention_weights(res.path))
    for pipe in (stock, ours):
        linearize(pipe, window=WINDOW)
    assert torch.allclose(_latents(stock), _latents(ours), atol=1e-4, rtol=0)


def test_published_checkpoint_becomes_a_lora(tmp_path):
    """The authors' files: no metadata, `transformer.`-less keys, r and f from the file name."""
    from clear_cli.models.weights import load_attention_weights

    from clear_cli.errors import UsageError

    pub = _make_student(tmp_path / f"clear_local_{WINDOW}_down_4.safetensors", 4, metadata=False, seed=3)
    with pytest.raises(UsageError) as e:  # published files were distilled from FLUX.1-dev: another model says so
        export(pub, format="lora", rank=8, model="tiny-random", out=tmp_path / "no.safetensors", progress=False)
    assert "trained from black-forest-labs/FLUX.1-dev" in str(e.value) and "--base" in e.value.one_line()
    # here tiny-random stands in for FLUX.1-dev: --base names what they were trained from
    res = export(pub, format="lora", rank=8, base="tiny-random", out=tmp_path / "pub_lora.safetensors", progress=False)
    w = load_attention_weights(res.path)
    assert (w.kind, w.window, w.down_factor, w.base_model) == ("lora", WINDOW, 4, "tiny-random")
    assert {d.rank for d in w.lora.values()} == {8} and len(w.tensors) == 4


def _fuse_like_comfyui(state: dict[str, torch.Tensor], n_double: int, n_single: int) -> dict[str, torch.Tensor]:
    """The ComfyUI-side tensors our comfy layout targets (comfy/utils.py flux_to_diffusers, written from it)."""
    out = {}
    for i in range(n_double):
        a = f"transformer_blocks.{i}.attn."
        for part in ("weight", "bias"):
            out[f"double_blocks.{i}.img_attn.qkv.{part}"] = torch.cat([state[f"{a}to_{x}.{part}"] for x in "qkv"])
            out[f"double_blocks.{i}.img_attn.proj.{part}"] = state[f"{a}to_out.0.{part}"]
    for i in range(n_single):
        b = f"single_transformer_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"single_blocks.{i}.linear1.{part}"] = torch.cat(
                [state[f"{b}attn.to_{x}.{part}"] for x in "qkv"] + [state[f"{b}proj_mlp.{part}"]])
    return out


def test_comfy_layout_applied_with_comfyui_math_gives_the_student(students, tmp_path):
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import load_attention_weights

    res = export(students[4], format="comfy", energy=1.0, out=tmp_path / "comfy.safetensors", progress=False)
    with safe_open(str(res.path), framework="pt") as fh:
        lora = {k: fh.get_tensor(k) for k in fh.keys()}
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in lora
    assert "lora_unet_single_blocks_1_linear1.diff_b" in lora
    base = load_pipeline("tiny-random").transformer
    student = dict(base.state_dict())
    student.update(load_attention_weights(students[4]).tensors)
    cfg = base.config
    fused = _fuse_like_comfyui(dict(base.state_dict()), cfg.num_layers, cfg.num_single_layers)
    want = _fuse_like_comfyui(student, cfg.num_layers, cfg.num_single_layers)
    for key in list(fused):  # ComfyUI: W += (alpha / rank) * up @ down; bias += diff_b (comfy/lora.py, load_lora)
        name = "lora_unet_" + key.rsplit(".", 1)[0].replace(".", "_")
        if key.endswith(".weight") and f"{name}.lora_up.weight" in lora:
            up, down = lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]
            fused[key] = fused[key] + float(lora[f"{name}.alpha"]) / down.shape[0] * (up @ down)
        elif key.endswith(".bias") and f"{name}.diff_b" in lora:
            fused[key] = fused[key] + lora[f"{name}.diff_b"]
    worst = max((fused[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-5
    assert sum(k.startswith("clear_pool.") for k in lora) == 4
