"""`clear eval` end to end on tiny-random (64 px, 2 steps, 4 prompts) with small seeded metric networks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

N, RES, STEPS = 4, "64", "2"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from clear_cli.metrics.testing import write_small_networks, write_student
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import save_attention_weights

    root = tmp_path_factory.mktemp("eval")
    nets = write_small_networks(root / "nets")
    tr = load_pipeline("tiny-random").transformer
    # 64 px = 4x4 tokens: a radius-8 circle covers every key, so this student *is* the teacher
    full = write_student(root / "full.safetensors", tr, window=8)
    r1 = write_student(root / "r1.safetensors", tr, window=1, noise=0.05)
    other = save_attention_weights(root / "flux_r16.safetensors",
                                   {"transformer_blocks.0.attn.to_q.weight": torch.zeros(3072, 3072)},
                                   {"window": 16, "down_factor": 1, "base_model": "black-forest-labs/FLUX.1-dev"})
    net_args = ["--clip-model", nets["clip_model"], "--dino-model", nets["dino_model"],
                "--inception-weights", nets["inception_weights"], "--lpips-weights", nets["lpips_weights"]]
    return {"root": root, "full": full, "r1": r1, "other": other, "nets": net_args}


def _args(setup, out: Path, *extra: str, students=("full", "r1")) -> list[str]:
    args = ["eval", "--model", "tiny-random", "--prompts", "builtin", "--n", str(N), "--res", RES, "--steps", STEPS,
            "--out", str(out), "--quiet", *setup["nets"], *extra]
    for s in students:
        args += ["--weights", str(setup[s])]
    return args


@pytest.fixture(scope="module")
def first_run(setup):
    from clear_cli.cli.app import run

    out = setup["root"] / "out"
    code = run(_args(setup, out, "--json"))
    assert code == 0
    return out, json.loads((out / "eval.json").read_text())


def test_full_window_student_scores_as_the_teacher(first_run):
    out, r = first_run
    assert r["schema"] == "clear-eval/1" and r["mode"] == "teacher"
    assert r["metrics"] == ["fid", "clip", "lpips", "ssim", "psnr", "dino", "speed"] and r["skipped"] == {}
    full, r1 = r["students"]
    assert (full["name"], full["window"], r1["name"], r1["window"]) == ("full", 8, "r1", 1)
    assert full["fid"] == pytest.approx(0.0, abs=1e-6)
    assert full["psnr"] >= 40.0  # identical up to float rounding of the attention sums (inf per image when equal)
    assert full["ssim"] > 0.999 and full["clip_image"] > 0.9999 and full["dino"] > 0.9999
    assert abs(full["lpips"]) < 1e-4
    assert full["clip_score"] == pytest.approx(r["teacher"]["clip_score"], abs=0.05)
    assert full["attn_flops_ratio"] == pytest.approx(1.0)
    # the small-window student saves attention work, counted exactly
    from clear_cli.attention import count_pairs
    from clear_cli.attention.counting import full_pairs

    assert r1["attn_pairs_per_layer"] == count_pairs((4, 4), 32, 1) < full_pairs((4, 4), 32)
    assert r1["attn_flops_ratio"] == pytest.approx(r1["attn_pairs_per_layer"] / r["teacher"]["attn_pairs_per_layer"])
    assert r1["psnr"] < full["psnr"]
    assert r["small_n"] is True
    for who in (r["teacher"], full, r1):
        assert who["seconds_per_image"] > 0
    assert not any(isinstance(v, float) and math.isinf(v) for s in r["students"] for v in s.values())


def test_outputs_cached_report_and_grid(first_run):
    out, r = first_run
    for folder in ("teacher", "student_full", "student_r1"):
        assert sorted(p.name for p in (out / folder).glob("*.png")) == [f"{i:05d}.png" for i in range(N)]
    assert not list(out.rglob("*.tmp"))
    page = (out / "report.html").read_text()
    assert "src='teacher/00000.png'" in page and "src='student_r1/00003.png'" in page
    assert "src='diff_full/00000.png'" in page and str(out) not in page
    from PIL import Image

    with Image.open(out / "grid.png") as g:
        assert g.size == (5 * 192, N * 192 + 18)  # teacher | 2 x (student, difference)


def test_rerun_reuses_images_and_prints_table(setup, first_run, cli):
    out, r = first_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/0*.png") if not p.parent.name.startswith("diff")}
    code, stdout, _ = cli(*_args(setup, out))
    assert code == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "FID vs teacher" in stdout and "small n=4" in stdout and "report:" in stdout
    again = json.loads((out / "eval.json").read_text())
    assert again["students"][1]["ssim"] == r["students"][1]["ssim"]


@pytest.mark.parametrize("extra, students, message", [
    (("--n", "0"), ("full",), "--n 0 must be at least 1"),
    (("--metrics", "fid,sharpness"), ("full",), "unknown metric 'sharpness'"),
    (("--clip-model", "./no/such/clip"), ("full",), "--clip-model ./no/such/clip: no such local directory"),
    (("--lpips-weights", "missing.safetensors"), ("full",), "--lpips-weights missing.safetensors: file not found"),
    ((), ("other",), "do not fit this model"),
    (("--steps", "3"), ("full",), "drawn with steps 2"),
])
def test_bad_input_one_line_and_cache_survives(setup, first_run, cli, extra, students, message):
    out, _ = first_run
    before = sorted(out.glob("*/0*.png"))
    args = _args(setup, out, students=students)
    # later options win in Typer for single-valued options
    code, stdout, stderr = cli(*args, *extra)
    assert code != 0
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert sorted(out.glob("*/0*.png")) == before


def test_missing_student_file(setup, cli, tmp_path):
    code, _, stderr = cli("eval", "--model", "tiny-random", "--student", str(tmp_path / "nope.safetensors"),
                          "--out", str(tmp_path / "o"), "--n", "2", "--prompts", "builtin")
    assert code == 2 and "student file" in stderr and "not found" in stderr
    assert not (tmp_path / "o").exists()


def test_coco_captions_missing_says_what_to_download(setup, cli, tmp_path):
    code, _, stderr = cli("eval", "--model", "tiny-random", "--student", str(setup["full"]), "--prompts", "coco",
                          "--coco-captions", str(tmp_path / "captions_val2014.json"), "--out", str(tmp_path / "o"))
    assert code == 2 and "annotations_trainval2014.zip" in stderr


def test_coco_sampling_is_deterministic(tmp_path):
    from clear_cli.jobs.evaluate import coco_prompts

    anns = [{"id": i, "image_id": i // 5, "caption": f"caption  number {i}\n"} for i in range(7000, 0, -1)]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"annotations": anns}))
    a, b = coco_prompts(str(path), 10), coco_prompts(str(path), 5000)
    assert a == b[:10] and len(set(b)) == 5000 and a[0].startswith("caption number ")


def test_cascade_compares_clear_with_full_attention(setup, tmp_path, cli):
    out = tmp_path / "casc"
    code, stdout, stderr = cli("eval", "--model", "tiny-random", "--prompts", "builtin", "--n", "1", "--res", "256",
                               "--steps", "2", "--cascade", "--metrics", "ssim,psnr", "--out", str(out), "--quiet",
                               "--student", str(setup["r1"]), "--json")
    assert code == 0, stderr
    r = json.loads(stdout)
    c = r["cascade"]
    assert r["mode"] == "cascade" and (c["width"], c["base_width"]) == (256, 128)
    row = c["students"][0]
    assert 0 < row["ssim"] <= 1 and row["psnr"] > 10 and row["seconds_per_image"] > 0
    assert (out / "cascade_r1" / "00000.png").is_file() and (out / "cascade_r1" / "00000_full.png").is_file()


def test_cascade_reports_the_full_attention_time(setup, tmp_path, cli):
    """The "s / image (full)" row: the full-attention cascade's time per image (it was always "-")."""
    out = tmp_path / "casc"
    code, stdout, stderr = cli("eval", "--model", "tiny-random", "--prompts", "builtin", "--n", "1", "--res", "256",
                               "--steps", "2", "--cascade", "--metrics", "ssim,psnr,speed", "--out", str(out),
                               "--quiet", "--student", str(setup["r1"]))
    assert code == 0, stderr
    row = json.loads((out / "eval.json").read_text())["cascade"]["students"][0]
    assert row["full_seconds_per_image"] > 0 and row["seconds_per_image"] > 0
    line = next(ln for ln in stdout.splitlines() if "s / image (full)" in ln)
    assert line.split()[-2] != "-", line


