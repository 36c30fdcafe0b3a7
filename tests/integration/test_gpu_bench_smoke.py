"""bench/gpu.sh --smoke: every section of the GPU benchmark runs on the CPU at tiny sizes (slow: ~2-3 minutes).

The GPU run gets one short call, so its code paths are checked here: attention cases for every kernel and both
directions, the correctness check, whole steps in all four variants at 8K / 4K / 1K (names as on the GPU, tiny
grids), the sweep's "not available" branch, the JSON written as it goes, and the plan's H200 estimates.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_section(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "BUDGET_S": "900", "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("CLEAR_TRITON_MODULE", None)
    run = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert data["errors"] == [] and data["skipped"] == [] and data["current"] is None, data["errors"]
    from clear_cli.attention.flex import LAYOUTS

    cases = data["attention"]
    assert len(cases) == 4 * 3 * 2 * 2                          # res x window x factor x direction
    for key, rec in cases.items():
        names = set(rec["kernels"])
        assert {"flash", "tiled", *(f"flex:{n}" for n in LAYOUTS)} <= names, key
        timed = [k for k in rec["kernels"].values() if "s" in k]
        assert all(k["s"] > 0 and k["work_tflop"] > 0 and k["tflops"] > 0 for k in timed), key
        assert rec["kernels"]["tiled"].get("s"), key        # the backward path ran (CPU flex has none)
    for res in ("8k", "4k", "1k"):
        step = data["steps"][f"{res}_r16"]
        for variant in ("clear_compiled", "clear_eager", "full_eager", "full_compiled"):
            assert step[variant]["s"] > 0 and "warmup_s" in step[variant] and "note" not in step[variant], (res, variant)
        assert step["clear_compiled_vs_full_compiled"] > 0
    assert set(data["steps"]["8k_r8"]) >= {"clear_compiled", "clear_eager"}
    for name, checks in data["check"].items():
        assert checks["fwd_f2"]["out"] < 1e-4, name
    assert data["check"]["tiled"]["fwdbwd_f2"]["grad"] < 1e-4
    assert data["sweep"].get("status", "").startswith("not available") or data["sweep"]

    plan = subprocess.run([sys.executable, "bench/gpu_bench.py", "--plan"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-2000:]
    lines = plan.stdout.splitlines()
    assert lines[0].endswith("attention 8k r=16 f=1 fwd") and "step 8k r=16" in lines[1]
