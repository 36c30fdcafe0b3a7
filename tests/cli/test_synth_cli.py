"""`clear synth` on the command line: a tiny run, verify, and bad input as one line with nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY = ["--model", "tiny-random", "--res", "64", "--steps", "2", "--batch-size", "2"]


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """A 3-sample dataset drawn through the CLI (also loads the model by name)."""
    from clear_cli.cli.app import run

    out = tmp_path_factory.mktemp("cli") / "s"
    code = run(["synth", "--n", "3", *TINY, "--out", str(out), "--image-format", "webp"])
    assert code == 0
    return out


def test_run_reports_speed_and_memory_then_resumes_as_a_no_op(drawn, cli):
    assert sorted(p.name for p in (drawn / "images").iterdir()) == ["00000000.webp", "00000001.webp",
                                                                     "00000002.webp"]
    before = files_of(drawn)
    code, out, err = cli("synth", "--n", "3", *TINY, "--out", str(drawn), "--image-format", "webp")
    assert code == 0, err
    assert "3 samples (complete; 0 new this run, 3 already there)" in out
    assert "images/s" in out and "peak memory" in out and "GiB" in out
    assert files_of(drawn) == before


def test_verify_command(drawn, cli, tmp_path):
    code, out, _ = cli("synth", "--verify", str(drawn))
    assert code == 0 and "3 ok, 0 missing, 0 corrupt" in out
    broken = tmp_path / "b"
    for rel, data in files_of(drawn).items():
        (broken / rel).parent.mkdir(parents=True, exist_ok=True)
        (broken / rel).write_bytes(data)
    (broken / "images" / "00000002.webp").unlink()
    code, out, _ = cli("synth", "--verify", str(broken))
    assert code == 1 and "missing: 2" in out and "--repair" in out
    code, out, _ = cli("synth", "--verify", str(broken), "--repair")
    assert code == 0 and "repaired: redrew 1 samples" in out
    assert files_of(broken) == files_of(drawn)
    code, _, err = cli("synth", "--repair")
    assert code == 2 and "--repair works with --verify" in err


@pytest.mark.parametrize("args,needle", [
    (["--n", "0"], "--n 0: must be at least 1"),
    (["--n", "2", "--prompts", "{missing}"], "file not found"),
    (["--n", "2", "--prompts", "{empty}"], "holds no prompts"),
    (["--n", "2", "--prompts", "{csv}", "--prompt-column", "caption"], "no column 'caption'"),
    (["--n", "2", "--res", "100"], "--res 100: 100 is not a multiple of 16"),
    (["--n", "2", "--image-format", "jpg"], "--image-format 'jpg'"),
    (["--n", "2", "--steps", "3"], "holds a dataset made with other settings (steps: 2 -> 3"),
    (["--n", "2", "--out", "{file}/sub"], "no directory can be made under it"),
    (["--n", "2", "--from-images", "{missing}"], "not a directory"),
])
def test_bad_input_is_one_line_and_loses_nothing(drawn, cli, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "p.csv").write_text("prompt\na fox\n")
    (tmp_path / "file").write_text("not a dir")
    subst = {"missing": tmp_path / "nope.txt", "empty": tmp_path / "empty.txt", "csv": tmp_path / "p.csv",
             "file": tmp_path / "file"}
    args = [a.format(**subst) for a in args]
    if "--out" not in args:
        args += ["--out", str(drawn)]
    before = files_of(drawn)
    code, out, err = cli("synth", *TINY, "--image-format", "webp", *args) if "--image-format" not in args \
        else cli("synth", *TINY, *args)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert files_of(drawn) == before
