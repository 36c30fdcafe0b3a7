"""`clear demo` plumbing on tiny-random at 64 px with minimal steps (fast): the five stages, the summary, resume
after an interruption, refusals. The full-size demo on the trained tiny model runs in test_readme.py (slow)."""

from __future__ import annotations

import json

import pytest

FAST = ["--model", "tiny-random", "--res", "64", "--gen-res", "64", "--samples", "4", "--distill-steps", "2",
        "--eval-n", "2", "--lora-rank", "4", "--synth-steps", "2", "--eval-steps", "2",
        "--set", "train.batch_size=4", "--set", "validation.prompts=[]"]
FAST_API = dict(model="tiny-random", res=64, gen_res=64, samples=4, distill_steps=2, eval_n=2, lora_rank=4,
                sets=["train.batch_size=4", "validation.prompts=[]"], synth_steps=2, eval_steps=2)


def _table(summary: str) -> list[list[str]]:
    """Label, PSNR and SSIM of each student row of the summary (timings change from run to run)."""
    rows = [line.split("|")[1:4] for line in summary.splitlines()
            if line.startswith(("| CLEAR", "| zero-shot", "| distilled"))]
    return [[c.strip() for c in r] for r in rows]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One whole demo through the CLI, in process."""
    import clear_cli

    out = tmp_path_factory.mktemp("demo") / "d"
    result = clear_cli.demo(out=str(out), progress=False, **FAST_API)
    return out, result


def test_runs_every_stage_and_writes_what_it_reports(first):
    out, r = first
    assert [s.name for s in r.stages] == ["synth", "distill", "eval", "export", "gen"]
    assert all(s.status == "ran" for s in r.stages)
    for rel in ("summary.md", "demo.json", "synth/dataset.json", "distill/clear_attn.safetensors",
                "weights/zero_shot_attn.safetensors", "weights/clear_lora.safetensors", "eval/eval.json",
                "eval/report.html", "eval/grid.png", "images/after.png", "images/after_compare.png",
                "images/before.png"):
        assert (out / rel).is_file(), rel
    assert r.report == out / "eval" / "report.html" and all(p.is_file() for p in r.images)
    # before and after are the two students, evaluated against the teacher with the same prompts and seeds
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert [s["name"] for s in ev["students"]] == ["zero_shot_attn", "clear_attn"]
    assert all(s["window"] == 2 and s["psnr"] is not None and s["ssim"] is not None for s in ev["students"])
    assert ev["n"] == 2 and ev["width"] == 64
    # the zero-shot file holds the base model's own values of every trained tensor
    from safetensors.torch import load_file

    from clear_cli.models import load_pipeline

    zero = load_file(str(out / "weights" / "zero_shot_attn.safetensors"))
    trained = load_file(str(out / "distill" / "clear_attn.safetensors"))
    base = load_pipeline("tiny-random").transformer.state_dict()
    assert set(zero) == set(trained)
    assert all((zero[k] == base[k]).all() for k in zero)
    assert any(not (zero[k] == trained[k]).all() for k in zero)  # distillation changed something
    text = (out / "summary.md").read_text()
    assert text == r.summary
    assert len(_table(text)) == 4 and "CLEAR after distillation (2 steps)" in text
    # the LoRA the demo generated with is the exported one, loaded through the generic weights reader
    from clear_cli.models.weights import load_attention_weights

    w = load_attention_weights(str(out / "weights" / "clear_lora.safetensors"))
    assert w.window == 2


def test_rerun_reuses_every_stage(first, cli):
    out, r = first
    code, stdout, stderr = cli("demo", "--out", str(out), *FAST, "--quiet")
    assert code == 0, stderr
    state = json.loads((out / "demo.json").read_text())
    assert all(state["stages"][s]["done"] for s in ("synth", "distill", "eval", "export", "gen"))
    assert "| synth | 0.0 s | reused" in stdout and "| gen | 0.0 s | reused" in stdout
    assert _table(stdout) == _table(r.summary)
    assert f"report:  {out / 'eval' / 'report.html'}" in stdout


def test_interrupted_run_resumes_with_the_finished_stages_kept(first, tmp_path, monkeypatch):
    """An interruption in stage 4 keeps stages 1-3; the rerun finishes with the same figures as one run."""
    import clear_cli
    import clear_cli.jobs.export as export_mod

    out = tmp_path / "d"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "export", boom)
    with pytest.raises(KeyboardInterrupt):
        clear_cli.demo(out=str(out), progress=False, **FAST_API)
    state = json.loads((out / "demo.json").read_text())
    assert [s for s, v in state["stages"].items() if v["done"]] == ["synth", "distill", "eval"]
    assert not (out / ".clear.lock").exists()
    monkeypatch.undo()
    again = clear_cli.demo(out=str(out), progress=False, **FAST_API)
    assert [(s.name, s.status) for s in again.stages] == [
        ("synth", "reused"), ("distill", "reused"), ("eval", "reused"), ("export", "resumed"), ("gen", "ran")]
    assert _table(again.summary) == _table(first[1].summary)
    # a damaged output is noticed and its stage redone (distill resumes from its last checkpoint)
    (out / "distill" / "clear_attn.safetensors").unlink()
    third = clear_cli.demo(out=str(out), progress=False, **FAST_API)
    assert dict((s.name, s.status) for s in third.stages)["distill"] == "resumed"
    assert _table(third.summary) == _table(first[1].summary)


def test_refusals_are_one_line(first, cli, tmp_path):
    out, _ = first
    code, _, err = cli("demo", "--out", str(out), *FAST, "--window", "3")
    assert code == 2 and "other settings (window: 2 -> 3)" in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("not ours")
    code, _, err = cli("demo", "--out", str(other), *FAST)
    assert code == 2 and "holds no demo" in err and (other / "keep.txt").is_file()
    code, _, err = cli("demo", "--model", "black-forest-labs/FLUX.1-dev", "--out", str(tmp_path / "x"))
    assert code == 2 and "built-in tiny FLUX" in err
    code, _, err = cli("demo", "--out", str(tmp_path / "y"), *FAST, "--set", "train.nope=1")
    assert code == 2 and "train.nope: unknown key" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()  # refused before anything was written


def test_a_retrained_teacher_invalidates_every_stage(tmp_path, monkeypatch):
    """Outputs made by another teacher (the shipped tiny weights were retrained) are not reused."""
    import clear_cli
    import clear_cli.jobs.demo as demo_mod

    out = tmp_path / "d"
    clear_cli.demo(out=str(out), progress=False, **FAST_API)
    monkeypatch.setattr(demo_mod, "teacher_fingerprint", lambda model: "retrained")
    again = clear_cli.demo(out=str(out), progress=False, **FAST_API)
    assert [s.status for s in again.stages] == ["ran"] * 5
