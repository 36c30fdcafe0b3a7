"""`clear bench video`: Wan grids, exact counts against the geometry, timing rows, bad input."""

from __future__ import annotations

import json

import pytest

from clear_cli.attention.video_geometry import count_video_pairs, full_video_pairs
from clear_cli.attention.video_sizes import wan_token_grid
from clear_cli.cli.app import run


def test_wan_token_grids():
    assert wan_token_grid(81, 1280, 720) == (21, 45, 80)       # 75,600 tokens (the figure)
    assert wan_token_grid(81, 832, 480) == (21, 30, 52)
    assert wan_token_grid(1, 832, 480) == (1, 30, 52)
    for bad in ((80, 832, 480), (81, 830, 480)):
        with pytest.raises(ValueError):
            wan_token_grid(*bad)


def test_video_bench_counts(capsys):
    code = run(["bench", "video", "--window", "16", "--time-window", "4", "--no-timing", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and [r["grid"] for r in rows] == [[21, 30, 52], [21, 45, 80]]
    r = rows[1]
    assert r["tokens"] == 75600
    want = full_video_pairs((21, 45, 80), 0) / count_video_pairs((21, 45, 80), 0, 16, 4)
    assert r["flop_ratio"] == pytest.approx(want)
    assert r["exact_tflop"] <= r["paper_tflop"] <= r["full_tflop"]
    assert r["attention_share_full"] == pytest.approx(0.72, abs=0.01)   # Wan 14B at 720p (the count)
    assert 1.0 < r["layer_flop_ratio"] < 1 / (1 - r["attention_share_full"])
    assert r["schedules"]["triton"]["work_over_exact"] >= 1.0 and r["schedules"]["tiled"]["work_over_exact"] >= 1.0


def test_video_bench_times_on_cpu(capsys):
    code = run(["bench", "video", "--res", "128x96", "--frames", "9", "--window", "3",
                "--time-window", "1", "--heads", "2", "--head-dim", "8", "--device", "cpu",
                "--backends", "auto,reference", "--repeats", "1", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    r = rows[0]
    assert r["grid"] == [3, 6, 8] and r["auto"] == "tiled"
    assert set(r["times_s"]) == {"full", "tiled", "reference"}
    assert r["speedup"]["tiled"] == pytest.approx(r["times_s"]["full"] / r["times_s"]["tiled"])


@pytest.mark.parametrize("args, match", [
    (["--frames", "80"], "4k + 1"), (["--res", "470p"], "470p"), (["--backends", "natten"], "video backend"),
    (["--wan", "7b"], "Wan 2.1 shape"), (["--time-window", "-1"], "time-window"),
])
def test_video_bench_bad_input(capsys, args, match):
    code = run(["bench", "video", "--no-timing", *args])
    assert code != 0 and match in capsys.readouterr().err


@pytest.mark.slow
def test_wan_gpu_bench_smoke(tmp_path):
    """bench/wan_gpu.py --smoke: every section's code path on the CPU at tiny sizes, figures written."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "bench/wan_gpu.py", "--smoke", "--repeats", "1", "--out", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "wan_gpu.json").read_text())
    assert all(max(r["rel_err"].values()) < 1e-5 for r in res["correctness"])
    assert len(res["attention"]) == 2 and not res["attention"][0]["errors"]
    assert set(res["steps"][0]["step_s"]) == {"stock", "clear r16 rt4", "clear r8 rt2"}
