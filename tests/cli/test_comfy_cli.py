"""`clear comfy install`, the node pack it writes, and the example workflows it ships."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from clear_cli.comfy import workflows
from clear_cli.comfy.install import MARKER, pack_source


def _fake_comfyui(root: Path) -> Path:
    (root / "comfy").mkdir(parents=True)
    (root / "custom_nodes").mkdir()
    (root / "models").mkdir()
    return root


def _import_pack(pack: Path) -> str:
    """Import the installed node pack in a fresh Python that has no clear_cli on its path (as ComfyUI would)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('pack', {str(pack / '__init__.py')!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            "import clear_cli\n"
            "print(sorted(mod.NODE_CLASS_MAPPINGS), mod.NODE_DISPLAY_NAME_MAPPINGS['ClearAttention'], "
            "clear_cli.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(pack.parent))
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("link", [False, True])
def test_install_puts_a_loadable_node_pack_into_custom_nodes(cli, tmp_path, link):
    root = _fake_comfyui(tmp_path / "ComfyUI")
    code, out, err = cli("comfy", "install", str(root), *(["--link"] if link else []))
    assert code == 0, err
    pack = root / "custom_nodes" / "comfyui-clear"
    assert (pack / "__init__.py").is_file() and (pack / MARKER).is_file()
    assert (pack / "lib" / "clear_cli" / "comfy" / "node.py").is_file()
    assert (pack / "lib" / "clear_cli").is_symlink() is link
    assert not (pack / "lib" / "clear_cli" / "assets").exists() or link  # the tiny model's weights stay behind
    assert (root / "models" / "clear").is_dir()
    assert "restart ComfyUI" in out
    loaded = _import_pack(pack)
    assert "['ClearAttention'] CLEAR Attention" in loaded
    where = loaded.split()[-1]  # the clear_cli that loaded: the pack's own (a link to this checkout with --link)
    assert where.startswith(str(pack / "lib"))
    assert os.path.realpath(where).startswith(str(pack_source().parents[1])) is link
    # again: our own install is replaced, whole
    (pack / "stale.txt").write_text("old")
    code, out, err = cli("comfy", "install", str(root))
    assert code == 0, err
    assert "replaced" in out and not (pack / "stale.txt").exists()
    assert not [p for p in (root / "custom_nodes").iterdir() if p.name.startswith(".")]  # no temp folders left


def test_install_refuses_what_is_not_ours_or_not_comfyui(cli, tmp_path):
    code, _, err = cli("comfy", "install", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "does not look like ComfyUI" in err
    root = _fake_comfyui(tmp_path / "ComfyUI")
    theirs = root / "custom_nodes" / "comfyui-clear"
    theirs.mkdir()
    (theirs / "keep.py").write_text("# someone else's")
    code, _, err = cli("comfy", "install", str(root))
    assert code == 2 and "was not written by" in err and (theirs / "keep.py").is_file()
    code, _, err = cli("comfy", "install", str(root), "--name", "../x")
    assert code == 2 and "--name" in err


def test_node_pack_metadata_is_a_comfyui_registry_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((pack_source() / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "comfyui-clear" and meta["project"]["dependencies"] == []
    comfy = meta["tool"]["comfy"]
    assert comfy["DisplayName"] == "CLEAR Attention" and comfy["PublisherId"] and "lib" in comfy["includes"]
    from clear_cli import __version__

    assert meta["project"]["version"] == __version__


def test_shipped_workflows_are_the_generated_ones_and_hold_together():
    for rel, obj in workflows.shipped().items():
        assert (pack_source() / rel).read_text() == workflows.render(obj), f"regenerate {rel}"
    ui = json.loads((pack_source() / "example_workflows" / f"{workflows.NAME}.json").read_text())
    api = json.loads((pack_source() / "api_workflows" / f"{workflows.NAME}_api.json").read_text())
    assert {str(n["id"]) for n in ui["nodes"]} == set(api)
    ids = {n["id"]: n for n in ui["nodes"]}
    for lid, src, slot, dst, dslot, typ in ui["links"]:
        assert ids[src]["outputs"][slot]["type"] == typ and lid in ids[src]["outputs"][slot]["links"]
        assert ids[dst]["inputs"][dslot]["link"] == lid and ids[dst]["inputs"][dslot]["type"] == typ
        name = ids[dst]["inputs"][dslot]["name"]
        assert api[str(dst)]["inputs"][name] == [str(src), slot]
    # the node's widgets: the UI's order is the node's INPUT_TYPES order, and the values agree with the API file
    from clear_cli.comfy.node import ClearAttention

    spec = ClearAttention.INPUT_TYPES()
    order = [k for part in ("required", "optional") for k, v in spec[part].items() if v[0] != "MODEL"]
    assert workflows.WIDGETS["ClearAttention"] == order
    node = next(n for n in ui["nodes"] if n["type"] == "ClearAttention")
    assert node["widgets_values"] == [api[str(node["id"])]["inputs"][k] for k in order]
    # the protocol: refinement stages at denoise 0.7 on the CLEAR model, under the base size's static shift
    shift = next(v for v in api.values() if v["class_type"] == "ModelSamplingFlux")["inputs"]
    base = next(v for v in api.values() if v["class_type"] == "EmptySD3LatentImage")["inputs"]
    assert (shift["width"], shift["height"]) == (base["width"], base["height"]) == (1024, 1024)
    refine = [v["inputs"] for v in api.values() if v["class_type"] == "KSampler" and v["inputs"]["denoise"] < 1]
    assert len(refine) == 2 and all(r["denoise"] == 0.7 and api[r["model"][0]]["class_type"] == "ModelSamplingFlux"
                                    for r in refine)
