"""`clear_cli.files`: the one atomic writer (files readable like any other, nothing half-written) and --overwrite."""

from __future__ import annotations

import os
import stat

import pytest
import torch


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_every_writer_leaves_a_normal_file(tmp_path, umask_022):
    from PIL import Image

    from clear_cli import files

    files.atomic_write_text(tmp_path / "a.txt", "hi")
    files.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    files.save_png(Image.new("RGB", (4, 4), "red"), tmp_path / "c.png", {"seed": 3})
    files.save_safetensors(tmp_path / "d.safetensors", {"x": torch.zeros(2)}, {"k": "v"})
    files.atomic_copy(tmp_path / "b.bin", tmp_path / "e.bin")
    with files.atomic_dir(tmp_path / "f") as d:
        (d / "inner.txt").write_text("x")
    for name in ("a.txt", "b.bin", "c.png", "d.safetensors", "e.bin"):
        assert _mode(tmp_path / name) == 0o644, name
    assert _mode(tmp_path / "f") == 0o755 and (tmp_path / "f" / "inner.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []
    with Image.open(tmp_path / "c.png") as im:
        assert im.text["seed"] == "3"


def test_files_the_jobs_wrote_were_private_before(tmp_path, umask_022):
    """Recipes, attention weights and dataset records are written through the same writer (mkstemp made 0600)."""
    import dataclasses

    from clear_cli.config import doc, save_config
    from clear_cli.data import layout
    from clear_cli.models.weights import save_attention_weights

    @dataclasses.dataclass
    class _C:
        steps: int = doc(3, "steps")

    save_config(_C(), tmp_path / "recipe.yaml")
    save_attention_weights(tmp_path / "w.safetensors", {"a.weight": torch.ones(2, 2)}, {"window": 4})
    layout.write_part(tmp_path, 0, [])
    for p in (tmp_path / "recipe.yaml", tmp_path / "w.safetensors", layout.part_path(tmp_path, 0)):
        assert _mode(p) == 0o644, p


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    from clear_cli import files

    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and _leftovers(tmp_path) == []

    class _Broken:
        def save(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError):
        files.save_png(_Broken(), tmp_path / "img.png")
    with pytest.raises(RuntimeError), files.atomic_dir(tmp_path / "d") as d:
        (d / "x").write_text("x")
        raise RuntimeError("crash")
    assert not (tmp_path / "img.png").exists() and not (tmp_path / "d").exists()
    assert _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path):
    from safetensors import safe_open

    from clear_cli import files

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    meta = {f"key{i}": str(i) for i in range(12)}
    files.save_safetensors(tmp_path / "1.safetensors", tensors, meta)
    files.save_safetensors(tmp_path / "2.safetensors", tensors, dict(reversed(list(meta.items()))))
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()
    with safe_open(str(tmp_path / "1.safetensors"), "pt") as f:
        assert f.metadata() == meta and torch.equal(f.get_tensor("b"), tensors["b"])


def test_overwrite_removes_only_what_the_job_owns(tmp_path):
    from clear_cli import files

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("x")
    (tmp_path / "mine.json").write_text("{}")
    (tmp_path / "theirs.txt").write_text("keep")
    (tmp_path / ".half.json.abc.tmp").write_text("")
    owned = ("mine", "mine.json", "absent")
    assert files.owned_present(tmp_path, owned) == ["mine", "mine.json"]
    assert files.foreign_entries(tmp_path, owned) == ["theirs.txt"]
    assert files.remove_owned(tmp_path, owned) == ["mine", "mine.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".half.json.abc.tmp", "theirs.txt"]
