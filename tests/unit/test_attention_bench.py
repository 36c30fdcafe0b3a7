"""`clear bench attention`, in-process at tiny sizes."""

from __future__ import annotations

import json

import pytest

from clear_cli.cli.app import run
from clear_cli.errors import UsageError
from clear_cli.resolution import token_grid


def test_parse_res():
    assert token_grid("1k") == (64, 64)
    assert token_grid("8k") == (512, 512)
    assert token_grid("1024x768") == (48, 64)
    with pytest.raises(UsageError, match="multiple of 16"):
        token_grid("1000")


def test_bench_attention_json(capsys):
    code = run(["bench", "attention", "--res", "128,160x128", "--window", "3", "--heads", "2", "--head-dim", "8",
                "--text-len", "5", "--device", "cpu", "--backends", "tiled,reference", "--repeats", "1", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rows = json.loads(out)
    assert [r["grid"] for r in rows] == [[8, 8], [8, 10]]
    r = rows[1]
    assert r["tokens"] == 5 + 80
    assert set(r["times_s"]) == {"full", "tiled", "reference"}
    assert r["speedup"]["tiled"] == pytest.approx(r["times_s"]["full"] / r["times_s"]["tiled"])
    assert r["efficiency"]["tiled"] == pytest.approx(r["speedup"]["tiled"] / r["flop_ratio"])
    assert r["exact_tflop"] <= r["paper_tflop"] <= r["full_tflop"]
    assert r["schedules"]["flex"]["image_work_over_exact"] >= 1.0


def test_bench_attention_paper_check_table(capsys):
    code = run(["bench", "attention", "--res", "8k", "--window", "8", "--no-timing"])
    out = capsys.readouterr().out
    assert code == 0
    assert "full 847.727" in out and "paper 3.9235" in out and "exact 3.9154" in out


def test_bench_attention_skips_full_when_too_big(capsys):
    code = run(["bench", "attention", "--res", "256", "--window", "2", "--heads", "1", "--head-dim", "8",
                "--text-len", "0", "--device", "cpu", "--backends", "tiled", "--repeats", "1",
                "--max-full-tflop", "1e-12", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert "full" not in rows[0]["times_s"] and "full attention not timed" in rows[0]["notes"][0]


@pytest.mark.parametrize("args, words", [(["--res", "1000"], "is not a multiple of 16"),
                                         (["--backends", "fast"], "unknown backend 'fast'"),
                                         (["--res", "1k", "--down-factor", "3"], "does not divide"),
                                         (["--reference-res", "100"], "is not a multiple of 16")])
def test_bench_attention_bad_options(capsys, args, words):
    code = run(["bench", "attention", "--no-timing", *args])
    assert code == 2
    assert words in capsys.readouterr().err


def test_bench_attention_reports_what_auto_runs_and_why(capsys):
    # 128 px = 8x8 tokens: window 12 covers it (exact SDPA shortcut); 256 px = 16x16: it does not
    args = ["bench", "attention", "--res", "128,256", "--window", "12", "--heads", "1", "--head-dim", "8",
            "--text-len", "3", "--device", "cpu", "--backends", "auto,tiled", "--repeats", "1"]
    code = run([*args, "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert rows[0]["auto"]["backend"] == "sdpa" and "covers the 8x8 grid" in rows[0]["auto"]["why"]
    assert set(rows[0]["times_s"]) == {"full", "sdpa", "tiled"}
    assert rows[1]["auto"]["backend"] == "tiled" and rows[1]["auto"]["why"].startswith("cpu:")
    assert set(rows[1]["times_s"]) == {"full", "tiled"}          # auto = tiled here: timed once
    assert rows[1]["schedules"]["triton"]["image_work_over_exact"] >= 1.0
    code = run(args)
    out = capsys.readouterr().out
    assert code == 0 and "auto -> sdpa: window 12 covers" in out and "auto -> tiled: cpu:" in out


def test_bench_attention_reports_a_fallback_under_auto(monkeypatch):
    from clear_cli.attention import kernels
    from clear_cli.jobs.bench import AttentionBenchConfig, bench_attention

    def broken(q, k, v, **kw):
        raise RuntimeError("does not compile")

    monkeypatch.setitem(kernels.AUTO_ORDER, "cpu", ("triton", "tiled"))
    monkeypatch.setitem(kernels._RUN, "triton", broken)
    monkeypatch.setattr(kernels, "_usable", lambda name, *a: (True, ""))
    monkeypatch.setattr(kernels, "_BROKEN", set())
    monkeypatch.setattr(kernels, "_FALLBACKS", {})
    cfg = AttentionBenchConfig(res=["128"], window=2, heads=1, head_dim=8, text_len=3, device="cpu", repeats=1)
    with pytest.warns(UserWarning, match="triton kernel failed"):
        (row,) = bench_attention(cfg)
    assert row["auto"]["backend"] == "tiled" and "does not compile" in row["auto"]["why"]
    assert set(row["times_s"]) == {"full", "tiled"} and "tiled" in row["speedup"]
    assert any(n.startswith("auto fell back") for n in row["notes"])


def test_bench_attention_with_a_reference_times_the_layout(capsys):
    """A Kontext reference: its tokens count as global; the kernels run through the layout (timed, in model order)."""
    code = run(["bench", "attention", "--res", "128", "--reference-res", "64x96", "--window", "2", "--heads", "1",
                "--head-dim", "8", "--text-len", "3", "--device", "cpu", "--backends", "tiled,reference",
                "--repeats", "1", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    r = rows[0]
    assert r["reference"] == [6, 4] and r["tokens"] == 3 + 64 + 24
    assert set(r["times_s"]) == {"full", "tiled", "reference"} and not r["notes"]
