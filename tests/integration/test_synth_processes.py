"""`clear synth` across real processes: two accelerate processes equal one; a SIGKILL mid-run resumes exactly.

Slow (each subprocess imports torch and diffusers): run with `pytest -m slow tests/integration/test_synth_processes.py`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = ["--model", "tiny-random", "--res", "64", "--batch-size", "2"]


def _env() -> dict:
    # The same thread count in every process: CPU kernels may round differently with another split.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _synth(out: Path, *extra: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "clear_cli", "synth", *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _synth_verify(root: Path, launcher: list[str]) -> subprocess.CompletedProcess:
    cmd = launcher + ["-m", "clear_cli", "synth", "--verify", str(root), "--repair"]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def test_two_processes_equal_one(tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    one = _synth(tmp_path / "one", "--n", "7", "--steps", "2")
    assert one.returncode == 0, one.stderr
    launcher = [accelerate, "launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = _synth(tmp_path / "two", "--n", "7", "--steps", "2", launcher=launcher)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("images/s") == 1  # one report, from the main process
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    # --verify --repair under accelerate: the main process checks, both redraw
    (tmp_path / "two" / "images" / "00000006.png").unlink()
    (tmp_path / "two" / "tensors" / "chunk-00000000.safetensors").write_bytes(b"broken")
    fixed = _synth_verify(tmp_path / "two", launcher)
    assert fixed.returncode == 0, fixed.stderr
    assert "redrew 3 samples" in fixed.stdout and fixed.stdout.count("checked 7 samples") == 2
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    whole = _synth(tmp_path / "whole", "--n", "12", "--steps", "12")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "clear_cli", "synth", *ARGS, "--n", "12", "--steps", "12", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        parts = list((out / "parts").glob("*.json")) if (out / "parts").is_dir() else []
        if len(parts) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert len(list((out / "parts").glob("*.json"))) < 6
    again = _synth(out, "--n", "12", "--steps", "12")
    assert again.returncode == 0, again.stderr
    assert _files(out) == _files(tmp_path / "whole")