def test_tiny_models_default_to_their_own_held_out_prompts(setup, tmp_path, cli, monkeypatch):
    """`clear eval --model tiny...` needs no COCO file: the tiny model's held-out scene captions serve."""
    from clear_cli.tiny.scenes import held_out_prompts

    monkeypatch.setenv("CLEAR_COCO_CAPTIONS", str(tmp_path / "no_coco.json"))
    out = tmp_path / "o"
    code, _, stderr = cli("eval", "--model", "tiny-random", "--student", str(setup["full"]), "--n", "2", "--res", RES,
                          "--steps", STEPS, "--metrics", "psnr", "--out", str(out), "--quiet", "--json")
    assert code == 0, stderr
    r = json.loads((out / "eval.json").read_text())
    assert r["prompts"] == "tiny"
    assert json.loads((out / "teacher" / "settings.json").read_text())["prompts"] == held_out_prompts(2)


def test_step_defaults_in_the_help_are_what_runs(setup, tmp_path, cli):
    """eval's and gen's --help name the steps a tiny model samples with, and that is what they run."""
    def helptext(command: str) -> str:
        code, stdout, _ = cli(command, "--help")
        assert code == 0
        return " ".join(stdout.split())

    out = tmp_path / "o"
    code, _, stderr = cli("eval", "--model", "tiny-random", "--prompts", "builtin", "--student", str(setup["full"]),
                          "--n", "2", "--res", RES, "--metrics", "psnr", "--out", str(out), "--quiet")
    assert code == 0, stderr
    eval_steps = json.loads((out / "eval.json").read_text())["steps"]
    code, _, stderr = cli("gen", "a red circle", "--model", "tiny-random", "--res", RES, "--out",
                          str(tmp_path / "g.png"))
    assert code == 0, stderr
    from PIL import Image

    with Image.open(tmp_path / "g.png") as im:
        gen_steps = json.loads(im.text["stages"])[0]["steps"]
    assert f"tiny {eval_steps})" in helptext("eval")
    assert f"tiny {gen_steps})" in helptext("gen")  # both from the field docs now
