"""CLEAR weights on a derivative (`clear_cli.models.rebase`): a delta against the base they were trained from, the
base's projections read from every kind of source, refusals that name --base, and `gen` / `export --base`."""

from __future__ import annotations

import json

import pytest
import torch

from clear_cli.errors import ClearError, UsageError

PROJ = ("to_q", "to_k", "to_v", "to_out.0")


def _perturbed(pipe, scale: float, seed: int, keys=None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in pipe.transformer.state_dict().items():
        if keys is None or keys(k):
            out[k] = v + scale * float(v.abs().mean() + 1e-3) * torch.randn(v.shape, generator=g)
    return out


def _is_proj(k: str) -> bool:
    return ".attn." in k and any(f".attn.{p}." in k for p in PROJ)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """tiny-random as the base B; a student S distilled from it (projections moved); a derivative M of B (every
    transformer weight fine-tuned) saved as a diffusers folder, once sharded (index.json) and once not."""
    from clear_cli.models import load_pipeline, save_pipeline
    from clear_cli.models.weights import save_attention_weights

    root = tmp_path_factory.mktemp("rebase")
    base = load_pipeline("tiny-random")
    student = {k: v for k, v in _perturbed(base, 0.2, 1, _is_proj).items()}
    s_path = save_attention_weights(root / "clear_attn.safetensors", student,
                                    {"window": 2, "down_factor": 1, "base_model": "tiny-random", "steps": 5})
    deriv = load_pipeline("tiny-random")
    deriv.transformer.load_state_dict(_perturbed(deriv, 0.1, 2))
    m_dir = save_pipeline(deriv, root / "deriv")
    sharded = root / "base_sharded"
    base.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="200KB")
    assert (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return dict(root=root, base=base, student=student, s_path=s_path, deriv=deriv, m_dir=m_dir, sharded=sharded)


def test_names_are_compared_as_models(tmp_path, monkeypatch):
    from clear_cli.models.rebase import same_model

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    assert same_model("m", str(tmp_path / "m")) and same_model("./m/", str(tmp_path / "m"))
    assert same_model("Black-Forest-Labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev")
    snap = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-dev" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert same_model(str(snap), "black-forest-labs/FLUX.1-dev")  # a hub-cache snapshot is its hub id
    assert not same_model("tiny", "tiny-random") and not same_model("m", "black-forest-labs/FLUX.1-dev")


def test_delta_lands_on_the_derivatives_own_projections(world):
    from clear_cli.models.rebase import for_model
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights

    m = str(world["m_dir"])
    with pytest.raises(UsageError) as e:  # trained from tiny-random; the model is another
        for_model(load_attention_weights(world["s_path"]), m)
    line = e.value.one_line()
    assert "trained from tiny-random" in line and "--base tiny-random" in line and "\n" not in line

    w = for_model(load_attention_weights(world["s_path"]), m, "tiny-random")
    assert w.deltas and not w.tensors and w.base_model == "tiny-random" and "delta against tiny-random" in w.describe()
    tr = world["deriv"].transformer
    before = {k: v.clone() for k, v in tr.state_dict().items()}
    base = world["base"].transformer.state_dict()
    previous = apply_attention_weights(tr, w)
    try:
        after = tr.state_dict()
        for k, v in world["student"].items():
            want = before[k] + (v - base[k])  # the derivative's own projections, moved as distillation moved B's
            assert torch.allclose(after[k], want, atol=1e-6), k
            assert (after[k] - v).abs().max() > 1e-3  # not overwritten with the student
        assert all(torch.equal(after[k], before[k]) for k in before if k not in world["student"])
    finally:
        from clear_cli.models.weights import load_tensors

        load_tensors(tr, previous)


def test_every_kind_of_base_source_gives_the_same_delta(world, tmp_path, monkeypatch):
    """tiny-random built, a pipeline folder (one file and sharded), its transformer folder, the single file, the
    index file, and a hub repo (only the shards holding the projections are downloaded)."""
    from clear_cli.models import rebase

    keys = list(world["student"])
    want = {k: world["base"].transformer.state_dict()[k] for k in keys}
    base_dir = tmp_path / "base"
    world["base"].save_pretrained(str(base_dir), safe_serialization=True)
    tr_dir = world["sharded"] / "transformer"
    index = tr_dir / "diffusion_pytorch_model.safetensors.index.json"
    sources = ["tiny-random", str(base_dir), str(base_dir / "transformer"),
               str(base_dir / "transformer" / "diffusion_pytorch_model.safetensors"), str(world["sharded"]),
               str(tr_dir), str(index)]
    weight_map = json.loads(index.read_text())["weight_map"]
    fetched: list[str] = []

    def fake_download(repo_id, filename, cache_dir=None, **_):
        assert repo_id == "someone/flux-tune"
        fetched.append(filename)
        path = world["sharded"] / filename
        if not path.is_file():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(f"{filename} not found")
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    for src in sources + ["someone/flux-tune"]:
        p = rebase.projections(src, keys=keys)
        assert sorted(p) == sorted(keys), src
        for k in keys:
            assert p.shape(k) == tuple(want[k].shape) and torch.equal(p[k], want[k]), (src, k)
    needed = {weight_map[k] for k in keys}
    shards = {f.split("/", 1)[1] for f in fetched if not f.endswith(".json")}
    assert shards == needed and len(set(weight_map.values())) > len(needed)  # the other shards stay on the hub


def test_shipped_tiny_weights_are_read_without_a_pipeline():
    from clear_cli.models import load_pipeline, rebase, tiny

    if not tiny.TINY_WEIGHTS.is_file():
        pytest.skip("trained tiny weights are not in this build")
    p = rebase.projections("tiny")  # its file holds every component under a prefix: only the attention is indexed
    state = load_pipeline("tiny").transformer.state_dict()
    assert p and all(".attn." in k or ".proj_mlp." in k for k in p)
    assert all(torch.equal(p[k], state[k]) for k in p)


def test_bases_that_do_not_fit_are_refused_in_one_line(world, tmp_path):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from clear_cli.models import rebase, tiny
    from clear_cli.models.weights import load_attention_weights

    wide = FluxTransformer2DModel(**{**tiny.TRANSFORMER, "attention_head_dim": 16, "axes_dims_rope": (4, 6, 6)})
    wide.save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ClearError) as e:
        rebase.rebase(load_attention_weights(world["s_path"]), str(tmp_path / "other"))
    assert "does not fit" in e.value.one_line() and "shapes differ" in e.value.one_line()
    bfl = tmp_path / "flux1-tune.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, str(bfl))
    with pytest.raises(UsageError) as e:
        rebase.projections(str(bfl))
    assert "original FLUX layout" in e.value.one_line()
    (tmp_path / "empty").mkdir()
    for bad, needle in (("./nowhere", "does not exist"), ("just-a-name", "neither a local model"),
                        (str(tmp_path / "empty"), "no transformer weights")):
        with pytest.raises(UsageError) as e:
            rebase.projections(bad)
        assert needle in e.value.one_line(), bad


