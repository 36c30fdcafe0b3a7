"""`clear_cli.synth`: layout, reader, resume after a kill, refusal of a changed config, verify/repair, import.

Small on purpose: tiny-random, 64 px, 2 steps, 6 samples in batches of 2 (3 chunks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clear_cli.data import SynthDataset, dataset_card, layout
from clear_cli.errors import UsageError
from clear_cli.jobs.synth import synth, verify

SMALL = dict(n=6, model="tiny-random", res="64", steps=2, batch_size=2, seed=3)


class Killed(Exception):
    pass


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a dataset (relative path -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def draw(pipe, out, **kw):
    return synth(pipe=pipe, out=str(out), progress=False, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_random_pipe):
    """One uninterrupted run that the others are compared with, byte for byte."""
    out = tmp_path_factory.mktemp("ref") / "s"
    result = draw(tiny_random_pipe, out)
    return out, snapshot(out), result


def test_layout_manifest_card_and_reader(reference, tiny_random_pipe):
    out, files, result = reference
    assert result.complete and result.done == 6 and result.new == 6 and result.images_per_s > 0
    assert result.peak_memory_bytes > 0
    assert sorted(k for k in files if k.startswith("tensors/")) == [f"tensors/chunk-0000000{c}.safetensors"
                                                                    for c in range(3)]
    records = [json.loads(line) for line in files["manifest.jsonl"].decode().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    assert [r["seed"] for r in records] == [layout.sample_seed(3, i) for i in range(6)]
    assert all(r["files"]["image"] in files and r["width"] == r["height"] == 64 for r in records)
    card = dataset_card(out)
    assert card["n"] == 6 and card["counts"] == {"samples": 6, "chunks": 3, "complete": True}
    assert card["model"]["text_len"] == 32 and card["resolution"] == {"width": 64, "height": 64}
    assert card["config"]["steps"] == 2 and card["config"]["model"] == "tiny-random"

    ds = SynthDataset(out, with_images=True)
    assert len(ds) == 6
    item = ds[4]
    assert item["prompt"] == records[4]["prompt"] and item["seed"] == records[4]["seed"]
    assert item["t5_embeds"].shape == (32, 64) and item["pooled_embeds"].shape == (64,)
    assert item["latent_mean"].shape == item["latent_std"].shape == (16, 8, 8)
    assert (item["latent_std"] > 0).all()
    # the cached embeddings are the pipeline's own, and the latents are those of the image file on disk
    embeds, pooled, _ = tiny_random_pipe.encode_prompt(item["prompt"], prompt_2=None, max_sequence_length=32)
    torch.testing.assert_close(item["t5_embeds"], embeds[0])
    torch.testing.assert_close(item["pooled_embeds"], pooled[0])
    with torch.no_grad():
        dist = tiny_random_pipe.vae.encode(item["image"][None].float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(item["latent_mean"], dist.mean[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(ds.model_latents(item), item["latent_mean"])  # tiny VAE: shift 0, scale 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch["t5_embeds"].shape == (3, 32, 64) and len(batch["prompt"]) == 3


def test_killed_run_resumes_to_the_same_bytes(reference, tiny_random_pipe, tmp_path):
    out, files, _ = reference
    part = tmp_path / "s"

    def die_after_first(chunk):
        raise Killed

    with pytest.raises(Killed):
        draw(tiny_random_pipe, part, on_batch=die_after_first)
    assert dataset_card(part)["counts"]["samples"] == 2  # the committed batch is kept, and only it
    assert len(SynthDataset(part, allow_incomplete=True)) == 2
    with pytest.raises(Exception, match="incomplete"):
        SynthDataset(part)
    # a crash between files and commit: leftovers of the batch in flight, and a temp file
    (part / "images" / "00000002.png").write_bytes(b"half")
    (part / "tensors" / ".chunk-00000001.safetensors.123.tmp").write_bytes(b"x")
    seen = []
    result = draw(tiny_random_pipe, part, on_batch=seen.append)
    assert seen == [1, 2] and result.new == 4 and result.done == 6
    assert snapshot(part) == files


def test_deleted_last_batch_is_redrawn(reference, tiny_random_pipe, tmp_path):
    out, files, _ = reference
    copy = tmp_path / "s"
    for rel, data in files.items():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_bytes(data)
    (copy / "tensors" / "chunk-00000002.safetensors").unlink()
    (copy / "images" / "00000005.png").unlink()
    seen = []
    draw(tiny_random_pipe, copy, on_batch=seen.append)
    assert seen == [2]
    assert snapshot(copy) == files


def test_dataset_grows_to_the_same_bytes(reference, tiny_random_pipe, tmp_path):
    _, files, _ = reference
    out = tmp_path / "s"
    draw(tiny_random_pipe, out, n=3)  # chunks [0,1] [2]: the short last chunk is redrawn in full later
    draw(tiny_random_pipe, out)
    assert snapshot(out) == files
    with pytest.raises(UsageError, match="can grow, not shrink"):
        draw(tiny_random_pipe, out, n=4)


def test_changed_config_is_refused_then_overwrite_starts_over(reference, tiny_random_pipe, tmp_path):
    _, files, _ = reference
    out = tmp_path / "s"
    draw(tiny_random_pipe, out, n=2)
    before = snapshot(out)
    with pytest.raises(UsageError) as e:
        draw(tiny_random_pipe, out, n=2, steps=3, seed=4)
    msg = e.value.one_line()
    assert "steps: 2 -> 3" in msg and "seed: 3 -> 4" in msg and "--overwrite" in msg
    assert snapshot(out) == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    result = draw(tiny_random_pipe, out, n=2, steps=3, overwrite=True)
    assert result.new == 2 and dataset_card(out)["config"]["steps"] == 3
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes only the dataset's own files
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty and holds no synth dataset"):
        draw(tiny_random_pipe, other, overwrite=True)


def test_verify_finds_and_repair_redraws_broken_samples(reference, tiny_random_pipe, tmp_path):
    _, files, _ = reference
    out = tmp_path / "s"
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    assert verify(out, progress=False).clean
    shard = out / "tensors" / "chunk-00000001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    (out / "images" / "00000000.png").unlink()
    report = verify(out, progress=False)
    assert not report.clean and report.ok == 3
    assert sorted(report.missing) == [0] and sorted(report.corrupt) == [2, 3]
    assert "hash mismatch" in report.corrupt[2]
    assert "missing: 0" in report.summary() and "corrupt: 2-3" in report.summary()
    fixed = verify(out, repair=True, pipe=tiny_random_pipe, progress=False)
    assert fixed.clean and fixed.redrawn == [0, 1, 2, 3] and fixed.after.ok == 6
    assert snapshot(out) == files


def test_import_captioned_images(tiny_random_pipe, tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for name, size in (("a.png", (64, 64)), ("b.jpg", (96, 80)), ("sub/c.png", (64, 64))):
        arr = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(src / name)
    (src / "a.txt").write_text("a red circle\n")
    (src / "b.json").write_text(json.dumps({"caption": "a blue square"}))
    (src / "sub" / "c.txt").write_text("a green star")
    out = tmp_path / "s"
    result = synth(pipe=tiny_random_pipe, out=str(out), model="tiny-random", from_images=str(src), res="64",
                   batch_size=2, progress=False)
    assert result.done == 3 and result.complete
    ds = SynthDataset(out, with_images=True)
    assert [ds[i]["prompt"] for i in range(3)] == ["a red circle", "a blue square", "a green star"]
    assert all(ds[i]["seed"] == -1 for i in range(3)) and ds.card["mode"] == "import"
    assert ds[1]["image"].shape == (3, 64, 64)  # 96x80 scaled and centre-cropped
    import numpy as np

    original = torch.from_numpy(np.array(Image.open(src / "a.png").convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(ds[0]["image"], original)  # already the right size: stored as is
    with torch.no_grad():
        dist = tiny_random_pipe.vae.encode(ds[2]["image"][None].float() / 127.5 - 1).latent_dist
    torch.testing.assert_close(ds[2]["latent_mean"], dist.mean[0], atol=1e-5, rtol=1e-4)
    assert verify(out, progress=False).clean
    # a Hugging Face imagefolder metadata.jsonl works too; an uncaptioned image is refused by name
    (src / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n"
                                                for f, t in (("a.png", "x"), ("sub/c.png", "y"))))
    from clear_cli.data.images import find_images

    assert [(s.rel, s.caption) for s in find_images(src)] == [("a.png", "x"), ("sub/c.png", "y")]
    (src / "metadata.jsonl").unlink()
    (src / "a.txt").unlink()
    with pytest.raises(UsageError, match="1 image.*no caption, e.g. a.png"):
        find_images(src)


def test_prompt_file_is_cycled_and_changes_are_refused(tiny_random_pipe, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text("id,caption\n1,a red fox\n2,a blue boat\n")
    out = tmp_path / "s"
    result = draw(tiny_random_pipe, out, n=3, prompts=str(prompts), prompt_column="caption")
    assert any("used again" in note for note in result.notes)
    ds = SynthDataset(out)
    assert [ds[i]["prompt"] for i in range(3)] == ["a red fox", "a blue boat", "a red fox"]
    assert ds[0]["seed"] != ds[2]["seed"]
    prompts.write_text("id,caption\n1,a red fox\n2,a green boat\n")
    with pytest.raises(UsageError, match="prompts_fingerprint"):
        draw(tiny_random_pipe, out, n=3, prompts=str(prompts), prompt_column="caption")
