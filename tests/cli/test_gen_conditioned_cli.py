"""`clear gen --image / --mask / --control / --kontext` on tiny-random (64x96 px, 2 steps), in-process."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

FAST = ("--model", "tiny-random", "--steps", "2", "--device", "cpu")


def _write(path, w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    if mode == "L":
        a = np.zeros((h, w), dtype=np.uint8)
        a[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    else:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(a).save(path)
    return str(path)


def _png(path):
    im = Image.open(path)
    im.load()
    return im


@pytest.fixture
def pics(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    return {"image": _write(d / "image.png", 96, 64, 1), "other": _write(d / "other.png", 96, 64, 2),
            "mask": _write(d / "mask.png", 96, 64, 0, "L"), "ref": _write(d / "ref.png", 64, 48, 3),
            "odd": _write(d / "odd.png", 100, 70, 4), "text": str(d / "not.png")}


def test_img2img_takes_the_image_size_and_depends_on_the_image(cli, tmp_path, pics):
    out = tmp_path / "o"
    # strength 0.5 of 2 steps: one step from the image (diffusers starts at sigma 1 above 2 x 0.5)
    code, so, err = cli("gen", "a red circle", "--image", pics["image"], *FAST, "--out", str(out / "a.png"),
                        "--window", "2", "--compare", "--strength", "0.5")
    assert code == 0, err
    assert "plan: FluxImg2ImgPipeline at 96x64 (direct)" in so and "compare: CLEAR vs full attention PSNR" in so
    im = _png(out / "a.png")
    assert im.size == (96, 64) and im.text["pipeline"] == "FluxImg2ImgPipeline" and im.text["strength"] == "0.5"
    assert (out / "a_full.png").is_file() and (out / "a_compare.png").is_file()
    code, _, err = cli("gen", "a red circle", "--image", pics["other"], *FAST, "--out", str(out / "b.png"),
                       "--window", "2", "--strength", "0.5")
    assert code == 0, err
    assert not np.array_equal(np.asarray(_png(out / "a.png")), np.asarray(_png(out / "b.png")))
    # a size that is not a multiple of 16 is floored to one
    code, so, err = cli("gen", "a red circle", "--image", pics["odd"], *FAST, "--out", str(out / "c.png"))
    assert code == 0, err
    assert _png(out / "c.png").size == (96, 64)


def test_inpaint_with_a_mask(cli, tmp_path, pics):
    code, so, err = cli("gen", "a red circle", "--image", pics["image"], "--mask", pics["mask"], "--strength", "1",
                        *FAST, "--out", str(tmp_path / "i.png"))
    assert code == 0, err
    assert "FluxInpaintPipeline" in so
    im = _png(tmp_path / "i.png")
    assert im.text["pipeline"] == "FluxInpaintPipeline" and im.text["mask"] == pics["mask"]


def test_kontext_reference_of_another_size(cli, tmp_path, pics):
    code, so, err = cli("gen", "a red circle", "--image", pics["ref"], "--kontext", "--res", "96x64", *FAST,
                        "--out", str(tmp_path / "k.png"), "--window", "2")
    assert code == 0, err
    assert "plan: FluxKontextPipeline at 96x64" in so
    assert _png(tmp_path / "k.png").size == (96, 64)


def test_controlnet_with_a_control_image(cli, tmp_path, pics):
    code, so, err = cli("gen", "a red circle", "--control", pics["image"], "--controlnet", "tiny-random", *FAST,
                        "--out", str(tmp_path / "c.png"), "--window", "2")
    assert code == 0, err
    assert "plan: FluxControlNetPipeline at 96x64" in so
    im = _png(tmp_path / "c.png")
    assert im.size == (96, 64) and im.text["controlnet"] == "tiny-random"


@pytest.mark.parametrize("args, words", [
    (["--mask", "MASK"], "--mask needs --image"),
    (["--kontext"], "--kontext makes --image a reference image"),
    (["--image", "IMAGE", "--kontext", "--mask", "MASK"], "--kontext takes --image only"),
    (["--control", "IMAGE"], "--control needs --controlnet MODEL"),
    (["--controlnet", "tiny-random"], "--controlnet needs --control FILE"),
    (["--image", "MISSING"], "no such file"),
    (["--image", "TEXT"], "not an image"),
])
def test_bad_combinations_are_one_line(cli, tmp_path, pics, args, words):
    (tmp_path / "in" / "not.png").write_text("hello")
    subs = {"MASK": pics["mask"], "IMAGE": pics["image"], "MISSING": str(tmp_path / "nope.png"),
            "TEXT": pics["text"]}
    code, so, err = cli("gen", "x", *[subs.get(a, a) for a in args], *FAST, "--out", str(tmp_path / "o"))
    assert code != 0
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_weights_apply_to_a_conditioned_run(cli, tmp_path, pics, tiny_random_pipe):
    import torch

    from clear_cli.models.weights import save_attention_weights

    sd = tiny_random_pipe.transformer.state_dict()
    g = torch.Generator().manual_seed(0)
    student = {k: sd[k] + 0.05 * torch.randn(sd[k].shape, generator=g)
               for k in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.1.attn.to_k.weight")}
    f = save_attention_weights(tmp_path / "clear_attn.safetensors", student,
                               {"window": 8, "down_factor": 1, "base_model": "tiny-random"})
    args = ("gen", "a red circle", "--image", pics["ref"], "--kontext", "--res", "96x64", *FAST)
    code, so, err = cli(*args, "--out", str(tmp_path / "w.png"), "--weights", str(f))
    assert code == 0, err
    assert "window 8" in so and "zero-shot" not in err
    assert len(_png(tmp_path / "w.png").text["weights_sha256"]) == 64
    code, _, err = cli(*args, "--out", str(tmp_path / "z.png"), "--window", "8")
    assert code == 0, err
    assert not np.array_equal(np.asarray(_png(tmp_path / "w.png")), np.asarray(_png(tmp_path / "z.png")))


def test_a_fill_model_takes_image_and_mask(cli, tmp_path, pics):
    import torch
    from diffusers import FluxTransformer2DModel

    from clear_cli.models import tiny
    from clear_cli.models.pipeline import FluxPipeline, save_pipeline

    comps = tiny.build_components(seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)   # FLUX.1-Fill's transformer: latents + masked image + mask in
        comps["transformer"] = FluxTransformer2DModel(**{**tiny.TRANSFORMER, "in_channels": 384,
                                                         "out_channels": 64}).eval()
    model = save_pipeline(FluxPipeline(**comps), tmp_path / "fill")
    run = ("gen", "a red circle", "--model", str(model), "--steps", "2", "--device", "cpu")
    code, so, err = cli(*run, "--image", pics["image"], "--mask", pics["mask"], "--out", str(tmp_path / "f.png"))
    assert code == 0, err
    assert "plan: FluxFillPipeline at 96x64" in so and _png(tmp_path / "f.png").text["pipeline"] == "FluxFillPipeline"
    code, _, err = cli(*run, "--image", pics["image"], "--out", str(tmp_path / "g.png"))
    assert code == 2 and "FLUX.1-Fill (in_channels 384): it needs --image and --mask" in err
    assert not (tmp_path / "g.png").exists()
