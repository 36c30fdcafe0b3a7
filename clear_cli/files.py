"""Writing outputs so that nothing already written is lost: one atomic writer for every kind of file.

Every writer goes through `atomic_path`: the data is written under a temporary name beside the target
(`.NAME.<random>.tmp`, so readers and resumes never see half a file, and many processes never clash), then
renamed onto it; on any failure the temporary file is removed. Temporary files are created with mode 0666 minus
the umask, so a written file ends up like any other (0644 under umask 022), not private like mkstemp's 0600.

`remove_owned` is the one rule for `--overwrite`: a job names what it owns, and nothing else in the folder is
ever deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of our temporary names (left behind only by a killed writer)."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def temp_path(final: str | os.PathLike) -> Path:
    """A new empty file beside `final` with a unique temporary name, created 0666 & ~umask."""
    final = Path(final)
    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name beside {final}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; renamed onto `path` on success, removed on failure."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return Path(dst)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary folder beside `path` to fill; on success it replaces `path` (a folder), on failure it
    is removed. Created 0777 & ~umask like any folder (mkdtemp's would be private)."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name beside {final}")
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------- safetensors

def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
                     ) -> Path:
    """Tensors (+ string metadata) as a safetensors file, atomically, with a canonical header.

    safetensors writes its metadata map in no fixed order (a Rust HashMap): the same tensors saved twice would
    hash differently, and what is keyed by a file's sha256 (eval's caches, the demo's stages, dataset records)
    would look stale. The header is rewritten with sorted keys, so equal tensors + metadata give equal bytes.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        _canonical_header(tmp)
    return Path(path)


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys in place. Data offsets are relative to the end of the header,
    so only the header changes; the data is streamed, never held in memory twice."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        new = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        new += b" " * (-len(new) % 8)  # safetensors pads the header to 8 bytes with spaces
        with atomic_path(path) as tmp, open(tmp, "wb") as g:
            g.write(len(new).to_bytes(8, "little"))
            g.write(new)
            shutil.copyfileobj(f, g, 16 << 20)


# ------------------------------------------------------------------------------------------- PNG

def png_bytes(image, info: Mapping[str, Any] | None = None) -> bytes:
    """A PIL image as PNG bytes (PIL's defaults, no timestamps: the same pixels and info give the same bytes).

    `info` goes into text chunks: strings as they are, anything else as JSON (`clear gen` records its settings).
    """
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_png_info(info))
    return buf.getvalue()


def save_png(image, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write a PIL image as PNG (with `info` in text chunks, as `png_bytes`), atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_png_info(info))
    return Path(path)


def _png_info(info: Mapping[str, Any] | None):
    if not info:
        return None
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    return meta


# ------------------------------------------------------------------------------------------- --overwrite

def owned_present(root: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Which of a job's own `names` exist under `root`."""
    root = Path(root)
    return [n for n in names if (root / n).exists() or (root / n).is_symlink()]


def foreign_entries(root: str | os.PathLike, names: Iterable[str], keep: Iterable[str] = ()) -> list[str]:
    """Entries of `root` that are neither the job's own `names`, nor in `keep`, nor temporary files (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    mine = set(names) | set(keep)
    return sorted(p.name for p in root.iterdir() if p.name not in mine and not is_temp_name(p.name))


def remove_owned(root: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """`--overwrite`: delete exactly the job's own `names` under `root` (files or folders); returns what went.

    Nothing else in `root` is touched: a job lists what it writes, and only that may be deleted.
    """
    root = Path(root)
    removed = []
    for name in names:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed
