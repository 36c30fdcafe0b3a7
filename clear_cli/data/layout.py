"""The on-disk layout of a synth dataset and the small rules every writer and reader shares.

    DIR/dataset.json          the card: format version, config, model facts, resolution, tensor shapes, counts
    DIR/README.md             the same card for people
    DIR/manifest.jsonl        one record per finished sample, sorted by index (merged from parts/)
    DIR/parts/chunk-XXXXXXXX.json   the commit record of one batch (written last, atomically)
    DIR/images/XXXXXXXX.png   one image per sample
    DIR/tensors/chunk-XXXXXXXX.safetensors   the cached tensors of one batch

Samples are cut into fixed chunks of `batch_size` consecutive indices; chunk c holds indices
[c*B, (c+1)*B) (the last one may be short). A chunk is the unit of work, of writing and of resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from clear_cli.errors import ClearError, UsageError
from clear_cli.files import atomic_write_bytes
from clear_cli.resolution import parse_res  # noqa: F401  (one --res rule for every command)

FORMAT = "clear-synth"
FORMAT_VERSION = 1
CARD = "dataset.json"
README = "README.md"
MANIFEST = "manifest.jsonl"
PARTS = "parts"
IMAGES = "images"
TENSORS = "tensors"
OWNED = (CARD, README, MANIFEST, PARTS, IMAGES, TENSORS)  # all that --overwrite may delete

# Tensor names inside a shard: f"{index:08d}/{name}".
T5 = "t5_embeds"
POOLED = "pooled_embeds"
TEXT_MASK = "text_mask"   # [T] bool of real text tokens (Qwen-Image: its prompt embeddings are padded to T here)
LATENT_MEAN = "latent_mean"
LATENT_STD = "latent_std"



def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: a hash of (seed, index), so seeds never collide across neighbouring runs."""
    digest = hashlib.sha256(f"clear-synth:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def num_chunks(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def chunk_indices(chunk: int, n: int, batch_size: int) -> list[int]:
    return list(range(chunk * batch_size, min((chunk + 1) * batch_size, n)))


def image_rel(index: int, fmt: str) -> str:
    return f"{IMAGES}/{index:08d}.{fmt}"


def shard_rel(chunk: int) -> str:
    return f"{TENSORS}/chunk-{chunk:08d}.safetensors"


def part_path(root: Path, chunk: int) -> Path:
    return root / PARTS / f"chunk-{chunk:08d}.json"


def tensor_key(index: int, name: str) -> str:
    return f"{index:08d}/{name}"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys): the same data always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


def jsonl_rows(text: str, where: str):
    """(line number, parsed row) of each non-blank line of JSON Lines text; a bad line is one UsageError."""
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield no, json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: line {no} is not JSON ({e.msg})") from None


def read_card(root: Path) -> dict:
    path = Path(root) / CARD
    if not path.is_file():
        raise ClearError(f"{root} is not a synth dataset (no {CARD})",
                         "make one with `clear synth --n 10000 --out DIR`")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClearError(f"{path} is not valid JSON ({e})", "rerun `clear synth` with --overwrite") from None
    if card.get("format") != FORMAT:
        raise ClearError(f"{path} is not a clear synth card (format {card.get('format')!r})")
    if int(card.get("version", 0)) > FORMAT_VERSION:
        raise ClearError(f"{root} was written by a newer clear (format version {card['version']})",
                         "upgrade clear-dit")
    return card


def read_part(root: Path, chunk: int) -> dict | None:
    """The commit record of a chunk, or None when it is absent or unreadable (the chunk is then redone)."""
    path = part_path(root, chunk)
    try:
        part = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return part if isinstance(part, dict) and part.get("chunk") == chunk else None


def write_part(root: Path, chunk: int, records: list[dict]) -> None:
    part = {"chunk": chunk, "indices": [r["index"] for r in records], "records": records}
    atomic_write_bytes(part_path(root, chunk), (dumps(part) + "\n").encode())


def part_files_present(root: Path, part: dict) -> bool:
    """Cheap check used on resume: every file the part names exists with the recorded size."""
    for rec in part.get("records", []):
        for kind, rel in rec.get("files", {}).items():
            try:
                if (root / rel).stat().st_size != rec.get("bytes", {}).get(kind, -1):
                    return False
            except OSError:
                return False
    return True
