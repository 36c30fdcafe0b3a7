"""Shared by the Triton interpreter tests: run a worker's suite in a subprocess (TRITON_INTERPRET is read at import,
so it cannot be switched on inside this process) and check its results against the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOL = {"fp32": 1e-5, "fp16": 2e-3}  # relative to each output's scale; the interpreter has no bf16 arithmetic


def run_suite(worker: Path, suite: str, timeout: int) -> dict:
    """The worker's last stdout line: {case name: result} for the named suite."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(worker), suite], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(res: dict) -> None:
    """One case: no error, finite, the same layout as the reference, every error within its dtype's tolerance."""
    assert "error" not in res, res.get("error")
    assert res["finite"] and res["same_layout"]
    tol = TOL[res["dtype"]]
    bad = {n: e / res["scale"][n] for n, e in res["err"].items() if e / res["scale"][n] > tol}
    assert not bad, f"beyond {tol}: {bad}"
