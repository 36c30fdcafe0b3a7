"""Commands on `qwen-image-tiny-random`, and `--model` naming a family without an adapter."""

from __future__ import annotations

import json

import pytest
from PIL import Image


def test_gen_cascade_on_qwen_image(cli, tmp_path):
    out = tmp_path / "q.png"
    code, stdout, err = cli("gen", "a red circle", "--model", "qwen-image-tiny-random", "--res", "256", "--window",
                            "4", "--steps", "2", "--refine-steps", "2", "--out", str(out))
    assert code == 0, err
    assert Image.open(out).size == (256, 256)
    text = stdout + err
    assert "128x128 -> 256x256 (cascade)" in text and "CLEAR r=4" in text and "full attention" in text


@pytest.mark.parametrize("command", [["gen", "a cat", "--res", "64"], ["model", "info"]])
def test_model_of_a_family_without_adapter_is_one_line_exit_2(cli, tmp_path, command):
    d = tmp_path / "sd35"
    d.mkdir()
    (d / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    code, _, err = cli(*command, "--model", str(d), *(["--out", str(tmp_path / "o")] if command[0] == "gen" else []))
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "no CLEAR model adapter" in lines[0] and "families: qwen-image, chroma, flux" in lines[0]


def test_model_info_on_qwen_image(cli):
    code, out, err = cli("model", "info", "--model", "qwen-image-tiny-random")
    assert code == 0, err
    assert "family qwen-image" in out and "2 attention blocks, 3 heads x 16" in out


def test_synth_on_qwen_image_is_refused_in_one_line(cli, tmp_path):
    code, _, err = cli("synth", "--model", "qwen-image-tiny-random", "--n", "2", "--res", "64",
                       "--out", str(tmp_path / "d"))
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "clear synth does not run on qwen-image models yet" in lines[0], err
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