def test_lora_is_relabelled_and_metadata_override_is_said(world, tmp_path):
    from clear_cli.jobs.export import export
    from clear_cli.models.rebase import for_model
    from clear_cli.models.weights import load_attention_weights

    lora = export(world["s_path"], format="lora", energy=1.0, out=tmp_path / "l.safetensors", progress=False).path
    w = load_attention_weights(lora)
    said: list[str] = []
    got = for_model(w, str(world["m_dir"]), "tiny-random", warn=said.append)
    assert got.lora is w.lora and not got.deltas and not said  # a LoRA already is the delta: nothing read
    got = for_model(load_attention_weights(world["s_path"]), str(world["m_dir"]), "tiny", warn=said.append)
    assert said and "say they were trained from tiny-random" in said[0]


def test_export_base_makes_a_lora_that_stacks_on_the_derivative(world, tmp_path):
    """--model DERIV --base B: the LoRA is S - B; loaded with stock diffusers onto M it gives M + (S - B); --format
    full writes M's absolute projections; without --base the mismatch is refused."""
    from clear_cli.jobs.export import export
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import load_attention_weights

    m = str(world["m_dir"])
    with pytest.raises(UsageError) as e:
        export(world["s_path"], format="lora", model=m, out=tmp_path / "no.safetensors", progress=False)
    assert "--base tiny-random" in e.value.one_line() and not (tmp_path / "no.safetensors").exists()

    res = export(world["s_path"], format="lora", energy=1.0, model=m, base="tiny-random", out=tmp_path / "d.safetensors",
                 progress=False)
    assert res.base_model == "tiny-random" and res.model == m and "delta against tiny-random" in res.summary_lines()[0]
    plain = export(world["s_path"], format="lora", energy=1.0, out=tmp_path / "p.safetensors", progress=False)
    a, b = load_attention_weights(res.path), load_attention_weights(plain.path)
    assert a.metadata["model"] == m and a.base_model == "tiny-random"
    assert all(torch.equal(a.lora[k].B @ a.lora[k].A, b.lora[k].B @ b.lora[k].A) for k in b.lora)  # same delta

    stock = load_pipeline(m)
    own = {k: v.clone() for k, v in stock.transformer.state_dict().items()}
    stock.load_lora_weights(str(res.path))
    stock.fuse_lora()
    fused = stock.transformer.state_dict()
    base = world["base"].transformer.state_dict()
    for k, v in world["student"].items():
        key = k if k in fused else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.allclose(fused[key], own[k] + v - base[k], atol=1e-5), k

    full = export(world["s_path"], format="full", model=m, base="tiny-random", out=tmp_path / "f.safetensors",
                  progress=False)
    fw = load_attention_weights(full.path)
    assert fw.base_model == m and fw.metadata["delta_base"] == "tiny-random" and "its projections" in \
        full.summary_lines()[0]
    for k, v in world["student"].items():
        assert torch.allclose(fw.tensors[k], own[k] + v - base[k], atol=1e-6), k


