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


def test_whole_workflow_on_qwen_image(cli, tmp_path):
    """synth -> distill -> export -> gen --weights on qwen-image-tiny-random, through the commands."""
    data, run = tmp_path / "data", tmp_path / "run"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na big blue square on the left of a green star\n")
    code, _, err = cli("synth", "--model", "qwen-image-tiny-random", "--n", "2", "--res", "64", "--steps", "2",
                       "--batch-size", "2", "--prompts", str(prompts), "--out", str(data))
    assert code == 0, err
    card = json.loads((data / "dataset.json").read_text())
    assert card["model"]["family"] == "qwen-image" and set(card["tensors"]) == {
        "t5_embeds", "text_mask", "latent_mean", "latent_std"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: qwen-image-tiny-random\ndata: {data}\nout: {run}\nwindow: 2\nresolution: 64\n"
                      "train: {steps: 3, batch_size: 2, optimizer: adamw, lr: 3.0e-3, schedule: constant, "
                      "warmup_steps: 0, mixed_precision: 'no'}\n"
                      "validation: {prompts: [a red circle], every: 3, steps: 2}\n")
    code, out, err = cli("distill", str(recipe))
    assert code == 0, err
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and all(s["pred"] > 0 and s["attn"] > 0 for s in steps)
    assert {p.parent.name for p in (run / "validation").glob("*/00.png")} == {"teacher", "step_000003"}
    code, _, err = cli("export", str(run / "clear_attn.safetensors"), "--format", "lora", "--rank", "8",
                       "--out", str(tmp_path / "lora.safetensors"))
    assert code == 0, err
    code, out, err = cli("gen", "a red circle", "--model", "qwen-image-tiny-random", "--res", "64", "--steps", "2",
                         "--weights", str(run / "clear_attn.safetensors"), "--out", str(tmp_path / "g.png"))
    assert code == 0, err
    assert Image.open(tmp_path / "g.png").size == (64, 64)
    code, out, err = cli("eval", "--model", "qwen-image-tiny-random", "--student", str(run / "clear_attn.safetensors"),
                         "--n", "2", "--prompts", str(prompts), "--res", "64", "--steps", "2", "--metrics",
                         "psnr,ssim", "--out", str(tmp_path / "eval"))
    assert code == 0, err
    student = json.loads((tmp_path / "eval" / "eval.json").read_text())["students"][0]
    assert student["window"] == 2 and 10 < student["psnr"] < 99 and 0 < student["ssim"] <= 1
