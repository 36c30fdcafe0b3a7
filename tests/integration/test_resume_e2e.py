"""`clear demo` killed (SIGKILL) during synth and again during distill, then rerun, ends with the same files and
figures as one uninterrupted run.

Resume of each command on its own is tested where it lives: synth killed and resumed byte for byte
(tests/unit/test_synth_dataset.py, tests/integration/test_synth_processes.py), distill stopped and resumed to the
same losses and weights (tests/unit/test_distill.py). This checks what the demo adds on top: its stage records,
the lock left by a killed run, and that every stage after a kill continues rather than starts over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# tiny-random at 64 px: enough batches and steps that a kill lands inside synth and inside distill.
ARGS = ["--model", "tiny-random", "--res", "64", "--gen-res", "64", "--samples", "48", "--synth-steps", "8",
        "--distill-steps", "60", "--checkpoint-every", "10", "--eval-n", "2", "--eval-steps", "2", "--lora-rank", "8",
        "--set", "train.batch_size=4", "--set", "validation.prompts=[]", "--quiet"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("CLEAR_DEBUG", None)
    return env


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "clear_cli", "demo", "--out", str(out), *ARGS]


def _run(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(out), env=_env(), capture_output=True, text=True, timeout=600)


def _kill_when(out: Path, ready, what: str) -> None:
    """Start the demo and SIGKILL it (by its own pid) as soon as `ready(out)` holds."""
    proc = subprocess.Popen(_cmd(out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if ready(out):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and time.time() >= deadline:
            proc.kill()
        proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.skip(f"the demo finished before it could be killed {what}")


def _synth_batches(out: Path) -> int:
    parts = out / "synth" / "parts"
    return len(list(parts.glob("*.json"))) if parts.is_dir() else 0


def _distill_checkpoint(out: Path) -> bool:
    return (out / "distill" / "checkpoints" / "step_20" / "state.json").is_file()


def _stages(out: Path) -> dict:
    return json.loads((out / "demo.json").read_text())["stages"]


def _figures(out: Path) -> list:
    ev = json.loads((out / "eval" / "eval.json").read_text())
    return [(s["name"], s["psnr"], s["ssim"]) for s in ev["students"]]


def _tensors(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata of a safetensors file, less what names the run's own paths (recipe_hash covers `out`
    and `data`) or hashes the file bytes (safetensors stores metadata in no fixed order)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k not in ("recipe_hash", "source_sha256")}
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def test_killed_demo_resumes_to_the_same_result(tmp_path):
    whole = tmp_path / "whole"
    done = _run(whole)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    _kill_when(out, lambda o: _synth_batches(o) >= 2, "during synth")
    assert 2 <= _synth_batches(out) < 12 and not _stages(out)["synth"]["done"]
    assert (out / ".clear.lock").is_file()  # left by the killed run; the next run must see it is stale

    _kill_when(out, _distill_checkpoint, "during distill")
    st = _stages(out)
    assert st["synth"]["done"] and not st["distill"]["done"]
    assert not (out / "distill" / "clear_attn.safetensors").exists()

    again = _run(out)
    assert again.returncode == 0, again.stderr
    assert "| synth | 0.0 s | reused" in again.stdout and "| distill |" in again.stdout
    assert "resumed" in again.stdout.split("| distill |")[1].splitlines()[0]
    log = [json.loads(line) for line in (out / "distill" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))  # one run's log, no step twice

    # the same data, weights, LoRA and figures as the uninterrupted run
    import torch

    manifest = (out / "synth" / "manifest.jsonl").read_text()
    assert manifest == (whole / "synth" / "manifest.jsonl").read_text()  # holds every file's sha256
    for rel in ("distill/clear_attn.safetensors", "weights/zero_shot_attn.safetensors",
                "weights/clear_lora.safetensors"):
        (a, ma), (b, mb) = _tensors(out / rel), _tensors(whole / rel)
        assert ma == mb and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
    assert _figures(out) == _figures(whole)
    assert not (out / ".clear.lock").exists()
