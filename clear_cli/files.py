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
    """Yield a temporary path beside `path` to write to; renamed onto `path` on success, removed on failure.

    A file-system error (no space, read-only, permission) is re-raised naming `path`, not the temporary name,
    so the one line the user sees says which output could not be written; the target is untouched.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(final)
    except OSError as e:
        raise _named(e, final) from e
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, final) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _named(e: OSError, final: Path, tmp: Path | None = None) -> OSError:
    """The same error, naming the output rather than our temporary file (or folder)."""
    name = str(e.filename or "")
    if not e.errno:
        return e
    if e.filename is None or is_temp_name(Path(name).name):
        return type(e)(e.errno, e.strerror or str(e), str(final))
    if tmp is not None and name.startswith(str(tmp) + os.sep):
        return type(e)(e.errno, e.strerror or str(e), str(final) + name[len(str(tmp)):])
    return e


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
    try:
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
    except OSError as e:
        raise _named(e, final) from e
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _named(e, final, tmp) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
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

    from clear_cli.errors import embedded_os_error

    with atomic_path(path) as tmp:
        try:
            save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
        except Exception as e:  # SafetensorError wraps I/O faults (a full disk): raise them as what they are
            os_err = embedded_os_error(e, str(path))
            if os_err is None or isinstance(e, OSError):
                raise
            raise os_err from e
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
    """Entries of `root` that are neither the job's own `names`, nor in `keep`, nor temporary files, nor the
    folder's lock (sorted)."""
    root = Path(root)
    if not root.is_dir():
        return []
    mine = set(names) | set(keep) | {LOCK_NAME}
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


# ------------------------------------------------------------------------------------------- checks on --out

def check_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be one: a file, a path under a file, or a place
    that cannot be written (read-only file system, no permission). Creates nothing: a run that fails later
    leaves no empty folder behind."""
    from clear_cli.errors import UsageError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {out} is a file, not a directory", "pick a directory (or remove the file)")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{option} {out}: {probe} is a file, so no directory can be made under it",
                         "pick another path")
    if probe.exists():
        try:  # a real write, not os.access: that says yes to root on a read-only disk
            temp_path(probe / ".write-probe").unlink()
        except OSError as e:
            raise _os_error_of(e if e.filename else OSError(e.errno, e.strerror, str(probe)), option) from None
    return out


def check_out_file(path: str | os.PathLike, suffix: str, option: str = "--out", what: str = "file") -> Path:
    """Refuse an output file name with the wrong extension (`.safetensors` for weights, `.png` for images), that
    is a folder, or whose folder cannot be made or written."""
    from clear_cli.errors import UsageError

    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {out} is a directory", f"name a {suffix} file inside it")
    if out.suffix.lower() != suffix:
        raise UsageError(f"{option} {out}: a {what} is written as {suffix}",
                         f"name it {out.with_suffix(suffix).name if out.suffix else out.name + suffix}")
    check_out_dir(out.parent if str(out.parent) else ".", option)
    return out


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one existing file (links and relative paths included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _os_error_of(e: OSError, option: str):
    from clear_cli.errors import os_error

    err = os_error(e)
    where = Path(e.filename).parent if is_temp_name(Path(str(e.filename)).name) else e.filename
    err.message = f"{option} {where}: cannot write there ({e.strerror})"
    return err


# ------------------------------------------------------------------------------------------- one run per --out

LOCK_NAME = ".clear.lock"
_HELD: dict[str, list] = {}  # lock path -> [fd, depth, folders made]: a process may nest jobs in one folder


class OutLock:
    """`with OutLock(out, "distill"):` one run at a time per output folder.

    OUT/.clear.lock holds the owner's pid, host and command, and is flock()ed while the run lives: the kernel
    drops the lock when the process dies (kill -9 included), so a stale file of a dead run is simply taken over.
    A second run refuses with one line naming the holder. Nested use in one process (the demo calling synth) is
    allowed. Where flock is unavailable (not POSIX), a holder on this host whose pid is gone counts as stale.
    """

    def __init__(self, folder: str | os.PathLike, command: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.command = command

    def __enter__(self) -> "OutLock":
        key = str(self.path.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            return self
        check_out_dir(self.folder)
        made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = self._take()
        except OSError as e:
            raise _named(e, self.path) from e
        _HELD[key] = [fd, 1, made]
        return self

    def __exit__(self, *exc) -> None:
        key = str(self.path.resolve())
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(held[0])
        for p in held[2]:  # folders this lock made and the run left empty (it failed before writing): gone
            with contextlib.suppress(OSError):
                p.rmdir()

    def _take(self) -> int:
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666)
            if not _flock(fd):
                os.close(fd)
                self._refuse(self._holder())
            try:  # the file may have been removed (by its previous owner) between open and lock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            holder = self._holder()
            if not _HAVE_FLOCK and holder and _alive(holder):
                os.close(fd)
                self._refuse(holder)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": _host(), "command": self.command}).encode())
            return fd
        from clear_cli.errors import ClearError

        raise ClearError(f"cannot take the lock {self.path}", "rerun; delete the file if no clear run uses the folder")

    def _holder(self) -> dict:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _refuse(self, holder: dict):
        from clear_cli.errors import ClearError

        who = f"`clear {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')})"
        raise ClearError(f"{self.folder} is in use by {who}",
                         "wait for it to finish or stop it, or pick another --out; two runs in one folder would "
                         "corrupt each other")


try:
    import fcntl as _fcntl

    _HAVE_FLOCK = True
except ImportError:  # not POSIX
    _fcntl = None
    _HAVE_FLOCK = False


def _flock(fd: int) -> bool:
    if _fcntl is None:
        return True
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks: fall back to the pid check
        return True
    return True


def _host() -> str:
    import socket

    return socket.gethostname()


def _alive(holder: dict) -> bool:
    if holder.get("host") != _host():
        return True  # cannot tell for another machine: assume it runs
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(holder.get("pid", 0)) > 0
