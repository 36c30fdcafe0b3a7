"""`clear distill` on tiny-random at 64 px: trainable set, teacher exactness, resume equality, outputs, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clear_cli.training.batches import BatchSource, pack_latents, sample_order, training_sigmas

FAST = ["model=tiny-random", "window=1", "train.steps=2", "train.batch_size=4", "train.optimizer=adamw",
        "train.lr=1e-2", "train.mixed_precision=no", "train.gradient_checkpointing=false", "loss.attn_layers=[1,2,3]",
        "checkpoint.every=0", "validation.prompts=[]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 samples drawn by tiny-random at 64 px (a 4x4 token grid), embeddings and latents cached."""
    from clear_cli.jobs.synth import synth

    out = tmp_path_factory.mktemp("synth") / "s64"
    synth(n=8, model="tiny-random", res=64, out=str(out), steps=2, batch_size=4, device="cpu", progress=False)
    return out


def run(data: Path, out: Path, *extra: str, **kw):
    from clear_cli.jobs.distill import distill

    return distill(None, overrides=[f"data={data}", *FAST, *extra], out=out, progress=False, device="cpu", **kw)


def expected_trainable(double: int = 2, single: int = 2, pooled: bool = False) -> set[str]:
    names = set()
    for i in range(double):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            names |= {f"transformer_blocks.{i}.attn.{proj}.{p}" for p in ("weight", "bias")}
        if pooled:
            names.add(f"transformer_blocks.{i}.attn.processor.spatial_weight")
    for i in range(single):
        for proj in ("to_q", "to_k", "to_v"):
            names |= {f"single_transformer_blocks.{i}.attn.{proj}.{p}" for p in ("weight", "bias")}
        if pooled:
            names.add(f"single_transformer_blocks.{i}.attn.processor.spatial_weight")
    return names


def stock_inputs(grid=(4, 4), text_len=32, batch=2, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return dict(hidden_states=torch.randn(batch, h * w, 64, generator=g),
                encoder_hidden_states=torch.randn(batch, text_len, 64, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.rand(batch, generator=g),
                guidance=torch.full((batch,), 3.5), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_len, 3))


# ------------------------------------------------------------------------------------------------ training


def test_trains_exactly_the_attention_projections_and_writes_outputs(data, tmp_path, cli):
    from safetensors import safe_open

    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import load_attention_weights
    from clear_cli.training.recipe import load_recipe, recipe_hash

    out = tmp_path / "run"
    args = [a for a in FAST if not a.startswith("window")] + ["window=1", "down_factor=2"]
    code, stdout, stderr = cli("distill", str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"),
                               "--set", f"data={data}", *sum((["--set", a] for a in args), []), "--set", "resolution=null",
                               "--out", str(out), "--no-progress", "--device", "cpu")
    assert code == 0, stderr
    assert "clear_attn.safetensors" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "clear_attn.safetensors", "log.jsonl",
                                                     "recipe.yaml"]
    # The weight file: exactly the trained tensors, under the transformer's own keys, with metadata.
    path = out / "clear_attn.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        trained = {k: f.get_tensor(k) for k in keys}
    assert keys == expected_trainable(pooled=True)
    recipe = load_recipe(out / "recipe.yaml")  # the resolved recipe loads back as is
    assert (recipe.window, recipe.down_factor, recipe.resolution, recipe.model) == (1, 2, 64, "tiny-random")
    assert {k: meta[k] for k in ("window", "down_factor", "base_model", "steps", "recipe_hash")} == {
        "window": "1", "down_factor": "2", "base_model": "tiny-random", "steps": "2", "recipe_hash": recipe_hash(recipe)}
    w = load_attention_weights(path)
    assert (w.kind, w.window, w.down_factor) == ("clear", 1, 2)
    # Everything else is untouched; every trained tensor moved.
    base = load_pipeline("tiny-random").transformer.state_dict()
    for k, v in trained.items():
        if k.endswith("spatial_weight"):
            assert not torch.allclose(v, torch.full_like(v, 0.25)), k
        else:
            assert not torch.equal(v, base[k]), k
    # The loss terms, logged separately each step.
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for r in log:
        w = recipe.loss
        assert r["loss"] == pytest.approx(w.fm * r["fm"] + w.pred * r["pred"] + w.attn * r["attn"], rel=1e-5)
        assert r["pred"] > 0 and r["attn"] > 0 and r["lr"] > 0


def test_only_trainable_parameters_require_grad_and_change(data, tmp_path):
    from clear_cli.attention.linearize import trainable_attention_parameters
    from clear_cli.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    result = run(data, tmp_path / "r", pipe=pipe)
    tr = pipe.transformer
    grads = {n for n, p in tr.named_parameters() if p.requires_grad}
    assert grads == set(trainable_attention_parameters(tr)) == expected_trainable()
    after = tr.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == expected_trainable()
    # The teacher costs one frozen copy of exactly these projections (fp32 here), not a second model.
    assert result.teacher_copy_bytes == 4 * sum(before[k].numel() for k in expected_trainable())


def test_memory_against_two_copies_for_flux_dev():
    from clear_cli.models.memory import flux_dev_figure

    fig = flux_dev_figure(dtype_bytes=2)
    assert round(fig.params / 1e9, 1) == 11.9 and round(fig.trained / 1e9, 2) == 1.79  # DESIGN.md §4
    assert fig.saved_bytes == (fig.params - fig.teacher_copy) * 2
    assert 18 * 1024 ** 3 < fig.saved_bytes < 20 * 1024 ** 3  # ~18.8 GiB of bf16 weights saved


def test_teacher_pass_reproduces_the_original_model_exactly(data, tmp_path):
    """After training moved the student weights, a teacher pass is still the original model, bit for bit,
    with gradient checkpointing on and off."""
    from clear_cli.attention.linearize import teacher_mode
    from clear_cli.models import load_pipeline

    x = stock_inputs()
    original = load_pipeline("tiny-random").transformer
    with torch.no_grad():
        want = original(**x).sample
    pipe = load_pipeline("tiny-random")
    run(data, tmp_path / "r", "train.gradient_checkpointing=true", pipe=pipe)
    tr = pipe.transformer
    assert tr.is_gradient_checkpointing
    with torch.no_grad():
        student = tr(**x).sample
    assert not torch.allclose(student, want, atol=1e-4)  # the student differs (CLEAR + trained weights)
    for checkpointing in (True, False):
        if not checkpointing:
            tr.disable_gradient_checkpointing()
        xin = {**x, "hidden_states": x["hidden_states"].clone().requires_grad_(True)}  # grad on: checkpoints run
        with teacher_mode(tr):
            got = tr(**xin).sample
        assert torch.equal(got.detach(), want), checkpointing
        got.sum().backward()  # recomputation under checkpointing stays in teacher mode
        with teacher_mode(tr), torch.no_grad():
            assert torch.equal(tr(**x).sample, want)


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(data, tmp_path):
    from safetensors.torch import load_file

    common = ["train.steps=4", "checkpoint.every=2", "train.optimizer=prodigy", "train.lr=1.0"]
    full = run(data, tmp_path / "full", *common)
    part = tmp_path / "part"
    first = run(data, part, *common[1:], "train.steps=2")
    assert first.steps == 2 and (part / "checkpoints" / "step_2").is_dir()
    with pytest.raises(Exception, match="--resume auto"):
        run(data, part, *common)  # a used --out is refused without --resume
    second = run(data, part, *common, resume="auto")
    assert second.start_step == 2 and [r["step"] for r in second.log] == [3, 4]
    keys = ("loss", "fm", "pred", "attn", "lr")
    want = [[r[k] for k in keys] for r in full.log]
    got = [[r[k] for k in keys] for r in first.log + second.log]
    assert got == want
    logged = [json.loads(line) for line in (part / "log.jsonl").read_text().splitlines()]
    assert [[r[k] for k in keys] for r in logged] == want
    a, b = load_file(str(tmp_path / "full" / "clear_attn.safetensors")), load_file(str(part / "clear_attn.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step_2", "step_4"]


# ------------------------------------------------------------------------------------------------ refusals


def test_bad_input_is_reported_at_once_and_nothing_is_written(tmp_path, cli):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"data: {tmp_path / 'nowhere'}\nmodel: tiny-random\nwindow: 0\nwindw: 3\n"
                      "train:\n  steps: many\n")
    out = tmp_path / "out"
    code, _, err = cli("distill", str(recipe), "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    for part in ("window: must be >= 1", "windw: unknown key (did you mean 'window'?)", "train.steps: expected an "
                 "integer", "nowhere does not exist"):
        assert part in err, (part, err)
    assert not out.exists()


def test_data_from_another_model_or_resolution_is_refused(data, tmp_path, cli):
    out = tmp_path / "out"
    code, _, err = cli("distill", str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"),
                       "--set", f"data={data}", "--set", "window=0", "--out", str(out))
    assert code == 2
    assert "drawn by model 'tiny-random'" in err and "resolution: 128 but the data was drawn at 64x64" in err
    assert "window: must be >= 1" in err
    assert not out.exists()
    code, _, err = cli("distill", str(Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"),
                       "--set", f"data={data}", "--set", "model=tiny-random", "--set", "resolution=null",
                       "--resume", str(tmp_path / "no_ckpt"), "--out", str(out))
    assert code == 2 and "not a complete checkpoint" in err and not out.exists()


# ------------------------------------------------------------------------------------------------ batches


def test_micro_batches_of_any_process_count_make_the_same_global_batch(data):
    from clear_cli.data import SynthDataset

    src = BatchSource(SynthDataset(data), seed=3, batch_size=4)
    one = src.micro(5, 0, 0, 1, 1)
    parts = [src.micro(5, m, p, 2, 2) for m in range(2) for p in range(2)]
    assert sum((b.indices for b in parts), []) == one.indices
    for name in ("x0", "noise", "sigmas", "t5", "pooled"):
        assert torch.equal(torch.cat([getattr(b, name) for b in parts]), getattr(one, name)), name
    again = BatchSource(SynthDataset(data), seed=3, batch_size=4).micro(5, 0, 0, 1, 1)  # e.g. after a resume
    assert torch.equal(again.noise, one.noise) and again.indices == one.indices
    assert set(one.sigmas.tolist()) <= set(training_sigmas(1000).tolist())  # unshifted training sigmas


def test_sample_order_walks_seeded_epochs():
    n = 10
    seen = sum((sample_order(0, s, 5, n) for s in range(2)), [])
    assert sorted(seen) == list(range(n))  # one epoch = each sample once
    assert sample_order(0, 2, 5, n) != sample_order(1, 2, 5, n)


def test_packing_is_fluxpipelines():
    from diffusers import FluxPipeline

    z = torch.randn(2, 16, 8, 6)
    packed, ids = pack_latents(z)
    assert packed.shape == (2, 12, 64)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 48, 8), z)
    assert ids[:, 1].tolist() == [r for r in range(4) for _ in range(3)] and ids[:4, 2].tolist() == [0, 1, 2, 0]