def test_gen_base_on_a_derivative(cli, world, tmp_path):
    from PIL import Image

    m = str(world["m_dir"])
    args = ("gen", "a red circle", "--model", m, "--res", "64", "--steps", "2", "--device", "cpu",
            "--weights", str(world["s_path"]))
    code, _, err = cli(*args, "--out", str(tmp_path / "a.png"))
    assert code == 2 and "--base tiny-random" in err and err.strip().count("\n") == 0
    assert not (tmp_path / "a.png").exists()
    code, out, err = cli(*args, "--base", "tiny-random", "--out", str(tmp_path / "b.png"))
    assert code == 0, err
    assert "as a delta against tiny-random" in out
    assert Image.open(tmp_path / "b.png").text["weights_base"] == "tiny-random"
    code, _, err = cli("gen", "a cat", "--model", "tiny-random", "--res", "64", "--steps", "2", "--device", "cpu",
                       "--base", "tiny", "--out", str(tmp_path / "c.png"))
    assert code == 2 and "--base names the model the --weights were trained from" in err


def test_gen_with_an_exported_delta_lora_equals_the_rebased_file(world, tmp_path):
    """The two routes to a derivative agree: the full file rebased at load time, and the LoRA exported with --base."""
    import numpy as np

    import clear_cli
    from clear_cli.jobs.export import export
    from clear_cli.models import load_pipeline

    m = str(world["m_dir"])
    lora = export(world["s_path"], format="lora", energy=1.0, model=m, base="tiny-random", out=tmp_path / "l.safetensors",
                  progress=False).path
    pipe = load_pipeline(m)
    imgs = []
    for name, w in (("full", world["s_path"]), ("lora", lora)):
        (res,) = clear_cli.generate(["a red circle"], model=m, res="64", steps=2, weights=str(w), base="tiny-random",
                                    out=str(tmp_path / f"{name}.png"), pipe=pipe, progress=False, device="cpu")
        imgs.append(np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(res.path), dtype=int))
    assert np.abs(imgs[0] - imgs[1]).max() <= 1


def test_python_api_names(world):
    import clear_cli

    w = clear_cli.rebase(clear_cli.load_attention_weights(world["s_path"]), "tiny-random")
    assert w.deltas and clear_cli.apply_attention_weights.__module__ == "clear_cli.models.weights"
