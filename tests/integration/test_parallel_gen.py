"""`clear gen --parallel` with real processes (torchrun, gloo on CPU) against the single-process run.

2 and 3 processes must give the single-process latents to 1e-4 (fp32, tiny-random FLUX) with bands thicker and thinner
than the window's reach, with and without pooled tokens, and through a cascade (full-attention base stage, then a
CLEAR refinement); `--parallel data` must write the same files as one process; too many processes for the rows must
fail with one line. Run with `pytest -m slow tests/integration/test_parallel_gen.py`.

This file is also the worker: torchrun runs it as a script (`python test_parallel_gen.py OUT_DIR`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROMPT = "a red circle"
DATA_PROMPTS = ["a red circle", "a blue square", "a green triangle"]
COMMON = dict(model="tiny-random", steps=2, device="cpu", dtype="fp32", progress=False)
CONFIGS = {
    "thick": dict(res="128", window=2),                                   # 8 rows: bands 4/4 or 3/3/2, reach 1
    "thin": dict(res="128", window=6),                                    # reach 5 > every band
    "pooled2": dict(res="256", cascade=False, window=3, down_factor=2),   # 16 rows: bands 8/8 or 6/6/4
    "pooled4_thin": dict(res="256", cascade=False, window=9, down_factor=4),  # bands 8/8 or 8/4/4, reach 8
    "cascade": dict(res="256", window=4, refine_steps=2),                 # 128 full attention -> 256 CLEAR
}
CLI_ARGS = ["--model", "tiny-random", "--res", "128", "--steps", "2", "--window", "3", "--device", "cpu",
            "--dtype", "fp32"]


def _capture_latents():
    """Record the final latents of every image (what is decoded) as generate makes them."""
    from clear_cli.sampling.runner import StageRunner

    seen = []
    original = StageRunner.to_pil

    def to_pil(self, latents, w, h):
        seen.append(latents.detach().to("cpu").clone())
        return original(self, latents, w, h)

    StageRunner.to_pil = to_pil
    return seen


def _run_configs(out: Path, parallel: str, pipe) -> dict:
    from clear_cli.jobs.generate import generate

    seen = _capture_latents()
    latents = {}
    for name, opts in CONFIGS.items():
        seen.clear()
        generate(PROMPT, out=str(out / f"{name}.png"), parallel=parallel, overwrite=True, pipe=pipe,
                 **COMMON, **opts)
        latents[name] = seen[-1]
    return latents


def _worker(out: Path) -> None:
    """Run under torchrun: every config with --parallel patch, --parallel data, the CLI, and a bad input."""
    import warnings

    warnings.filterwarnings("ignore")
    from safetensors.torch import save_file

    from clear_cli.cli.app import run
    from clear_cli.jobs.generate import generate
    from clear_cli.models import load_pipeline

    rank = int(os.environ["RANK"])
    pipe = load_pipeline("tiny-random")
    latents = _run_configs(out, "patch", pipe)
    outs = generate(DATA_PROMPTS, out=str(out / "data"), parallel="data", pipe=pipe, window=3, **COMMON)
    report = {"data_paths": [str(o.path) for o in outs]}
    for name, args in (("cli", ["gen", PROMPT, *CLI_ARGS, "--out", str(out / "cli.png")]),
                       ("too_many", ["gen", PROMPT, *CLI_ARGS[:2], "--res", "16", "--parallel", "patch",
                                     "--device", "cpu", "--out", str(out / "bad.png")])):
        if name == "cli":
            args = [*args, "--parallel", "patch"]
        err, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            code = run(args)
        report[name] = {"code": code, "stderr": err.getvalue(), "stdout": stdout.getvalue()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in latents.items()}, str(out / "latents.safetensors"))
    (out / f"report_{rank}.json").write_text(json.dumps(report))


def _launch(procs: int, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           __file__, str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_random_pipe):
    """The single-process reference: latents of every config, the data-mode files and the CLI image."""
    from clear_cli.cli.app import run
    from clear_cli.jobs.generate import generate
    from clear_cli.sampling.runner import StageRunner

    out = tmp_path_factory.mktemp("single")
    original = StageRunner.to_pil
    try:
        latents = _run_configs(out, "none", tiny_random_pipe)
    finally:
        StageRunner.to_pil = original
    generate(DATA_PROMPTS, out=str(out / "data"), pipe=tiny_random_pipe, window=3, **COMMON)
    assert run(["gen", PROMPT, *CLI_ARGS, "--out", str(out / "cli.png")]) == 0
    return out, latents


def _pixels(path: Path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:no --weights")
@pytest.mark.parametrize("procs", [2, 3])
def test_parallel_matches_single_process(procs, single, tmp_path):
    from safetensors.torch import load_file

    ref_dir, ref = single
    _launch(procs, tmp_path)
    got = load_file(str(tmp_path / "latents.safetensors"))
    for name in CONFIGS:
        diff = (got[name] - ref[name]).abs().max().item()
        assert diff <= 1e-4, f"{name}: {procs} processes differ from one by {diff:.2e}"

    reports = [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in range(procs)]
    # data: the same files (names and pixels) as one process; every process returns every image, in plan order
    names = sorted(p.name for p in (ref_dir / "data").glob("*.png"))
    assert sorted(p.name for p in (tmp_path / "data").glob("*.png")) == names and len(names) == 3
    for n in names:
        assert (_pixels(tmp_path / "data" / n) == _pixels(ref_dir / "data" / n)).all()
    assert all([Path(p).name for p in r["data_paths"]] == [Path(p).name for p in reports[0]["data_paths"]]
               for r in reports)
    # the CLI: the same image, one summary (process 0), per-step traffic reported
    assert all(r["cli"]["code"] == 0 for r in reports)
    assert abs(_pixels(tmp_path / "cli.png") - _pixels(ref_dir / "cli.png")).max() <= 1
    assert reports[0]["cli"]["stdout"].count("done: 1 image(s)") == 1
    assert all("done:" not in r["cli"]["stdout"] for r in reports[1:])
    assert "to all-gather K/V" in reports[0]["cli"]["stdout"] and "step 2/2" in reports[0]["cli"]["stdout"]
    # more processes than token rows: one line, exit code 2, nothing written
    for r in reports:
        bad = r["too_many"]
        errors = [ln for ln in bad["stderr"].splitlines() if ln.startswith("error:")]
        assert bad["code"] == 2 and len(errors) == 1
        assert f"{procs} processes but the image has only 1 token row;" in errors[0]
    assert not (tmp_path / "bad.png").exists()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
