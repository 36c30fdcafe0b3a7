"""Two runs into one --out: the second refuses with one line naming the holder; the lock of a run that died
(kill -9) is taken over; nested jobs in one process share a folder's lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GEN, SYNTH, distill_args, eval_args, one_error

from clear_cli.files import LOCK_NAME, OutLock

HOLD = """
import sys, time
from clear_cli.files import OutLock
with OutLock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder():
    """`holder(folder, command)`: another process holding the lock on `folder`; killed (SIGKILL) at the end."""
    procs = []

    def start(folder: Path, command: str = "synth") -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), command], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
        procs.append(p)
        assert p.stdout.readline().strip() == "held"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.mark.parametrize("command", ["synth", "distill", "eval", "gen", "demo"])
def test_a_second_run_into_a_busy_out_refuses(cli, tmp_path, tiny_data, tiny_weights, holder, command):
    out = tmp_path / "out"
    args = {"synth": [*SYNTH, "--out", str(out)], "distill": [*distill_args(tiny_data), "--out", str(out)],
            "eval": eval_args(tiny_weights, out), "gen": [*GEN, "--out", str(out)],
            "demo": ["demo", "--out", str(out), "--quiet"]}[command]
    p = holder(out, "synth")
    status, _, err = cli(*args)
    assert status == 1
    one_error(err, "in use by", f"pid {p.pid}", "wait for it")
    assert sorted(x.name for x in out.iterdir()) == [LOCK_NAME]  # the second run wrote nothing
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == p.pid


def test_the_lock_of_a_killed_run_is_taken_over(cli, tmp_path, holder):
    out = tmp_path / "g"
    p = holder(out, "gen")
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / LOCK_NAME).is_file()  # left behind by the killed run
    status, _, err = cli(*GEN, "--out", str(out))
    assert status == 0, err
    assert (out / "a-red-circle_0.png").is_file()
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "command": "synth"}))
    with OutLock(out, "synth"):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_nested_jobs_in_one_process_share_the_lock(tmp_path):
    with OutLock(tmp_path, "demo"):
        with OutLock(tmp_path, "gen"):
            pass
        assert (tmp_path / LOCK_NAME).is_file()  # still held by the outer job
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_failed_run_leaves_no_empty_folder(cli, tmp_path):
    out = tmp_path / "a" / "b"
    status, _, err = cli(*GEN, "--weights", str(tmp_path / "missing.safetensors"), "--out", str(out))
    assert status != 0
    one_error(err)
    assert not (tmp_path / "a").exists()


def test_lock_refusal_is_quick(tmp_path, holder):
    holder(tmp_path, "distill")
    t0 = time.perf_counter()
    with pytest.raises(Exception, match="in use by `clear distill`"):
        with OutLock(tmp_path, "gen"):
            pass
    assert time.perf_counter() - t0 < 5  # refuses at once, never waits for the holder
