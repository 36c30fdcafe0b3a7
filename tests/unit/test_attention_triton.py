"""The Triton CLEAR kernel against `reference`, forward and backward, under the Triton interpreter (CPU).

The kernels must be defined with TRITON_INTERPRET=1, so they run in a child process (tests/unit/_triton_interp.py,
one per suite) and nothing else in this session sees the interpreter. fp32 within 1e-5, fp16 within 2e-3 (gradients:
relative to max(1, max |reference|)); bf16 only on a GPU (tests/gpu/test_triton_gpu.py): the interpreter's bf16 dot
is wrong (triton-lang/triton#11584). Plus, in-process: the tile relations against brute force, the dispatcher.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_triton_interp.py")

from _triton_interp import SUITES  # noqa: E402  (tests/unit is on sys.path, as for tiny_flux_inputs)
from triton_interp_harness import check, run_suite  # noqa: E402


def _run_suite(suite: str) -> dict:
    return run_suite(WORKER, suite, timeout=1200)


@pytest.fixture(scope="module")
def default_results():
    return _run_suite("default")


@pytest.fixture(scope="module")
def slow_results():
    return _run_suite("slow")


@pytest.mark.parametrize("name", SUITES["default"])
def test_triton_interpreter_matches_reference(default_results, name):
    check(default_results[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITES["slow"])
def test_triton_interpreter_random_sweep(slow_results, name):
    check(slow_results[name])


# ---------------------------------------------------------------------------------------- tile relations (torch)

def _brute(grid, window, tile, other):
    """Per tile of `tile`: {other tile: 'full' | 'partial'} from every token pair."""
    h, w = grid
    out = []
    ty, tx = -(-h // tile[0]), -(-w // tile[1])
    oty, otx = -(-h // other[0]), -(-w // other[1])
    for i in range(ty * tx):
        y0, x0 = i // tx * tile[0], i % tx * tile[1]
        mine = [(y, x) for y in range(y0, min(y0 + tile[0], h)) for x in range(x0, min(x0 + tile[1], w))]
        rel = {}
        for j in range(oty * otx):
            oy, ox = j // otx * other[0], j % otx * other[1]
            ragged = oy + other[0] > h or ox + other[1] > w
            theirs = [(y, x) for y in range(oy, min(oy + other[0], h)) for x in range(ox, min(ox + other[1], w))]
            inside = [(a - c) ** 2 + (b - d) ** 2 < window ** 2 for a, b in mine for c, d in theirs]
            if any(inside):
                rel[j] = "full" if all(inside) and not ragged else "partial"
        out.append(rel)
    return out


@pytest.mark.parametrize("grid, window, tile, other", [
    ((9, 13), 4, (4, 4), (4, 8)), ((8, 8), 1, (4, 4), (4, 4)), ((5, 7), 20, (4, 8), (4, 4)),
    ((1, 9), 2, (4, 4), (8, 4)), ((17, 11), 5, (8, 8), (4, 8)), ((12, 16), 3, (8, 16), (8, 8)),
])
def test_tile_relations_match_brute_force(grid, window, tile, other):
    from clear_cli.attention.triton_plan import tile_relations

    rel = tile_relations(grid, window, tile, other)
    want = _brute(grid, window, tile, other)
    assert rel.n_tiles == len(want)
    for i, expect in enumerate(want):
        n_full, n_touch = rel.counts[i].tolist()
        idx = rel.index[i, :n_touch].tolist()
        got = {j: ("full" if pos < n_full else "partial") for pos, j in enumerate(idx)}
        assert len(idx) == len(set(idx)) and got == expect, f"tile {i}"


def test_kernel_work_counts_touched_tiles():
    from clear_cli.attention.counting import image_pairs
    from clear_cli.attention.triton_plan import CANDIDATES, kernel_work

    cfg = CANDIDATES[0]
    total, img = kernel_work((64, 64), 32, 8, 1, cfg)
    assert img >= image_pairs((64, 64), 8) and img % (cfg.fwd.block_m * cfg.fwd.block_n) == 0
    assert total > img


def test_config_round_trip():
    from clear_cli.attention.triton_plan import CANDIDATES, TritonConfig

    for c in CANDIDATES:
        back = TritonConfig.from_list(c.as_list())
        assert (back.fwd, back.bwd, back.dkdv, back.splits) == (c.fwd, c.bwd, c.dkdv_or_bwd, c.splits)


# ------------------------------------------------------------------- the real compiler (no GPU: Triton's ptxas)

@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype, head_dim, name", [(90, "bf16", 128, "m64n64"), (80, "fp32", 64, "m16n16-fp32")])
def test_kernels_compile_for_cuda_without_a_gpu(arch, dtype, head_dim, name):
    """Every kernel of a forward + backward compiles to a cubin for sm_90 / sm_80 (what the interpreter cannot show).
    Run in a child process: the kernels must be defined without TRITON_INTERPRET."""
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(WORKER.with_name("_triton_aot.py")), name, "--arch", str(arch),
                           "--dtype", dtype, "--head-dim", str(head_dim)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("Triton's bundled ptxas is missing here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 8   # one line per kernel
