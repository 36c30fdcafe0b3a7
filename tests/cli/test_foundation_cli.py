import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from clear_cli.cli.app import app, run
from clear_cli.shim import is_screen_clear

SNAPSHOT = Path(__file__).parent / "snapshots" / "help.txt"


def _all_help(capsys) -> str:
    """`--help` of the app and of every command and sub-command, concatenated."""
    import typer

    os.environ["COLUMNS"] = "100"
    os.environ["TERMINAL_WIDTH"] = "100"
    paths: list[list[str]] = [[]]
    cmd = typer.main.get_command(app)

    def walk(group, prefix):
        for name, sub in sorted(getattr(group, "commands", {}).items()):
            paths.append(prefix + [name])
            walk(sub, prefix + [name])

    walk(cmd, [])
    chunks = []
    for p in paths:
        code = run([*p, "--help"])
        out = capsys.readouterr().out
        assert code == 0, p
        chunks.append(f"$ clear {' '.join(p + ['--help'])}\n{out}")
    return "\n".join(chunks)


def test_help_snapshot(capsys):
    """A Typer/Click upgrade or an unreviewed option change must show up here (UPDATE_SNAPSHOTS=1 rewrites)."""
    text = _all_help(capsys)
    if os.environ.get("UPDATE_SNAPSHOTS") == "1" or not SNAPSHOT.exists():
        SNAPSHOT.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text(), "help changed: review, then rerun with UPDATE_SNAPSHOTS=1"


def test_env_reports_versions(cli):
    code, out, _ = cli("env", "--json")
    assert code == 0
    info = json.loads(out)
    for key in ("python", "torch", "diffusers", "transformers", "accelerate", "cuda_available", "flex_attention"):
        assert key in info
    assert info["cuda_available"] in (True, False)


def test_exit_codes_and_one_line_errors(cli):
    code, _, err = cli("model", "info", "--model", "tiny-random", "--dtype", "fp64")
    assert code == 2 and err.strip().count("\n") == 0 and "--dtype 'fp64'" in err
    code, _, err = cli("model", "info", "--model", "someone/no-such-model")
    assert code == 1 and err.strip().count("\n") == 0 and "no-such-model" in err and "--model tiny" in err
    code, _, err = cli("no-such-command")
    assert code == 2
    code, out, _ = cli("--version")
    assert code == 0 and "clear-dit" in out


def test_debug_shows_traceback(cli, monkeypatch):
    monkeypatch.setenv("CLEAR_DEBUG", "1")
    code, _, err = cli("model", "info", "--model", "tiny-random", "--dtype", "fp64")
    assert code == 2 and "Traceback" in err


def test_model_save_writes_a_diffusers_dir_and_refuses_overwrite(cli, tmp_path):
    out = tmp_path / "m"
    code, _, err = cli("model", "save", "--model", "tiny-random", "--out", str(out))
    assert code == 0, err
    assert (out / "model_index.json").is_file()
    code, _, err = cli("model", "save", "--model", "tiny-random", "--out", str(out))
    assert code == 2 and "--overwrite" in err
    assert (out / "model_index.json").is_file()


@pytest.mark.parametrize("args,expected", [
    ([], True), (["-x"], True), (["-V"], True), (["-T", "xterm"], True), (["-Txterm", "-x"], True),
    (["--help"], False), (["gen", "a"], False), (["-T"], False), (["env"], False),
])
def test_screen_clear_flags(args, expected):
    assert is_screen_clear(args) is expected


def _run_shim(args, path_dirs, tmp_path):
    env = {**os.environ, "PATH": os.pathsep.join(str(d) for d in path_dirs)}
    return subprocess.run([sys.executable, "-m", "clear_cli.shim", *args], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)


def test_bare_clear_hands_over_to_system_clear(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "clear"
    fake.write_text(f"#!/bin/sh\necho \"system clear $*\" > {tmp_path / 'called'}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    r = _run_shim(["-x"], [bindir, Path(sys.executable).parent], tmp_path)
    assert r.returncode == 0
    assert (tmp_path / "called").read_text().strip() == "system clear -x"


def test_bare_clear_without_system_clear_prints_ansi_escape(tmp_path):
    r = _run_shim([], [tmp_path], tmp_path)  # no `clear` anywhere on PATH, output not a terminal
    assert r.returncode == 0 and r.stdout.startswith("\033[H\033[2J")


def test_shim_imports_nothing_heavy():
    code = "import sys, clear_cli.shim; print(any(m in sys.modules for m in ('torch', 'diffusers', 'typer')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False"
