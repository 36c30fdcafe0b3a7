"""Shared pieces of the fault suite: a tiny dataset and distilled weights (built once), a file system that fails
on demand, and the check every case makes: one `error:` line on stderr, no traceback."""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "tiny.yaml")
TINY = ["--model", "tiny"]
SYNTH = ["synth", *TINY, "--prompts", str(REPO / "recipes" / "tiny_prompts.txt"), "--n", "8", "--res", "64",
         "--steps", "2", "--batch-size", "4"]
GEN = ["gen", "a red circle", *TINY, "--steps", "2", "--res", "64"]


def distill_args(data: Path, *more: str) -> list[str]:
    return ["distill", RECIPE, "--set", f"data={data}", "--set", "resolution=64", "--set", "train.steps=2",
            "--set", "checkpoint.every=2", "--set", "validation.every=0", "--set", "train.batch_size=2",
            "--no-progress", *more]


def eval_args(weights: Path, out: Path, *more: str) -> list[str]:
    return ["eval", *TINY, "--weights", str(weights), "--n", "2", "--steps", "2", "--res", "64", "--out", str(out),
            "--metrics", "ssim,psnr", "--quiet", *more]


def one_error(err: str, *needles: str) -> str:
    """The one `error:` line of stderr (asserting there is exactly one and no traceback); checks each needle."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    return lines[0]


def temp_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from clear_cli.cli.app import run

    out = tmp_path_factory.mktemp("faults") / "synth"
    assert run([*SYNTH, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_data) -> Path:
    from clear_cli.cli.app import run

    out = tmp_path_factory.mktemp("faults") / "distill"
    assert run([*distill_args(tiny_data), "--out", str(out)]) == 0
    return out / "clear_attn.safetensors"


class FailingDisk:
    """Writes under `root` fail with `code` from the `after`+1-th file created there (0: the first); reads work.

    Covers what our writers use: os.open / open() for writing, mkdir, safetensors' save_file (which reports a
    full disk as a SafetensorError "... (os error 28)", as the real one does) and, for EROFS/EACCES, os.access.
    """

    def __init__(self, monkeypatch, root: Path, code: int = errno.ENOSPC, after: int = 0):
        self.root, self.code, self.after, self.count = str(Path(root).resolve()), code, after, 0
        real_open, real_os_open, real_mkdir, real_access = builtins.open, os.open, os.mkdir, os.access

        def mine(path) -> bool:
            try:
                return os.path.abspath(os.fspath(path)).startswith(self.root)
            except TypeError:
                return False

        def fail(path) -> None:
            if mine(path):
                self.count += 1
                if self.count > self.after:
                    raise OSError(self.code, os.strerror(self.code), os.fspath(path))

        def fake_open(file, mode="r", *a, **k):
            if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
                fail(file)
            return real_open(file, mode, *a, **k)

        def fake_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                fail(path)
            return real_os_open(path, flags, *a, **k)

        def fake_mkdir(path, *a, **k):
            if self.code != errno.ENOSPC:
                fail(path)
            return real_mkdir(path, *a, **k)

        def fake_access(path, mode, *a, **k):
            if self.code != errno.ENOSPC and mode & os.W_OK and mine(path):
                return False
            return real_access(path, mode, *a, **k)

        import safetensors.torch

        real_save = safetensors.torch.save_file

        def fake_save(tensors, filename, *a, **k):
            if mine(filename):
                self.count += 1
                if self.count > self.after:
                    from safetensors import SafetensorError

                    raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(self.code)} "
                                          f"(os error {self.code})")
            return real_save(tensors, filename, *a, **k)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)  # pathlib's write_text/write_bytes
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "access", fake_access)
        monkeypatch.setattr(safetensors.torch, "save_file", fake_save)


@pytest.fixture
def failing_disk(monkeypatch):
    """`failing_disk(root, code=errno.ENOSPC, after=0)` makes writes under root fail from then on."""
    return lambda root, code=errno.ENOSPC, after=0: FailingDisk(monkeypatch, root, code, after)
