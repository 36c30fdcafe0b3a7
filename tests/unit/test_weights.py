"""One reader for every attention-weight format (ours, published, LoRA), geometry clashes, fitting the model."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from clear_cli.errors import ClearError, UsageError
from clear_cli.models import weights as W


@pytest.fixture(scope="module")
def transformer():
    from diffusers import FluxTransformer2DModel

    from clear_cli.models import tiny

    torch.manual_seed(0)
    return FluxTransformer2DModel(**tiny.TRANSFORMER).eval()


def _attn_state(tr, scale: float = 0.0) -> dict[str, torch.Tensor]:
    """The image-branch projections, shifted by `scale` so a load is visible."""
    keys = [k for k in tr.state_dict() if ".attn.to_" in k and ".to_add_out" not in k]
    return {k: tr.state_dict()[k].clone() + scale for k in keys}


def _pool(f: int) -> torch.Tensor:
    return torch.rand(1, 1, 1, f, 1, f, 1)


def test_ours_with_metadata_round_trips(tmp_path, transformer):
    tensors = _attn_state(transformer, 0.5)
    path = W.save_attention_weights(tmp_path / "clear_attn.safetensors", tensors,
                                    {"window": 8, "down_factor": 1, "base_model": "tiny", "steps": 100,
                                     "recipe_hash": "abc"})
    assert not [p for p in tmp_path.iterdir() if p.name != "clear_attn.safetensors"]  # no temp file left
    w = W.load_attention_weights(path)
    assert (w.kind, w.window, w.down_factor, w.base_model) == ("clear", 8, 1, "tiny")
    assert w.origin["window"] == "metadata" and w.metadata["steps"] == "100"
    assert w.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    try:
        previous = W.apply_attention_weights(transformer, w)
        sd = transformer.state_dict()
        for k, v in tensors.items():
            assert torch.equal(sd[k], v)
        assert torch.equal(sd["x_embedder.weight"], before["x_embedder.weight"])
    finally:
        W.load_tensors(transformer, previous)
    assert all(torch.equal(transformer.state_dict()[k], before[k]) for k in tensors)


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_published_geometry_from_name_and_pool_shape(tmp_path, transformer, prefix):
    from clear_cli import linearize, unlinearize

    tensors = _attn_state(transformer, 0.25)
    pools = {f"{a}.attn.processor.spatial_weight": _pool(4) for a in
             ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
              "single_transformer_blocks.1")}
    path = tmp_path / "clear_local_8_down_4.safetensors"
    from safetensors.torch import save_file

    save_file({prefix + k: v.contiguous() for k, v in {**tensors, **pools}.items()}, str(path))  # no metadata
    w = W.load_attention_weights(path)
    assert (w.kind, w.window, w.down_factor) == ("published", 8, 4)
    assert w.origin == {"window": "file name", "down_factor": "file name"}
    assert all(not k.startswith("transformer.") for k in w.tensors)
    with pytest.raises(ClearError, match="no down-sampling processors") as e:
        W.materialize(transformer, w)  # pooling weights need the processors
    assert "linearize with down_factor 4" in e.value.hint
    linearize(transformer, window=8, down_factor=4)
    try:
        previous = W.apply_attention_weights(transformer, w)
        sd = transformer.state_dict()
        for k, v in pools.items():
            assert torch.equal(sd[k], v)
        W.load_tensors(transformer, {k: v for k, v in previous.items() if k in tensors})
    finally:
        unlinearize(transformer)


def test_published_without_name_needs_window_never_guessed(tmp_path, transformer):
    from safetensors.torch import save_file

    path = tmp_path / "my_ckpt.safetensors"
    save_file({**_attn_state(transformer), "transformer_blocks.0.attn.processor.spatial_weight": _pool(2)},
              str(path))
    w = W.load_attention_weights(path)
    assert w.window is None and w.down_factor == 2 and w.origin["down_factor"] == "pooling weights' shape"
    with pytest.raises(UsageError, match="do not say their window") as e:
        W.resolve_geometry(w, None, None)
    assert "--window" in e.value.hint
    assert W.resolve_geometry(w, 12, None) == (12, 2)


def test_name_and_pool_shape_must_agree(tmp_path, transformer):
    from safetensors.torch import save_file

    path = tmp_path / "clear_local_16_down_4.safetensors"
    save_file({"transformer_blocks.0.attn.processor.spatial_weight": _pool(2),
               "transformer_blocks.0.attn.to_q.weight": torch.zeros(128, 128)}, str(path))
    with pytest.raises(ClearError, match="down_factor 4 but the pooling weights are 2x2"):
        W.load_attention_weights(path)
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(128, 128)},
              str(tmp_path / "clear_local_8_down_4.safetensors"))
    with pytest.raises(ClearError, match="no pooling weights"):
        W.load_attention_weights(tmp_path / "clear_local_8_down_4.safetensors")


def test_lora_materializes_to_base_plus_delta(tmp_path, transformer):
    torch.manual_seed(1)
    a, b = torch.randn(3, 128), torch.randn(128, 3)
    bias = torch.randn(128)
    a2, b2 = torch.randn(2, 128), torch.randn(128, 2)
    pool = _pool(2)
    tensors = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
        "transformer.transformer_blocks.0.attn.to_q.lora_B.bias": bias,
        "transformer.single_transformer_blocks.1.attn.to_v.lora_A.weight": a2,
        "transformer.single_transformer_blocks.1.attn.to_v.lora_B.weight": b2,
        W.pool_key("transformer_blocks.1.attn.processor.spatial_weight"): pool,
    }
    assert not any("processor" in k or "alpha" in k for k in tensors)  # diffusers' loader would pick another path
    path = W.save_attention_weights(tmp_path / "clear_lora.safetensors", tensors,
                                    {"window": 16, "down_factor": 2, "base_model": "tiny", "ranks": {"x": 3}})
    w = W.load_attention_weights(path)
    assert (w.kind, w.window, w.down_factor) == ("lora", 16, 2)
    assert set(w.lora) == {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_v"}
    assert set(w.tensors) == {"transformer_blocks.1.attn.processor.spatial_weight"}
    from clear_cli import linearize, unlinearize

    linearize(transformer, window=16, down_factor=2)
    try:
        full = W.materialize(transformer, w)
    finally:
        unlinearize(transformer)
    sd = transformer.state_dict()
    torch.testing.assert_close(full["transformer_blocks.0.attn.to_q.weight"],
                               sd["transformer_blocks.0.attn.to_q.weight"] + b @ a)
    torch.testing.assert_close(full["transformer_blocks.0.attn.to_q.bias"],
                               sd["transformer_blocks.0.attn.to_q.bias"] + bias)
    torch.testing.assert_close(full["single_transformer_blocks.1.attn.to_v.weight"],
                               sd["single_transformer_blocks.1.attn.to_v.weight"] + b2 @ a2)
    assert "single_transformer_blocks.1.attn.to_v.bias" not in full  # no bias delta: bias untouched
    assert torch.equal(full["transformer_blocks.1.attn.processor.spatial_weight"], pool)


def test_lora_that_does_not_fit_names_the_module(tmp_path, transformer):
    path = W.save_attention_weights(tmp_path / "l.safetensors", {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 64),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 2),
    }, {"window": 8})
    with pytest.raises(ClearError, match=r"transformer_blocks\.0\.attn\.to_q \(model \[128, 128\], LoRA \[128, 64\]"):
        W.materialize(transformer, W.load_attention_weights(path))


def test_geometry_clash_refused_unless_forced(tmp_path, transformer):
    path = W.save_attention_weights(tmp_path / "a.safetensors", _attn_state(transformer), {"window": 16})
    w = W.load_attention_weights(path)
    assert W.resolve_geometry(w, None, None) == (16, 1)
    assert W.resolve_geometry(w, 16, 1) == (16, 1)
    with pytest.raises(UsageError, match="--window 8 clashes with the weights \\(window 16 from the metadata"):
        W.resolve_geometry(w, 8, None)
    with pytest.raises(UsageError, match="--down-factor 4 clashes"):
        W.resolve_geometry(w, None, 4)
    notes: list[str] = []
    assert W.resolve_geometry(w, 8, None, force=True, notes=notes) == (8, 1)
    assert "--force" in notes[0]
    assert W.resolve_geometry(None, None, None) == (16, 1)
    with pytest.raises(UsageError, match="--window 0 must be at least 1"):
        W.resolve_geometry(None, 0, None)


def test_keys_that_do_not_fit_are_named(tmp_path, transformer):
    bad = W.save_attention_weights(tmp_path / "bad.safetensors", {
        "transformer_blocks.7.attn.to_q.weight": torch.zeros(128, 128),
        "single_transformer_blocks.0.attn.to_out.0.weight": torch.zeros(128, 128),
    }, {"window": 8})
    with pytest.raises(ClearError, match=r"2 key\(s\) it does not have \(.*transformer_blocks\.7\.attn\.to_q"):
        W.apply_attention_weights(transformer, W.load_attention_weights(bad))
    shape = W.save_attention_weights(tmp_path / "shape.safetensors",
                                     {"transformer_blocks.0.attn.to_q.weight": torch.zeros(64, 128)}, {"window": 8})
    with pytest.raises(ClearError, match=r"shapes differ for transformer_blocks\.0\.attn\.to_q\.weight"):
        W.apply_attention_weights(transformer, W.load_attention_weights(shape))
    other = W.save_attention_weights(tmp_path / "other.safetensors", {"x_embedder.weight": torch.zeros(2, 2)})
    with pytest.raises(ClearError, match="not an attention-weight file.*x_embedder.weight"):
        W.load_attention_weights(other)


def test_unreadable_missing_and_hub_specs(tmp_path, monkeypatch):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        W.load_attention_weights(junk)
    with pytest.raises(UsageError, match="does not exist"):
        W.load_attention_weights(tmp_path / "nope.safetensors")
    with pytest.raises(UsageError, match="is a directory"):
        W.load_attention_weights(tmp_path)

    local = W.save_attention_weights(tmp_path / "hub" / "clear_local_32.safetensors",
                                     {"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)})
    calls = []

    def fake_download(repo_id, filename, cache_dir=None, local_files_only=False):
        calls.append((repo_id, filename, cache_dir, local_files_only))
        if local_files_only:  # not cached yet: the real client raises LocalEntryNotFoundError
            raise OSError("not in the cache")
        return str(local)

    import huggingface_hub

    import clear_cli.network

    monkeypatch.setattr(clear_cli.network, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    w = W.load_attention_weights("Huage001/CLEAR:clear_local_32.safetensors", cache_dir=tmp_path / "cache")
    assert calls == [("Huage001/CLEAR", "clear_local_32.safetensors", str(tmp_path / "cache"), True),
                     ("Huage001/CLEAR", "clear_local_32.safetensors", str(tmp_path / "cache"), False)]
    assert (w.window, w.down_factor, w.source) == (32, 1, "Huage001/CLEAR:clear_local_32.safetensors")

    def offline(repo_id, filename, cache_dir=None, local_files_only=False):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ClearError, match="could not download clear_local_8.safetensors from Huage001/CLEAR"):
        W.load_attention_weights("Huage001/CLEAR:clear_local_8.safetensors")


def test_writer_encodes_metadata_as_json_strings(tmp_path):
    from safetensors import safe_open

    path = W.save_attention_weights(tmp_path / "m.safetensors", {"a": torch.ones(1)},
                                    {"window": 16, "base_model": "tiny", "ranks": {"x": 4}, "skip": None})
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta == {"window": "16", "base_model": "tiny", "ranks": json.dumps({"x": 4}), "tensor_count": "1"}
    assert W.processor_key(W.pool_key("single_transformer_blocks.3.attn.processor.spatial_weight")) == \
        "single_transformer_blocks.3.attn.processor.spatial_weight"


def test_saving_the_same_weights_twice_gives_identical_bytes(tmp_path):
    """The file's sha256 keys caches (eval): equal tensors + metadata must give equal bytes in any process."""
    import hashlib
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from clear_cli.models.weights import save_attention_weights, load_attention_weights\n"
        "t = {f'transformer_blocks.{i}.attn.to_q.weight': torch.arange(12.).reshape(3, 4) + i for i in range(3)}\n"
        "meta = {'window': 4, 'down_factor': 1, 'base_model': 'tiny', 'steps': 3, 'recipe_hash': 'ab', 'x': 'y'}\n"
        "save_attention_weights(sys.argv[1], t, meta)\n"
        "w = load_attention_weights(sys.argv[1])\n"
        "assert torch.equal(w.tensors['transformer_blocks.2.attn.to_q.weight'], t['transformer_blocks.2.attn.to_q.weight'])\n"
    )
    digests = set()
    for i in range(3):  # separate processes: hash-map order differs between processes, not within one
        p = tmp_path / f"w{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, timeout=120)
        digests.add(hashlib.sha256(p.read_bytes()).hexdigest())
    assert len(digests) == 1
