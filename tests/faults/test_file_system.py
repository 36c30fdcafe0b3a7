"""File-system faults: a read-only or unwritable --out, a full disk at any write, a file where a folder must be.

Each command answers with one line naming the path, the cause and the fix, exits non-zero, leaves what was there
intact and no temporary file behind; a rerun once the fault is gone finishes the work.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import GEN, SYNTH, TINY, distill_args, eval_args, one_error, temp_files


def _commands(root: Path, data: Path, weights: Path) -> dict[str, list[str]]:
    return {
        "synth": [*SYNTH, "--out", str(root / "s")],
        "distill": [*distill_args(data), "--out", str(root / "d")],
        "eval": eval_args(weights, root / "e"),
        "export": ["export", str(weights), "--out", str(root / "lora.safetensors")],
        "gen": [*GEN, "--out", str(root / "g")],
        "model save": ["model", "save", *TINY, "--out", str(root / "m")],
        "demo": ["demo", "--out", str(root / "demo"), "--quiet"],
        "tiny train": ["tiny", "train", "--out", str(root / "t"), "--steps", "1", "--vae-steps", "1"],
    }


COMMANDS = ["synth", "distill", "eval", "export", "gen", "model save", "demo", "tiny train"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_unwritable_out_is_one_line_and_touches_nothing(cli, tmp_path, tiny_data, tiny_weights, failing_disk,
                                                        command, code):
    root = tmp_path / "ro"
    root.mkdir()
    (root / "keep.txt").write_text("mine")
    failing_disk(root, code)
    status, _, err = cli(*_commands(root, tiny_data, tiny_weights)[command])
    assert status != 0
    one_error(err, str(root), os.strerror(code))
    assert sorted(p.name for p in root.iterdir()) == ["keep.txt"]
    assert (root / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", COMMANDS)
def test_out_under_a_file_is_refused(cli, tmp_path, tiny_data, tiny_weights, command):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    status, _, err = cli(*_commands(blocker, tiny_data, tiny_weights)[command])
    assert status != 0
    one_error(err, str(blocker))
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("command", ["synth", "distill", "eval", "gen", "demo"])
def test_out_that_is_a_file_is_refused(cli, tmp_path, tiny_data, tiny_weights, command):
    cmds = _commands(tmp_path, tiny_data, tiny_weights)
    args = cmds[command]
    target = Path(args[args.index("--out") + 1])
    target.write_text("mine")
    status, _, err = cli(*args)
    assert status == 2
    one_error(err, str(target), "is a file")
    assert target.read_text() == "mine"


def test_tiny_check_never_replaces_a_foreign_file(cli, tmp_path):
    target = tmp_path / "notes.json"
    target.write_text("my notes")
    status, _, err = cli("tiny", "check", "--model", "tiny-random", "--n", "1", "--steps", "1", "--no-locality",
                         "--no-clear", "--out", str(target))
    assert status == 2
    one_error(err, str(target), "pick another --out")
    assert target.read_text() == "my notes"


def test_full_disk_in_gen_keeps_the_images_already_written(cli, tmp_path, failing_disk):
    out = tmp_path / "g"
    assert cli(*GEN, "--out", str(out))[0] == 0
    first = (out / "a-red-circle_0.png").read_bytes()
    # files created before the second new image: 2 write probes, the lock, image 1's temporary file and its PNG
    failing_disk(out, after=5)
    status, _, err = cli(*GEN, "--seed", "1", "--num-images", "3", "--out", str(out))
    assert status == 1
    one_error(err, "No space left on device", "rerun")
    assert (out / "a-red-circle_0.png").read_bytes() == first  # what was there: intact
    assert (out / "a-red-circle_1.png").is_file()              # finished before the disk filled: kept
    assert not (out / "a-red-circle_2.png").exists()
    assert temp_files(out) == []


def test_full_disk_in_synth_then_rerun_gives_the_uninterrupted_dataset(cli, tmp_path, tiny_data, failing_disk,
                                                                       monkeypatch):
    out = tmp_path / "s"
    disk = failing_disk(out, after=8)  # somewhere inside the second batch
    status, _, err = cli(*SYNTH, "--out", str(out))
    assert status == 1
    one_error(err, "No space left on device", str(out))
    assert disk.count > disk.after
    assert temp_files(out) == []
    monkeypatch.undo()  # space freed
    assert cli(*SYNTH, "--out", str(out))[0] == 0
    for rel in ("manifest.jsonl", "tensors/chunk-00000000.safetensors", "tensors/chunk-00000001.safetensors",
                "images/00000007.png"):
        assert (out / rel).read_bytes() == (tiny_data / rel).read_bytes(), rel


def test_full_disk_at_a_distill_checkpoint_leaves_no_partial_checkpoint(cli, tmp_path, tiny_data, failing_disk,
                                                                        monkeypatch):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    failing_disk(out / "checkpoints")
    status, _, err = cli(*distill_args(tiny_data), "--out", str(out))
    assert status == 1
    one_error(err, "No space left on device")
    assert not list((out / "checkpoints").glob(".step_*")) if (out / "checkpoints").exists() else True
    assert (out / "notes.txt").read_text() == "mine"
    monkeypatch.undo()
    status, _, err = cli(*distill_args(tiny_data), "--out", str(out), "--resume", "auto")
    assert status == 0, err
    assert (out / "clear_attn.safetensors").is_file() and (out / "checkpoints" / "step_2").is_dir()


def test_full_disk_in_export_writes_nothing(cli, tmp_path, tiny_weights, failing_disk):
    out = tmp_path / "x"
    out.mkdir()
    failing_disk(out, after=2)  # the write probe and the temporary file pass; safetensors' write fails
    status, _, err = cli("export", str(tiny_weights), "--out", str(out / "lora.safetensors"))
    assert status == 1
    one_error(err, str(out / "lora.safetensors"), "No space left on device")
    assert list(out.iterdir()) == []


def test_full_disk_in_eval_keeps_the_cached_images(cli, tmp_path, tiny_weights, failing_disk, monkeypatch):
    out = tmp_path / "e"
    assert cli(*eval_args(tiny_weights, out))[0] == 0
    cached = {p: p.read_bytes() for p in (out / "teacher").glob("*.png")}
    assert cached
    failing_disk(out)
    status, _, err = cli(*eval_args(tiny_weights, out, "--n", "3"))
    assert status == 1
    one_error(err, "No space left on device")
    assert all(p.read_bytes() == b for p, b in cached.items())
    assert temp_files(out) == []
    monkeypatch.undo()
    assert cli(*eval_args(tiny_weights, out, "--n", "3"))[0] == 0


def test_ctrl_c_says_how_to_resume(cli, monkeypatch, tmp_path, tiny_weights):
    import clear_cli.jobs.export as export_job

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_job, "export", interrupted)
    status, _, err = cli("export", str(tiny_weights), "--out", str(tmp_path / "l.safetensors"))
    assert status == 130
    one_error(err, "interrupted", "rerun the same command to resume")


def test_written_files_follow_the_umask(cli, tmp_path):
    old = os.umask(0o022)
    try:
        assert cli(*GEN, "--out", str(tmp_path / "g"))[0] == 0
    finally:
        os.umask(old)
    assert (tmp_path / "g" / "a-red-circle_0.png").stat().st_mode & 0o777 == 0o644


def test_model_save_overwrite_never_replaces_a_foreign_folder(cli, tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, _, err = cli("model", "save", *TINY, "--out", str(out), "--overwrite")
    assert status == 2
    one_error(err, "not a saved model", "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_model_save_overwrite_replaces_its_own_folder(cli, tmp_path):
    out = tmp_path / "m"
    assert cli("model", "save", "--model", "tiny-random", "--out", str(out))[0] == 0
    status, _, err = cli("model", "save", "--model", "tiny-random", "--out", str(out), "--overwrite")
    assert status == 0, err
    assert (out / "model_index.json").is_file()


def test_tiny_train_overwrite_deletes_only_its_own_files(tmp_path):
    from clear_cli.tiny.train import OWNED, TinyTrainConfig, _open_run

    out = tmp_path / "t"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "vae_000200.safetensors").write_bytes(b"old")
    (out / "state.json").write_text('{"stage": "vae", "step": 200}')
    (out / "train_log.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    _open_run(out, TinyTrainConfig(out=str(out)), None, True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "data").is_dir()
    assert not (out / "state.json").exists() and not list((out / "checkpoints").iterdir())
    assert set(OWNED) >= {"state.json", "train_log.jsonl", "checkpoints"}
