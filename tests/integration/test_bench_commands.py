"""bench/commands.py --smoke: every section of the GPU command benchmark runs on the CPU (tiny-random, tiny sizes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_commands_bench_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "commands.py"), "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    d = json.loads((tmp_path / "commands.json").read_text())
    assert d["errors"] == [], d["errors"]
    s = d["sections"]
    for part in ("compare", "warm"):
        calls = s["gen8k"][part]["calls"]
        assert any(k.startswith("transformer") and k.endswith("clear") for k in calls)
        assert any(k.startswith("vae.decode") for k in calls) and any(k.startswith("vae.encode") for k in calls)
    assert s["gen8k"]["compare"]["refine_equal_steps"]["full_s"] > 0
    assert {"clear", "full"} <= set(s["gen8k"]["seconds_per_step"]["1x1024"])  # 512 px: 32x32 tokens
    assert s["gen8k"]["protocol"]["clear_s"] > 0 and s["gen8k"]["protocol"]["full_s"] > 0
    assert set(s["gen"]) == {"1k", "2k", "4k"}
    assert s["synth"]["s_per_image"] > 0
    assert set(s["distill"]) == {"checkpointing", "no_checkpointing"}
    assert all(r["s_per_step"] > 0 and r["final_checkpoint"].startswith("skipped") for r in s["distill"].values())
    assert s["eval"]["teacher_s_per_image"] > 0 and s["eval"]["student_s_per_image"] > 0
    assert "CUDA" in d["skipped"]["offload"]
    assert set(s["fits"]["largest_res"]) == {"24GB", "48GB", "80GB"}
