"""`--compile auto|on|off` on gen, eval, synth and distill: an unknown value is one line naming the choices (exit 2)
before anything is loaded or written; `on` runs the compiled blocks end to end (slow: inductor on CPU)."""

from __future__ import annotations

import pytest


def _one_line_choices(code: int, err: str, value: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"--compile {value!r}" in lines[0] and "auto, on, off" in lines[0], err


@pytest.mark.parametrize("command", [
    ["gen", "a cat", "--model", "tiny-random", "--res", "64", "--steps", "1", "--device", "cpu"],
    ["eval", "--student", "missing.safetensors", "--model", "tiny-random", "--n", "1", "--device", "cpu"],
    ["synth", "--n", "1", "--model", "tiny-random", "--res", "64", "--steps", "1"],
    ["distill", "recipes/tiny.yaml", "--device", "cpu"],
])
def test_unknown_compile_value_is_one_line_exit_2(cli, tmp_path, command):
    out = tmp_path / "out"
    code, _, err = cli(*command, "--compile", "fast", "--out", str(out))
    _one_line_choices(code, err, "fast")
    assert not out.exists()


def test_recipe_compile_value_is_checked(cli, tmp_path):
    code, _, err = cli("distill", "recipes/tiny.yaml", "--set", "compile=fast", "--out", str(tmp_path / "d"))
    assert code == 2 and "compile" in err and "'auto', 'on', 'off'" in err, err


@pytest.mark.slow
def test_gen_compile_on_matches_eager(cli, tmp_path):
    """`clear gen --compile on` on CPU (inductor) writes the same image as eager, to 8-bit rounding."""
    import numpy as np
    from PIL import Image

    args = ("gen", "a red circle", "--model", "tiny-random", "--res", "64", "--steps", "2", "--device", "cpu",
            "--window", "2")
    code, _, err = cli(*args, "--compile", "off", "--out", str(tmp_path / "eager.png"))
    assert code == 0, err
    code, out, err = cli(*args, "--compile", "on", "--out", str(tmp_path / "compiled.png"))
    assert code == 0, err
    assert "compile: on" in out
    a = np.asarray(Image.open(tmp_path / "eager.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "compiled.png")).astype(int)
    assert np.abs(a - b).max() <= 2
