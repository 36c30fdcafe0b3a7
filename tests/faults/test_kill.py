"""kill -9 at a random point of synth, distill, eval and gen, then the rerun: the result is byte for byte the
one an uninterrupted run gives (gen: the same pixels; its PNGs record timings), and no half-written file is
ever visible. Slow (subprocesses, several runs)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import RECIPE, SYNTH

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("CLEAR_DEBUG", None)
    return env


def _clear(*args: str) -> list[str]:
    return [sys.executable, "-m", "clear_cli", *args]


def _run(args: list[str]) -> None:
    r = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def _kill_when(args: list[str], ready, rng: random.Random, timeout: float = 300) -> None:
    """Start `args`, wait until `ready()` holds, then a random few tenths of a second more, and SIGKILL it."""
    p = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while not ready():
            if p.poll() is not None or time.monotonic() - t0 > timeout:
                pytest.skip("the run ended before the kill point (machine too fast for this size)")
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def _files(root: Path, skip=("log.jsonl", "eval.json", "report.html", "times")) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(s in p.name for s in skip) and not p.name.startswith(".")}


def _no_half_files(root: Path) -> None:
    from PIL import Image

    for p in root.rglob("*.png"):
        if not p.name.startswith("."):
            with Image.open(p) as im:
                im.load()  # a truncated PNG raises


@pytest.mark.parametrize("seed", [0, 1])
def test_killed_synth_reruns_to_the_same_bytes(tmp_path, seed):
    rng = random.Random(seed)
    args = [*SYNTH[:-2], "--batch-size", "2", "--n", "12"]
    _run(_clear(*args, "--out", str(tmp_path / "clean")))
    out = tmp_path / "killed"
    stop = rng.randint(1, 5)
    _kill_when(_clear(*args, "--out", str(out)), lambda: len(list((out / "parts").glob("*.json"))) >= stop
               if (out / "parts").is_dir() else False, rng)
    _no_half_files(out)
    _run(_clear(*args, "--out", str(out)))
    assert _files(out) == _files(tmp_path / "clean")


@pytest.mark.parametrize("seed", [0])
def test_killed_distill_resumes_to_the_same_weights(tmp_path, seed):
    rng = random.Random(seed)
    data = tmp_path / "data"
    _run(_clear(*SYNTH, "--out", str(data)))
    args = ["distill", RECIPE, "--set", f"data={data}", "--set", "resolution=64", "--set", "train.steps=6",
            "--set", "checkpoint.every=2", "--set", "checkpoint.keep=0", "--set", "validation.every=0",
            "--set", "train.batch_size=2", "--no-progress"]
    _run(_clear(*args, "--out", str(tmp_path / "clean")))
    out = tmp_path / "killed"
    _kill_when(_clear(*args, "--out", str(out)), lambda: (out / "checkpoints" / "step_2" / "state.json").is_file(),
               rng)
    _run(_clear(*args, "--out", str(out), "--resume", "auto"))
    assert (out / "clear_attn.safetensors").read_bytes() == (tmp_path / "clean" / "clear_attn.safetensors").read_bytes()


def _weights(tmp_path: Path) -> Path:
    data, d = tmp_path / "wdata", tmp_path / "wdistill"
    _run(_clear(*SYNTH, "--out", str(data)))
    _run(_clear("distill", RECIPE, "--set", f"data={data}", "--set", "resolution=64", "--set", "train.steps=2",
                "--set", "checkpoint.every=2", "--set", "validation.every=0", "--set", "train.batch_size=2",
                "--no-progress", "--out", str(d)))
    return d / "clear_attn.safetensors"


@pytest.mark.parametrize("seed", [0])
def test_killed_eval_reruns_to_the_same_images_and_figures(tmp_path, seed):
    rng = random.Random(seed)
    w = _weights(tmp_path)
    args = ["eval", "--model", "tiny", "--weights", str(w), "--n", "8", "--steps", "4", "--res", "64",
            "--metrics", "ssim,psnr", "--quiet"]
    _run(_clear(*args, "--out", str(tmp_path / "clean")))
    out = tmp_path / "killed"
    stop = rng.randint(1, 6)
    _kill_when(_clear(*args, "--out", str(out)), lambda: len(list(out.rglob("0*.png"))) >= stop, rng)
    _no_half_files(out)
    _run(_clear(*args, "--out", str(out)))
    assert _files(out) == _files(tmp_path / "clean")
    a, b = (json.loads((r / "eval.json").read_text()) for r in (out, tmp_path / "clean"))
    assert [s["ssim"] for s in a["students"]] == [s["ssim"] for s in b["students"]]


def _pixels(root: Path) -> dict[str, bytes]:
    from PIL import Image

    return {p.name: Image.open(p).tobytes() for p in sorted(root.glob("*.png"))}


def test_killed_gen_leaves_whole_images_and_reruns_to_the_same_pixels(tmp_path):
    """gen records each stage's seconds in its PNG text, so the files differ there; the pixels do not."""
    rng = random.Random(0)
    args = ["gen", "a red circle", "a blue square", "--model", "tiny", "--steps", "6", "--res", "64",
            "--num-images", "3"]
    _run(_clear(*args, "--out", str(tmp_path / "clean")))
    out = tmp_path / "killed"
    _kill_when(_clear(*args, "--out", str(out)), lambda: len(list(out.glob("*.png"))) >= 2, rng)
    _no_half_files(out)
    _run(_clear(*args, "--out", str(out), "--overwrite"))
    assert _pixels(out) == _pixels(tmp_path / "clean") and len(_pixels(out)) == 6
