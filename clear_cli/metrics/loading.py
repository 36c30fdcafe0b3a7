"""Where metric networks come from: a hub id (real use) or a local path (offline, tests); one-line errors."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from clear_cli.errors import ClearError, UsageError
from clear_cli.network import hub_reachable

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class NetworkUnavailable(ClearError):
    """A metric network could not be loaded from the hub (offline, gated, not cached)."""


def local_dir_or_hub(value: str, option: str) -> str:
    """`value` as given if it is an existing directory or looks like a hub id; else one clear UsageError."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UsageError(f"{option} {value} is a file", "pass a model directory (save_pretrained output) or a hub id")
    if value.startswith((".", "/", "~")) or not _HUB_ID.match(value):
        raise UsageError(f"{option} {value}: no such local directory",
                         "check the path, or pass a hub id such as the default")
    return value


_DOWNLOADS = {"allowed": True}


@contextlib.contextmanager
def downloads(allowed: bool):
    """Within: whether metric networks may be downloaded. `clear eval` allows it only for metrics the user named
    in --metrics; the default set uses local files and caches only, and skips the rest (no network at all)."""
    old = _DOWNLOADS["allowed"]
    _DOWNLOADS["allowed"] = allowed
    try:
        yield
    finally:
        _DOWNLOADS["allowed"] = old


def downloads_allowed() -> bool:
    return _DOWNLOADS["allowed"]


def not_downloaded(what: str, option: str, metric: str) -> NetworkUnavailable:
    """The one line for a network that would need a download nobody asked for."""
    return NetworkUnavailable(f"the {what} is not on this machine and is not downloaded unasked",
                              f"pass a local copy with {option}, or name {metric} in --metrics to download it")


def from_pretrained(cls, source: str, **kw):
    """`cls.from_pretrained` from a local dir, the local hub cache (no network at all), or the hub when reachable."""
    from pathlib import Path as _P

    if _P(source).is_dir():
        return cls.from_pretrained(source, **kw)
    try:
        from huggingface_hub import snapshot_download

        cached = snapshot_download(source, local_files_only=True)
    except Exception:  # not cached (huggingface_hub raises its own error types)
        cached = None
    if cached is not None:
        return cls.from_pretrained(cached, **kw)
    if not downloads_allowed():
        raise _NotAsked(source)
    if not hub_reachable():
        raise OSError("not in the local hub cache and the hub cannot be reached (offline)")
    return cls.from_pretrained(source, **kw)


def load_pretrained(model: str, option: str, what: str, build):
    """`build(source)` for `model` (a local `save_pretrained` directory or a hub id, checked first); a failure to
    load becomes one NetworkUnavailable naming `option` (the CLIP and DINO networks load this way)."""
    source = local_dir_or_hub(model, option)
    try:
        return build(source)
    except _NotAsked as e:
        raise not_downloaded(f"{what} {model!r}", option, what.split()[0].lower()) from e
    except Exception as e:
        raise hub_failure(what, model, option, e) from e


class _NotAsked(OSError):
    """A hub download that the current `downloads(False)` forbids."""


def local_file(value: str, option: str, suffix: str = ".safetensors") -> Path:
    """An existing weights file with the right suffix; else one clear UsageError."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"{option} {value}: file not found", "check the path (weights are read from local files)")
    if path.suffix.lower() != suffix:
        raise UsageError(f"{option} {value}: expected a {suffix} file",
                         "convert it once (docs/eval.md shows how); pickled weights are never loaded")
    return path


def hub_failure(what: str, source: str, option: str, err: Exception) -> NetworkUnavailable:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:160]
    return NetworkUnavailable(f"could not load the {what} {source!r} ({text})",
                              f"pass a local copy with {option}, or leave the metric out of --metrics")


def read_safetensors(path: Path) -> tuple[dict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UsageError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]})") from e
    from clear_cli.models.weights import check_finite_tensors

    check_finite_tensors(tensors, path)
    return tensors, meta
