"""Bad inputs met mid-run before: NaN/inf settings, damaged weight files and datasets, settings the device cannot
run, outputs that are the input. Each is refused before any work with one line, and nothing is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import GEN, SYNTH, TINY, distill_args, eval_args, one_error


@pytest.mark.parametrize("args, option", [
    ([*SYNTH, "--guidance", "nan"], "--guidance"),
    ([*SYNTH, "--guidance", "inf"], "--guidance"),
    ([*GEN, "--guidance", "nan"], "--guidance"),
    ([*GEN, "--strength", "-inf"], "--strength"),
    ([*GEN, "--refine-guidance", "nan"], "--refine-guidance"),
    (["tiny", "train", "--minutes", "nan"], "--minutes"),
    (["tiny", "video-train", "--minutes", "nan"], "--minutes"),
    (["tiny", "video-check", "--guidance", "inf"], "--guidance"),
])
def test_non_finite_options_are_refused(cli, tmp_path, args, option):
    status, _, err = cli(*args, "--out", str(tmp_path / "o"))
    assert status == 2
    one_error(err, option, "not a finite number")
    assert not (tmp_path / "o").exists()


def test_non_finite_eval_guidance(cli, tmp_path, tiny_weights):
    status, _, err = cli(*eval_args(tiny_weights, tmp_path / "e", "--guidance", "nan"))
    assert status == 2
    one_error(err, "--guidance", "not a finite number")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_recipe_values_are_refused(cli, tmp_path, tiny_data, value):
    status, _, err = cli(*distill_args(tiny_data, "--set", f"train.lr={value}"), "--out", str(tmp_path / "d"))
    assert status == 2
    one_error(err, "train.lr", "not a finite number")
    assert not (tmp_path / "d").exists()


def test_recipe_that_is_not_text(cli, tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_bytes(bytes(range(256)))
    status, _, err = cli("distill", str(bad))
    assert status == 2
    one_error(err, str(bad), "not a text file")


def _poisoned(src: Path, dst: Path, edit) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _nan_in(name: str):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
    return edit


@pytest.mark.parametrize("command", ["gen", "export", "eval"])
def test_weights_holding_nan_are_refused_naming_the_tensor(cli, tmp_path, tiny_weights, command):
    from safetensors import safe_open

    with safe_open(str(tiny_weights), "pt") as f:
        name = sorted(f.keys())[5]
    bad = _poisoned(tiny_weights, tmp_path / "nan.safetensors", _nan_in(name))
    args = {"gen": [*GEN, "--weights", str(bad), "--out", str(tmp_path / "g")],
            "export": ["export", str(bad), "--out", str(tmp_path / "x.safetensors")],
            "eval": eval_args(bad, tmp_path / "e")}[command]
    status, _, err = cli(*args)
    assert status == 1
    one_error(err, name, "NaN or inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors"]


def test_weights_that_lost_a_tensor_are_refused(cli, tmp_path, tiny_weights):
    bad = _poisoned(tiny_weights, tmp_path / "cut.safetensors", lambda t: t.pop(sorted(t)[0]))
    status, _, err = cli(*GEN, "--weights", str(bad), "--out", str(tmp_path / "g"))
    assert status == 1
    one_error(err, "lost tensors")


def test_truncated_weights_are_refused(cli, tmp_path, tiny_weights):
    bad = tmp_path / "half.safetensors"
    data = tiny_weights.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    status, _, err = cli("export", str(bad), "--out", str(tmp_path / "x.safetensors"))
    assert status == 2
    one_error(err, str(bad), "not a readable safetensors file")


def _damaged_copy(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    shard = dst / "tensors" / "chunk-00000001.safetensors"
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "bit flip":
        data = bytearray(shard.read_bytes())
        data[-50] ^= 0x10
        shard.write_bytes(bytes(data))
    elif how == "missing":
        shard.unlink()
    elif how == "path outside":
        m = dst / "manifest.jsonl"
        m.write_text(m.read_text().replace('"images/00000000.png"', '"../../../etc/passwd"'))
    elif how == "manifest garbage":
        (dst / "manifest.jsonl").write_bytes(b"\xff\xfe not json\n")
    return dst


@pytest.mark.parametrize("how", ["truncated", "bit flip", "missing", "path outside", "manifest garbage"])
def test_distill_refuses_a_damaged_dataset_before_training(cli, tmp_path, tiny_data, how):
    data = _damaged_copy(tiny_data, tmp_path / "data", how)
    status, _, err = cli(*distill_args(data), "--out", str(tmp_path / "d"))
    assert status == 2
    one_error(err, str(data), "--verify", "--repair")
    assert not (tmp_path / "d").exists()


def test_synth_verify_finds_the_bit_flip_distill_refused(cli, tmp_path, tiny_data):
    data = _damaged_copy(tiny_data, tmp_path / "data", "bit flip")
    status, out, _ = cli("synth", "--verify", str(data))
    assert status != 0
    assert "hash mismatch" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
@pytest.mark.parametrize("more, needle", [
    (["--set", "train.mixed_precision=fp16"], "fp16"),
    (["--set", "backend=flex"], "flex"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_distill_settings_the_cpu_cannot_run(cli, tmp_path, tiny_data, more, needle):
    status, _, err = cli(*distill_args(tiny_data, *more), "--out", str(tmp_path / "d"))
    assert status == 2
    one_error(err, needle)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("command", ["train", "video-train"])
@pytest.mark.parametrize("option", ["--threads", "--steps", "--batch-size", "--vae-steps"])
def test_tiny_train_counts_checked_before_the_first_step(cli, tmp_path, command, option):
    status, _, err = cli("tiny", command, "--out", str(tmp_path / "t"), option, "0")
    assert status == 2
    one_error(err, f"{option} 0", "at least 1")
    assert not (tmp_path / "t").exists()


def test_synth_refuses_an_n_it_cannot_index(cli, tmp_path):
    status, _, err = cli(*SYNTH[:-6], "--n", str(10**11), "--out", str(tmp_path / "s"))
    assert status == 2
    one_error(err, "--n")


def test_export_never_replaces_its_input(cli, tmp_path, tiny_weights):
    mine = tmp_path / "mine.safetensors"
    shutil.copy(tiny_weights, mine)
    before = mine.read_bytes()
    status, _, err = cli("export", str(mine), "--out", str(mine), "--overwrite")
    assert status == 2
    one_error(err, "is the input")
    assert mine.read_bytes() == before


@pytest.mark.parametrize("name", ["lora.pt", "lora.bin", "lora"])
def test_export_names_weights_safetensors(cli, tmp_path, tiny_weights, name):
    status, _, err = cli("export", str(tiny_weights), "--out", str(tmp_path / name))
    assert status == 2
    one_error(err, ".safetensors")
    assert list(tmp_path.iterdir()) == []


def test_gen_names_images_png(cli, tmp_path):
    status, _, err = cli(*GEN, "--out", str(tmp_path / "x.jpg"))
    assert status == 2
    one_error(err, "PNG")


def test_distill_resume_auto_before_the_first_checkpoint_starts_over(cli, tmp_path, tiny_data):
    out = tmp_path / "d"
    assert cli(*distill_args(tiny_data), "--out", str(out))[0] == 0
    # as if stopped before its first checkpoint: the recipe and a log, no checkpoint, no weights
    shutil.rmtree(out / "checkpoints")
    (out / "clear_attn.safetensors").unlink()
    (out / "notes.txt").write_text("mine")
    status, _, err = cli(*distill_args(tiny_data), "--out", str(out))
    assert status == 2
    one_error(err, "--resume auto")
    status, _, err = cli(*distill_args(tiny_data), "--out", str(out), "--resume", "auto")
    assert status == 0, err
    import json

    steps = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines() if '"step"' in ln]
    assert steps == sorted(set(steps))  # every step once: the stale log was trimmed, not appended to
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_auto_never_replaces_finished_weights_without_checkpoints(cli, tmp_path, tiny_data):
    out = tmp_path / "d"
    assert cli(*distill_args(tiny_data), "--out", str(out))[0] == 0
    shutil.rmtree(out / "checkpoints")
    before = (out / "clear_attn.safetensors").read_bytes()
    status, _, err = cli(*distill_args(tiny_data), "--out", str(out), "--resume", "auto")
    assert status == 2
    one_error(err, "--overwrite")
    assert (out / "clear_attn.safetensors").read_bytes() == before
