"""Put the CLEAR node pack into a ComfyUI checkout: `clear comfy install PATH_TO_COMFYUI`.

The node pack (`clear_cli/comfy/custom_node/`, shipped with the package) goes to
`PATH/custom_nodes/comfyui-clear/` with a copy of this `clear_cli` package in its `lib/` (without the tiny model's
assets), so ComfyUI's own Python runs it with nothing else installed: the node needs only torch and safetensors,
which ComfyUI has (huggingface_hub, which ComfyUI's transformers brings, for REPO:FILE weights). `link=True` links
instead of copying, so that a development checkout's edits show after a ComfyUI restart. A folder of that name that
we did not write is never replaced; ours is replaced whole (written beside it first, then swapped in).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clear_cli.errors import UsageError

PACK_NAME = "comfyui-clear"
MARKER = ".clear-node-pack"
MODELS_FOLDER = "clear"


def pack_source() -> Path:
    """The node pack's files in this installation of clear_cli."""
    return Path(__file__).resolve().parent / "custom_node"


def package_dir() -> Path:
    import clear_cli

    return Path(clear_cli.__file__).resolve().parent


@dataclass
class InstallResult:
    path: Path
    linked: bool
    replaced: bool
    models_dir: Path

    def summary_lines(self) -> list[str]:
        how = "linked" if self.linked else "copied"
        again = " (replaced the previous install)" if self.replaced else ""
        return [f"{how} the CLEAR node pack to {self.path}{again}",
                f"attention files go in {self.models_dir} (or models/loras); published ones can be named "
                "REPO:FILE in the node",
                "restart ComfyUI, then add 'CLEAR Attention' (model_patches/CLEAR) after the FLUX model loader; "
                "example workflows: Workflow > Browse Templates > comfyui-clear (docs/comfyui.md)"]


def check_comfyui(path: str | os.PathLike) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", "pass your ComfyUI folder, the one holding custom_nodes/")
    if not (root / "custom_nodes").is_dir() or not ((root / "comfy").is_dir() or (root / "main.py").is_file()):
        raise UsageError(f"{root} does not look like ComfyUI (no custom_nodes/ beside comfy/ or main.py)",
                         "pass the ComfyUI folder itself (for the portable build: ComfyUI_windows_portable/ComfyUI)")
    return root.resolve()


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ("__pycache__", "assets") or n.endswith((".pyc", ".pyo"))}


def _fill(dest: Path, link: bool) -> None:
    src = pack_source()
    for item in sorted(src.iterdir()):
        if item.name in ("__pycache__",):
            continue
        target = dest / item.name
        if link:
            target.symlink_to(item, target_is_directory=item.is_dir())
        elif item.is_dir():
            shutil.copytree(item, target, ignore=_ignore)
        else:
            shutil.copy2(item, target)
    lib = dest / "lib"
    lib.mkdir()
    if link:
        (lib / "clear_cli").symlink_to(package_dir(), target_is_directory=True)
    else:
        shutil.copytree(package_dir(), lib / "clear_cli", ignore=_ignore)
    from clear_cli import __version__

    (dest / MARKER).write_text(f"clear-dit {__version__}\nsource {package_dir()}\nlinked {link}\n")


def install(comfyui: str | os.PathLike, *, link: bool = False, name: str = PACK_NAME) -> InstallResult:
    """Install (or replace our earlier install of) the node pack into ComfyUI at `comfyui`."""
    root = check_comfyui(comfyui)
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UsageError(f"--name {name!r} is not a plain folder name", f"e.g. --name {PACK_NAME}")
    nodes = root / "custom_nodes"
    target = nodes / name
    replaced = target.exists() or target.is_symlink()
    if replaced and not (target / MARKER).is_file():
        raise UsageError(f"{target} exists and was not written by `clear comfy install`",
                         "remove it yourself, or install under another --name")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=nodes))
    old = None
    try:
        _fill(tmp, link)
        if replaced:
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", dir=nodes))
            os.replace(target, old / name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / name).exists() and not target.exists():
            os.replace(old / name, target)  # put the previous install back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    models = root / "models" / MODELS_FOLDER
    if (root / "models").is_dir():
        models.mkdir(exist_ok=True)
    return InstallResult(path=target, linked=link, replaced=replaced, models_dir=models)
