"""`clear gen` end to end on tiny-random (64-128 px, 2 steps), in-process."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

FAST = ("--model", "tiny-random", "--steps", "2", "--device", "cpu")


def _png(path):
    im = Image.open(path)
    im.load()
    return im


def test_gen_writes_png_with_settings(cli, tmp_path):
    code, out, err = cli("gen", "a blue plane", "--res", "64", *FAST, "--out", str(tmp_path))
    assert code == 0, err
    path = tmp_path / "a-blue-plane_0.png"
    im = _png(path)
    assert im.size == (64, 64)
    info = im.text
    assert info["prompt"] == "a blue plane" and info["seed"] == "0" and info["model"] == "tiny-random"
    assert info["window"] == "16" and info["down_factor"] == "1" and info["steps"] == "2" and info["size"] == "64x64"
    assert info["weights"].startswith("none") and info["attention"] == "clear"
    stages = json.loads(info["stages"])
    assert [s["kind"] for s in stages] == ["direct"] and stages[0]["start_sigma"] == pytest.approx(1.0)
    assert "zero-shot" in err and "start sigma 1.000" in out and "% saved" in out
    assert [p.name for p in tmp_path.iterdir()] == ["a-blue-plane_0.png"]  # no temp files left


def test_gen_cascade_plan_and_stage_lines(cli, tmp_path):
    code, out, err = cli("gen", "a red circle", "--res", "128", "--base-res", "64", "--refine-steps", "4", *FAST,
                         "--seed", "3", "--num-images", "2", "--out", str(tmp_path))
    assert code == 0, err
    assert "plan: 64x64 -> 128x128 (cascade)" in out
    assert "stage 1/2 base   64x64" in out and "full attention" in out
    assert "stage 2/2 refine 128x128" in out and "NTK x10" in out and "strength 0.7" in out
    for seed in (3, 4):
        im = _png(tmp_path / f"a-red-circle_{seed}.png")
        assert im.size == (128, 128)
        stages = json.loads(im.text["stages"])
        assert [(s["kind"], s["attention"]) for s in stages] == [("base", "full"), ("refine", "clear")]
        assert 0.7 <= stages[1]["start_sigma"] < 0.9 and stages[1]["steps"] == 3  # round(4 * 0.7)
    a = np.asarray(_png(tmp_path / "a-red-circle_3.png"))
    b = np.asarray(_png(tmp_path / "a-red-circle_4.png"))
    assert not np.array_equal(a, b)  # different seeds


def test_gen_never_overwrites_without_flag(cli, tmp_path):
    target = tmp_path / "one.png"
    code, _, err = cli("gen", "a cat", "--res", "64", *FAST, "--out", str(target))
    assert code == 0, err
    before = target.stat().st_mtime_ns
    time.sleep(0.01)
    code, _, err = cli("gen", "a cat", "--res", "64", *FAST, "--out", str(target))
    assert code == 2 and err.strip().startswith("error:") and "already exists" in err and "--overwrite" in err
    assert target.stat().st_mtime_ns == before
    code, _, err = cli("gen", "a cat", "--res", "64", *FAST, "--out", str(target), "--overwrite")
    assert code == 0, err


@pytest.mark.parametrize("args,fragment", [
    (["a cat", "--res", "1000"], "not a multiple of 16"),
    (["a cat", "--res", "0"], "must be positive"),
    (["a cat", "--window", "0"], "--window 0 must be at least 1"),
    ([""], "prompt is empty"),
    ([], "no prompt given"),
    (["a cat", "--weights", "JUNK"], "not a readable safetensors file"),
    (["a cat", "--weights", "missing.safetensors"], "does not exist"),
    (["a cat", "--strength", "1.5"], "--strength 1.5 must be in (0, 1]"),
    (["a cat", "--offload"], "--offload needs a CUDA device"),
    (["a cat", "--out", "x.jpg"], "images are written as PNG"),
])
def test_gen_bad_input_one_line_no_file(cli, tmp_path, args, fragment):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00garbage")
    args = [str(junk) if a == "JUNK" else str(tmp_path / a) if a == "x.jpg" else a for a in args]
    out_dir = tmp_path / "out"
    code, _, err = cli("gen", *args, *FAST, *([] if "--out" in args else ["--out", str(out_dir)]))
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_gen_compare_writes_both_and_metrics(cli, tmp_path):
    code, out, err = cli("gen", "a blue plane", "--res", "64", *FAST, "--window", "1", "--compare",
                         "--out", str(tmp_path))
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["a-blue-plane_0.png", "a-blue-plane_0_compare.png", "a-blue-plane_0_full.png"]
    both = _png(tmp_path / "a-blue-plane_0_compare.png")
    assert both.size == (128, 64)
    assert "PSNR" in out and "SSIM" in out
    assert float(both.text["ssim"]) < 1.0  # window 1: CLEAR differs from full attention
    assert _png(tmp_path / "a-blue-plane_0_full.png").text["attention"] == "full"


def _student_files(tmp_path, pipe, window=8):
    """A full attention-weight file and a full-rank LoRA of the same student (to_q of two blocks perturbed)."""
    from clear_cli.models.weights import save_attention_weights

    sd = pipe.transformer.state_dict()
    g = torch.Generator().manual_seed(0)
    full, lora = {}, {}
    for mod in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_k"):
        w = sd[f"{mod}.weight"]
        delta = 0.05 * torch.randn(w.shape, generator=g)
        dbias = 0.05 * torch.randn(w.shape[0], generator=g)
        full[f"{mod}.weight"] = w + delta
        full[f"{mod}.bias"] = sd[f"{mod}.bias"] + dbias
        lora[f"transformer.{mod}.lora_A.weight"] = torch.eye(w.shape[1])
        lora[f"transformer.{mod}.lora_B.weight"] = delta.clone()
        lora[f"transformer.{mod}.lora_B.bias"] = dbias
    meta = {"window": window, "down_factor": 1, "base_model": "tiny-random"}
    return (save_attention_weights(tmp_path / "clear_attn.safetensors", full, meta),
            save_attention_weights(tmp_path / "clear_lora.safetensors", lora, meta))


def test_gen_with_weights_full_equals_lora_and_clash(cli, tmp_path, tiny_random_pipe):
    full, lora = _student_files(tmp_path, tiny_random_pipe)
    outs = {}
    for name, f in (("full", full), ("lora", lora)):
        code, out, err = cli("gen", "a cat", "--res", "64", *FAST, "--weights", str(f),
                             "--out", str(tmp_path / f"{name}.png"))
        assert code == 0, err
        assert "window 8" in out and "zero-shot" not in err
        outs[name] = _png(tmp_path / f"{name}.png")
    assert outs["full"].text["window"] == "8"
    assert len(outs["lora"].text["weights_sha256"]) == 64
    diff = np.abs(np.asarray(outs["full"], dtype=int) - np.asarray(outs["lora"], dtype=int))
    assert diff.max() <= 1
    code, _, err = cli("gen", "a cat", "--res", "64", *FAST, "--weights", str(full), "--window", "4",
                       "--out", str(tmp_path / "clash.png"))
    assert code == 2 and "--window 4 clashes with the weights (window 8 from the metadata" in err
    assert not (tmp_path / "clash.png").exists()
    code, _, err = cli("gen", "a cat", "--res", "64", *FAST, "--weights", str(full), "--window", "4", "--force",
                       "--out", str(tmp_path / "forced.png"))
    assert code == 0 and "--force" in err
    assert _png(tmp_path / "forced.png").text["window"] == "4"


def test_gen_published_down_factor_file(cli, tmp_path, tiny_random_pipe):
    """A published-style file (no metadata, `transformer.` prefix): window and f from its name, pools loaded."""
    from safetensors.torch import save_file

    sd = tiny_random_pipe.transformer.state_dict()
    tensors = {f"transformer.{k}": v + 0.01 for k, v in sd.items() if ".attn.to_q." in k}
    for blk in ("transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                "single_transformer_blocks.1"):
        tensors[f"transformer.{blk}.attn.processor.spatial_weight"] = torch.full((1, 1, 1, 4, 1, 4, 1), 1 / 16)
    path = tmp_path / "clear_local_8_down_4.safetensors"
    save_file(tensors, str(path))
    code, _, err = cli("gen", "a cat", "--res", "64", *FAST, "--weights", str(path), "--out", str(tmp_path / "p.png"))
    # published files were distilled from FLUX.1-dev: on another model they need --base (here it stands in for dev)
    assert code == 2 and "trained from black-forest-labs/FLUX.1-dev" in err and "--base" in err
    assert err.strip().count("\n") == 0 and not (tmp_path / "p.png").exists()
    code, out, err = cli("gen", "a cat", "--res", "64", *FAST, "--weights", str(path), "--base", "tiny-random",
                         "--out", str(tmp_path / "p.png"))
    assert code == 0, err
    assert "published weights clear_local_8_down_4.safetensors" in out and "CLEAR r=8 f=4" in out
    info = _png(tmp_path / "p.png").text
    assert (info["window"], info["down_factor"]) == ("8", "4")
    code, _, err = cli("gen", "a cat", "--res", "64", *FAST, "--weights", str(path), "--down-factor", "1",
                       "--base", "tiny-random", "--out", str(tmp_path / "q.png"))
    assert code == 2 and "--down-factor 1 clashes" in err and "file name" in err


def test_generate_api_restores_the_pipeline(tmp_path, tiny_random_pipe):
    import clear_cli
    from clear_cli.attention.linearize import is_linearized

    pipe = tiny_random_pipe
    full, _ = _student_files(tmp_path, pipe)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    res = clear_cli.generate(["a cat"], model="tiny-random", res="128", base_res="64", steps=2, weights=str(full),
                             out=str(tmp_path / "api"), pipe=pipe, progress=False, compare=True)
    assert len(res) == 1 and res[0].path.is_file() and res[0].full_path.is_file()
    assert 0 < res[0].ssim <= 1 and res[0].psnr > 0
    assert [s["kind"] for s in res[0].stages] == ["base", "refine"]
    assert not is_linearized(pipe)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_base_stage_matches_stock_pipeline(tiny_random_pipe):
    """Our sampler (full attention, planned sigmas) reproduces stock FluxPipeline for the same seed."""
    from clear_cli.sampling.plan import plan_stages
    from clear_cli.sampling.runner import StageRunner

    pipe = tiny_random_pipe
    (st,) = plan_stages((64, 64), pipe.scheduler.config, base_res=128, train_res=128, steps=3, guidance=3.5)
    runner = StageRunner(pipe, 16, 1, "auto", None, 96)
    runner.use("full", None, False)
    embeds = runner.encode_prompt("a blue plane")
    gen = torch.Generator("cpu").manual_seed(7)
    noise, ids = runner.noise(64, 64, torch.float32, gen)
    ours = runner.to_pil(runner.denoise(noise, ids, st, embeds, "", progress=False), 64, 64)
    stock = pipe("a blue plane", height=64, width=64, num_inference_steps=3, guidance_scale=3.5,
                 generator=torch.Generator("cpu").manual_seed(7)).images[0]
    diff = np.abs(np.asarray(ours, dtype=int) - np.asarray(stock, dtype=int))
    assert diff.max() <= 1


@pytest.mark.slow
def test_done_when_tiny_512_and_2k(cli, tmp_path):
    t0 = time.perf_counter()
    code, _, err = cli("gen", "a blue plane", "--model", "tiny", "--res", "512", "--out", str(tmp_path / "a.png"))
    assert code == 0, err
    assert time.perf_counter() - t0 < 30
    assert _png(tmp_path / "a.png").size == (512, 512)
    code, out, err = cli("gen", "a blue plane", "--model", "tiny", "--res", "2k", "--out", str(tmp_path / "b.png"))
    assert code == 0, err
    assert _png(tmp_path / "b.png").size == (2048, 2048) and "cascade" in out
