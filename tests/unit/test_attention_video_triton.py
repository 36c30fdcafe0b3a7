"""The 3-D Triton kernel against the dense reference, forward and backward, under the Triton interpreter (CPU), in a
child process (tests/unit/_triton_video_interp.py) as for the 2-D kernel. fp32 within 1e-5, fp16 within 2e-3
(relative to max(1, max |reference|)); bf16 only on a GPU (the interpreter's bf16 dot is wrong)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_triton_video_interp.py")

from _triton_video_interp import SUITES  # noqa: E402  (tests/unit is on sys.path)
from triton_interp_harness import check, run_suite  # noqa: E402


def _run_suite(suite: str) -> dict:
    return run_suite(WORKER, suite, timeout=1800)


@pytest.fixture(scope="module")
def default_results():
    return _run_suite("default")


@pytest.fixture(scope="module")
def slow_results():
    return _run_suite("slow")


@pytest.mark.parametrize("name", SUITES["default"])
def test_video_triton_interpreter_matches_reference(default_results, name):
    check(default_results[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITES["slow"])
def test_video_triton_interpreter_more_shapes(slow_results, name):
    check(slow_results[name])


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype, head_dim, name, extra", [(90, "bf16", 128, "t1y8x8", []),
                                                                (90, "bf16", 128, "t4y4x4", ["--i64"]),
                                                                (80, "fp32", 64, "t1y4x4-fp32", [])])
def test_video_kernels_compile_for_cuda_without_a_gpu(arch, dtype, head_dim, name, extra):
    """The three 3-D kernels compile to a cubin (what the interpreter cannot show); without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(WORKER.with_name("_triton_video_aot.py")), name, "--arch", str(arch),
                           "--dtype", dtype, "--head-dim", str(head_dim), *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 3   # one line per kernel
