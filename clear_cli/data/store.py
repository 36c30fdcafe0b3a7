"""Writing, resuming and checking a synth dataset, one chunk (batch) at a time.

Commit protocol of a chunk: images first, then the tensor shard, each under a temporary name renamed into
place; the chunk's part record last. A chunk without its part record is not done, whatever files exist, so a
crash at any moment leaves either a whole batch or one that is redone (overwriting its leftovers).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clear_cli.data import layout
from clear_cli.errors import ClearError
from clear_cli.files import atomic_write_bytes, is_temp_name, remove_owned, save_safetensors


@dataclass
class Sample:
    """One finished sample in memory, ready to be written."""

    index: int
    prompt: str
    seed: int | None
    width: int
    height: int
    image: bytes | None  # encoded image file (None: keep no image)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    source: str | None = None  # imported image: its path inside the source folder


def write_chunk(root: Path, chunk: int, samples: list[Sample], image_format: str) -> list[dict]:
    """Write one chunk atomically (images, shard, then its part record); returns its manifest records."""
    records = []
    for s in samples:
        rec: dict = {"index": s.index, "prompt": s.prompt, "seed": s.seed, "width": s.width, "height": s.height,
                     "files": {}, "bytes": {}, "sha256": {}}
        if s.source is not None:
            rec["source"] = s.source
        if s.image is not None:
            rel = layout.image_rel(s.index, image_format)
            atomic_write_bytes(root / rel, s.image)
            rec["files"]["image"] = rel
            rec["bytes"]["image"] = len(s.image)
            rec["sha256"]["image"] = _sha256_bytes(s.image)
        records.append(rec)
    tensors = {layout.tensor_key(s.index, name): t.detach().to("cpu").contiguous()
               for s in samples for name, t in sorted(s.tensors.items())}
    if tensors:
        rel = layout.shard_rel(chunk)
        final = root / rel
        # canonical header: an interrupted-then-resumed run writes the same bytes as an uninterrupted one
        save_safetensors(final, tensors, metadata={"format": f"{layout.FORMAT} chunk {chunk}"})
        size, digest = final.stat().st_size, layout.sha256_file(final)
        for rec in records:
            rec["files"]["tensors"] = rel
            rec["bytes"]["tensors"] = size
            rec["sha256"]["tensors"] = digest
    layout.write_part(root, chunk, records)
    return records


def _sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def chunk_done(root: Path, chunk: int, n: int, batch_size: int) -> bool:
    """Resume's test: the part record exists, covers exactly this chunk's indices, and its files are in place."""
    part = layout.read_part(root, chunk)
    return (part is not None and part.get("indices") == layout.chunk_indices(chunk, n, batch_size)
            and layout.part_files_present(root, part))


def pending_chunks(root: Path, n: int, batch_size: int) -> list[int]:
    return [c for c in range(layout.num_chunks(n, batch_size)) if not chunk_done(root, c, n, batch_size)]


def count_parts(root: Path) -> int:
    """How many chunks have a part record (cheap; used for the shared progress bar)."""
    try:
        return sum(1 for e in os.scandir(root / layout.PARTS) if e.name.endswith(".json"))
    except OSError:
        return 0


def merge_manifest(root: Path, n: int, batch_size: int) -> int:
    """Rewrite manifest.jsonl from the finished chunks, sorted by index; returns the number of samples in it."""
    lines = []
    for c in range(layout.num_chunks(n, batch_size)):
        part = layout.read_part(root, c)
        if part is None or part.get("indices") != layout.chunk_indices(c, n, batch_size):
            continue
        lines.extend(layout.dumps(rec) for rec in part["records"])
    atomic_write_bytes(root / layout.MANIFEST, "".join(line + "\n" for line in lines).encode())
    return len(lines)


def remove_stale_temps(root: Path) -> None:
    """Temporary files of writes that a crash interrupted (only call before any writer starts)."""
    for sub in (layout.IMAGES, layout.TENSORS, layout.PARTS, "."):
        d = root / sub
        if d.is_dir():
            for e in os.scandir(d):
                if e.is_file() and is_temp_name(e.name):
                    Path(e.path).unlink(missing_ok=True)


@dataclass
class ChunkCheck:
    """What `check_chunk` found: per broken index, why."""

    chunk: int
    missing: dict[int, str] = field(default_factory=dict)
    corrupt: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def check_chunk(root: Path, card: dict, chunk: int) -> ChunkCheck:
    """Check every sample of a chunk: part record, files present, hashes, shard loads, tensor shapes/dtypes."""
    n, batch = int(card["n"]), int(card["batch_size"])
    want = layout.chunk_indices(chunk, n, batch)
    res = ChunkCheck(chunk)
    part = layout.read_part(root, chunk)
    if part is None or part.get("indices") != want:
        res.missing.update({i: "batch never finished" for i in want})
        return res
    spec = card.get("tensors", {})
    shard_state: dict[str, object] = {}  # rel -> None (good) or a reason string
    for rec in part["records"]:
        i = rec["index"]
        for kind, rel in rec.get("files", {}).items():
            path = root / rel
            if not path.is_file():
                res.missing[i] = f"{kind} file {rel} is missing"
                break
            if kind == "tensors":
                if rel not in shard_state:
                    shard_state[rel] = _check_shard(path, rec["sha256"].get(kind))
                why = shard_state[rel]
            else:
                why = None if layout.sha256_file(path) == rec["sha256"].get(kind) else f"{kind} {rel}: hash mismatch"
            if why:
                res.corrupt[i] = str(why)
                break
        else:
            if spec:
                why = _check_tensors(root / rec["files"]["tensors"], i, spec) if "tensors" in rec["files"] else \
                    "no tensors recorded"
                if why:
                    res.corrupt[i] = why
    return res


def _check_shard(path: Path, digest: str | None) -> str | None:
    from safetensors import safe_open

    if digest is not None and layout.sha256_file(path) != digest:
        return f"tensors {path.name}: hash mismatch"
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises several error types for a damaged header
        return f"tensors {path.name} does not load ({type(e).__name__})"
    return None


def _check_tensors(path: Path, index: int, spec: dict) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        for name, want in spec.items():
            key = layout.tensor_key(index, name)
            if key not in keys:
                return f"tensor {key} missing from {path.name}"
            t = f.get_tensor(key)
            if list(t.shape) != want["shape"] or str(t.dtype).removeprefix("torch.") != want["dtype"]:
                return (f"tensor {key}: {list(t.shape)} {t.dtype} where the card says "
                        f"{want['shape']} {want['dtype']}")
            if not torch.isfinite(t.float()).all():
                return f"tensor {key} holds NaN or inf"
    return None


def clear_owned(root: Path) -> None:
    """`--overwrite`: delete only what a synth dataset consists of, never other files in the folder."""
    remove_owned(root, layout.OWNED)


def read_manifest(root: Path) -> list[dict]:
    path = root / layout.MANIFEST
    if not path.is_file():
        raise ClearError(f"{root} has no {layout.MANIFEST}", f"rerun `clear synth --verify {root} --repair`")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError):
        raise ClearError(f"{path} is damaged (not JSON lines)", f"rerun `clear synth --verify {root} --repair`") \
            from None


HASH_LIMIT = 4 << 30  # distill hashes the tensor shards up to this many bytes in all (~2-4 s per GiB); sizes above


def integrity_problems(root: Path, *, hash_limit: int = HASH_LIMIT) -> list[str]:
    """The quick check distill runs on every start, before training: every manifest path inside the dataset,
    every file present at its recorded size, and the tensor shards (what training reads) at their recorded
    sha256 while they total at most `hash_limit` bytes (sizes only above; `clear synth --verify` hashes all).

    Returns at most a few problems (the first ones found), each naming the file.
    """
    root = Path(root)
    top = str(root)
    problems: list[str] = []
    shards: dict[str, tuple[int, str | None]] = {}
    seen: set[str] = set()
    for rec in read_manifest(root):
        for kind, rel in rec.get("files", {}).items():
            if rel in seen:  # a shard holds a whole batch: check it once
                continue
            seen.add(rel)
            if not isinstance(rel, str) or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
                problems.append(f"sample {rec.get('index')}: the manifest names {rel}, outside the dataset")
                continue
            try:
                size = os.stat(os.path.join(top, rel)).st_size
            except OSError:
                problems.append(f"sample {rec.get('index')}: {rel} is missing")
                continue
            want = rec.get("bytes", {}).get(kind)
            if want is not None and size != want:
                problems.append(f"sample {rec.get('index')}: {rel} is {size} bytes, the manifest says {want}")
            elif kind == "tensors":
                shards[rel] = (size, rec.get("sha256", {}).get(kind))
        if len(problems) >= 3:
            return problems
    if not problems and sum(s for s, _ in shards.values()) <= hash_limit:
        for rel, (_, digest) in sorted(shards.items()):
            if digest is not None and layout.sha256_file(root / rel) != digest:
                problems.append(f"{rel}: its sha256 differs from the manifest (the file changed since it was written)")
                if len(problems) >= 3:
                    break
    return problems
