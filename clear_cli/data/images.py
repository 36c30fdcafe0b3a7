"""Images in and out of a synth dataset: encoding drawn images, and finding/loading a folder to import.

A folder to import (`clear synth --from-images DIR`) is read in one of three ways, first match wins:
1. `DIR/manifest.jsonl` in this toolkit's format (`files.image` + `prompt`): another synth set;
2. `DIR/metadata.jsonl` as the Hugging Face imagefolder writes it (`file_name` + `text`, `prompt` or `caption`);
3. every image under DIR (sorted by path) with its caption beside it: `NAME.txt`, or `NAME.json` with a
   `prompt` / `caption` / `text` field.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clear_cli.errors import UsageError
from clear_cli.files import png_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEYS = ("prompt", "caption", "text")


@dataclass(frozen=True)
class SourceImage:
    """One image to import: its path relative to the folder, and its caption."""

    rel: str
    caption: str


def encode_image(pixels: torch.Tensor, fmt: str) -> bytes:
    """uint8 [3, H, W] -> PNG or lossless WebP bytes (no timestamps, so the same pixels give the same bytes)."""
    from PIL import Image

    img = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
    if fmt == "png":
        return png_bytes(img)
    if fmt != "webp":
        raise UsageError(f"--image-format {fmt!r} is not supported", "use png or webp")
    buf = io.BytesIO()
    img.save(buf, format="WEBP", lossless=True, quality=100, method=4)
    return buf.getvalue()


def load_image(path: Path, width: int, height: int) -> torch.Tensor:
    """An image file as uint8 [3, height, width]: scaled to cover the size, then centre-cropped."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            img = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read image {path}: {e}") from None
    scale = max(width / img.width, height / img.height)
    if img.size != (width, height):
        size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _caption_of(row: dict, where: str) -> str:
    for key in CAPTION_KEYS:
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key].strip()
    raise UsageError(f"{where}: no caption (looked for {', '.join(CAPTION_KEYS)})")


def _from_jsonl(root: Path, path: Path, file_key) -> list[SourceImage]:
    from clear_cli.data.layout import jsonl_rows

    out = []
    for no, row in jsonl_rows(path.read_text(encoding="utf-8"), str(path)):
        rel = file_key(row) if isinstance(row, dict) else None
        if not rel:
            raise UsageError(f"{path}: line {no} names no image file")
        if not (root / rel).is_file():
            raise UsageError(f"{path}: line {no}: image {rel} not found in {root}")
        out.append(SourceImage(rel, _caption_of(row, f"{path} line {no}")))
    return out


def find_images(folder: str | Path) -> list[SourceImage]:
    """The images of a folder to import, with their captions (see the module doc for the accepted layouts)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UsageError(f"--from-images {folder}: not a directory", "pass a folder of images with captions")
    if (root / "manifest.jsonl").is_file():
        found = _from_jsonl(root, root / "manifest.jsonl", lambda r: (r.get("files") or {}).get("image"))
    elif (root / "metadata.jsonl").is_file():
        found = _from_jsonl(root, root / "metadata.jsonl", lambda r: r.get("file_name"))
    else:
        found = []
        missing = []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
            rel = path.relative_to(root).as_posix()
            txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
            if txt.is_file():
                caption = txt.read_text(encoding="utf-8").strip()
            elif js.is_file():
                try:
                    row = json.loads(js.read_text(encoding="utf-8"))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{js} is not JSON ({e.msg})") from None
                caption = _caption_of(row if isinstance(row, dict) else {}, str(js))
            else:
                missing.append(rel)
                continue
            if not caption:
                missing.append(rel)
                continue
            found.append(SourceImage(rel, caption))
        if missing:
            raise UsageError(f"--from-images {folder}: {len(missing)} image(s) have no caption, e.g. {missing[0]}",
                             "put NAME.txt or NAME.json (a 'prompt' field) beside each image, or a metadata.jsonl")
    if not found:
        raise UsageError(f"--from-images {folder}: no images found",
                         f"expected {', '.join(IMAGE_SUFFIXES)} files with captions beside them")
    return found


def images_fingerprint(folder: str | Path, images: list[SourceImage]) -> str:
    """Identifies an import source by its listing (paths, sizes, captions): cheap, and catches edits."""
    root = Path(folder).expanduser()
    h = hashlib.sha256()
    for img in images:
        h.update(f"{img.rel}\0{(root / img.rel).stat().st_size}\0{img.caption}\n".encode())
    return f"listing-sha256:{h.hexdigest()}"
