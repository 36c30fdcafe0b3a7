"""`clear export` on the command line: summary, `clear gen` equivalence, one-line errors and no partial files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

WINDOW = 2


def _make_student(path: Path, down_factor: int) -> Path:
    """A tiny 'distilled' student (as in tests/unit/test_export.py): linearized, attention weights perturbed."""
    from clear_cli.attention.linearize import linearize, trainable_attention_parameters
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import save_attention_weights

    pipe = load_pipeline("tiny-random")
    linearize(pipe, window=WINDOW, down_factor=down_factor)
    g = torch.Generator().manual_seed(0)
    params = trainable_attention_parameters(pipe)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * float(p.detach().abs().mean()))
    return save_attention_weights(path, dict(params), {"window": WINDOW, "down_factor": down_factor,
                                                       "base_model": "tiny-random"})


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return _make_student(tmp_path_factory.mktemp("cli_student") / "clear_attn.safetensors", 4)


def test_export_prints_summary_and_writes_default_name(cli, student, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("export", str(student), "--rank", "4", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "clear_lora.safetensors").is_file()
    assert "clear_lora.safetensors (lora, " in out and (" KB, " in out or " MB, " in out)
    assert "rank 4..4" in out and "error of the delta" in out and f"window {WINDOW}, down_factor 4" in out
    assert "4 pooling weight tensor(s)" in out
    # never replaced without --overwrite
    code, _, err = cli("export", str(student), "--rank", "8")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, _, err = cli("export", str(student), "--rank", "8", "--overwrite")
    assert code == 0, err


def test_gen_with_lora_equals_gen_with_full_file(cli, student, tmp_path):
    lora, full = tmp_path / "l.safetensors", tmp_path / "f.safetensors"
    assert cli("export", str(student), "--energy", "1", "--out", str(lora))[0] == 0
    assert cli("export", str(student), "--format", "full", "--out", str(full))[0] == 0
    images = []
    for w in (lora, full, student):
        png = tmp_path / f"{w.stem}.png"
        code, _, err = cli("gen", "a red circle", "--model", "tiny-random", "--weights", str(w), "--res", "128",
                           "--steps", "2", "--out", str(png), "--device", "cpu", "--seed", "3")
        assert code == 0, err
        images.append(np.asarray(Image.open(png), dtype=np.int16))
    assert np.abs(images[0] - images[1]).max() <= 1  # 8-bit rounding of float noise at most
    assert np.array_equal(images[1], images[2])


def _no_leftovers(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before, "a partial or temporary file was left behind"


@pytest.mark.parametrize("args, needle", [
    (["--rank", "0"], "--rank 0"),
    (["--energy", "0"], "--energy 0"),
    (["--energy", "1.5"], "--energy 1.5"),
    (["--energy", "-0.2"], "--energy -0.2"),
    (["--rank", "4", "--energy", "0.9"], "both given"),
    (["--format", "kohya"], "--format 'kohya'"),
])
def test_bad_options_one_line_no_output(cli, student, tmp_path, args, needle):
    before = {p.name for p in tmp_path.iterdir()}
    code, out, err = cli("export", str(student), "--out", str(tmp_path / "x.safetensors"), *args)
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0 and needle in err
    _no_leftovers(tmp_path, before)


def test_bad_files_one_line_no_output(cli, tmp_path):
    from safetensors.torch import save_file

    from clear_cli.models.weights import save_attention_weights

    text = tmp_path / "notes.safetensors"
    text.write_text("not a tensor file")
    other = tmp_path / "unet.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4)}, str(other))
    wide = tmp_path / "wide.safetensors"  # attention weights of a bigger model (hidden 256, tiny has 128)
    save_attention_weights(wide, {"transformer_blocks.0.attn.to_q.weight": torch.zeros(256, 256)},
                           {"window": 2, "down_factor": 1, "base_model": "tiny-random"})
    before = {p.name for p in tmp_path.iterdir()}
    for path, needle in ((text, "not a readable safetensors"), (other, "not an attention-weight file"),
                         (wide, "do not fit tiny-random"), (tmp_path / "missing.safetensors", "does not exist")):
        code, _, err = cli("export", str(path), "--model", "tiny-random", "--out", str(tmp_path / "x.safetensors"))
        assert code != 0 and err.startswith("error: ") and err.strip().count("\n") == 0 and needle in err, err
        _no_leftovers(tmp_path, before)


def test_python_api_is_callable_from_the_package(student, tmp_path):
    import clear_cli
    import clear_cli.jobs.export  # noqa: F401  (importing the job module must not shadow the function)

    res = clear_cli.export(student, format="full", out=tmp_path / "api.safetensors", progress=False)
    assert res.path.is_file() and res.format == "full"
