"""The CLEAR node inside real ComfyUI, against diffusers + `clear_cli.linearize` on the same weights.

Opt-in: ComfyUI is GPL-3.0 and not on PyPI, so it is never a dependency; point CLEAR_COMFYUI at a checkout (with its
requirements importable, e.g. on PYTHONPATH) to run these (3-6 minutes and 7.6 GB of RAM on 2 CPU cores):

    CLEAR_COMFYUI=/path/to/ComfyUI python -m pytest -q -m slow tests/integration/test_comfyui_real.py -s

What runs: a FLUX.1 state dict in BFL layout, as small as ComfyUI's FLUX detector allows (it reads only the block
counts and assumes FLUX.1's widths: hidden 3072 = 24 heads x 128, RoPE axes 16 + 56 + 56 = 128; 1 double + 1 single
block, ~540M parameters, 2.2 GB in fp32), is loaded by ComfyUI's stock UNETLoader; the node pack is installed with
`clear comfy install` into a scratch ComfyUI folder and loaded by ComfyUI's own custom-node loader; one sampling step
(comfy.sample, euler, 1 step from sigma 1) gives the model's velocity, compared with diffusers' FluxTransformer2DModel
built from the same file by diffusers' own single-file converter and linearized by `clear_cli.linearize`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

COMFY = os.environ.get("CLEAR_COMFYUI")
pytestmark = [
    pytest.mark.skipif(not COMFY, reason="set CLEAR_COMFYUI=/path/to/ComfyUI to test against real ComfyUI"),
    pytest.mark.slow,
]

HIDDEN, HEADS, VEC, CTX, TEXT = 3072, 24, 16, 4096, 7
GRID = (6, 8)  # tokens; latent 12 x 16
TOL = 1e-5


# ----------------------------------------------------------------------------------------------- ComfyUI

def comfyui_version(root: Path) -> str:
    version = "?"
    vf = root / "comfyui_version.py"
    if vf.is_file():
        ns: dict = {}
        exec(vf.read_text(), ns)  # noqa: S102 (a one-line version file of the checkout under test)
        version = ns.get("__version__", "?")
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"ComfyUI {version}" + (f" at {commit}" if commit else "")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = Path(COMFY).expanduser().resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (before cli_args: ComfyUI parses no argv when imported)
    import comfy.cli_args

    comfy.cli_args.args.fp32_unet = True  # --fp32-unet: parity in fp32
    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # --cpu
    import folder_paths
    import nodes

    work = tmp_path_factory.mktemp("comfy_models")
    for kind in ("diffusion_models", "loras"):
        (work / kind).mkdir()
        folder_paths.add_model_folder_path(kind, str(work / kind), is_default=True)
    print(f"\n{comfyui_version(root)}")
    return type("Comfy", (), {"root": root, "work": work, "nodes": nodes, "folder_paths": folder_paths})


def _run(x):
    return asyncio.run(x) if inspect.iscoroutine(x) else x


@pytest.fixture(scope="module")
def node_cls(comfy, tmp_path_factory):
    """CLEAR Attention as ComfyUI loads it: `clear comfy install` into a ComfyUI folder, then ComfyUI's loader."""
    from clear_cli.comfy.install import install

    fake = tmp_path_factory.mktemp("ComfyUI")
    (fake / "comfy").mkdir()
    (fake / "custom_nodes").mkdir()
    res = install(fake)
    assert _run(comfy.nodes.load_custom_node(str(res.path))) is not False
    # (in this process clear_cli is imported already, so the pack's lib/ copy is not the one that runs here; the CLI
    # tests check that a fresh Python loads the pack from lib/)
    cls = comfy.nodes.NODE_CLASS_MAPPINGS["ClearAttention"]
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["ClearAttention"] == "CLEAR Attention"
    return cls


# ----------------------------------------------------------------------------------------------- the model

def _bfl_flux(seed: int = 0) -> dict[str, torch.Tensor]:
    """FLUX.1 in BFL layout with 1 double + 1 single block at FLUX.1's widths, random weights of FLUX-like scale."""
    g = torch.Generator().manual_seed(seed)

    def lin(name, out, inp, bias=True, gain=1.0):
        sd[f"{name}.weight"] = torch.randn(out, inp, generator=g) * (gain / inp ** 0.5)
        if bias:
            sd[f"{name}.bias"] = torch.randn(out, generator=g) * 0.02

    sd: dict[str, torch.Tensor] = {}
    lin("img_in", HIDDEN, 64)
    lin("txt_in", HIDDEN, CTX)
    for name, inp in (("time_in", 256), ("guidance_in", 256), ("vector_in", VEC)):
        lin(f"{name}.in_layer", HIDDEN, inp)
        lin(f"{name}.out_layer", HIDDEN, HIDDEN)
    mlp = 4 * HIDDEN
    b = "double_blocks.0."
    for br in ("img", "txt"):
        lin(f"{b}{br}_mod.lin", 6 * HIDDEN, HIDDEN, gain=0.5)
        lin(f"{b}{br}_attn.qkv", 3 * HIDDEN, HIDDEN)
        lin(f"{b}{br}_attn.proj", HIDDEN, HIDDEN)
        sd[f"{b}{br}_attn.norm.query_norm.scale"] = 1 + 0.1 * torch.randn(128, generator=g)
        sd[f"{b}{br}_attn.norm.key_norm.scale"] = 1 + 0.1 * torch.randn(128, generator=g)
        lin(f"{b}{br}_mlp.0", mlp, HIDDEN)
        lin(f"{b}{br}_mlp.2", HIDDEN, mlp)
    s = "single_blocks.0."
    lin(f"{s}modulation.lin", 3 * HIDDEN, HIDDEN, gain=0.5)
    lin(f"{s}linear1", 3 * HIDDEN + mlp, HIDDEN)
    lin(f"{s}linear2", HIDDEN, HIDDEN + mlp)
    sd[f"{s}norm.query_norm.scale"] = 1 + 0.1 * torch.randn(128, generator=g)
    sd[f"{s}norm.key_norm.scale"] = 1 + 0.1 * torch.randn(128, generator=g)
    lin("final_layer.linear", 64, HIDDEN)
    lin("final_layer.adaLN_modulation.1", 2 * HIDDEN, HIDDEN, gain=0.5)
    return sd


DIFFUSERS_CONFIG = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                        num_attention_heads=HEADS, joint_attention_dim=CTX, pooled_projection_dim=VEC,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def flux(comfy):
    """(ComfyUI MODEL from the stock UNETLoader, diffusers transformer from diffusers' converter): same file."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import save_file

    sd = _bfl_flux()
    save_file(sd, str(comfy.work / "diffusion_models" / "clear_test_flux.safetensors"))
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    del sd
    with init_empty_weights():
        tr = FluxTransformer2DModel(**DIFFUSERS_CONFIG)
    tr.load_state_dict(converted, strict=True, assign=True)
    tr.eval()
    del converted
    model = comfy.nodes.UNETLoader().load_unet("clear_test_flux.safetensors", "default")[0]
    dm = model.get_model_object("diffusion_model")
    assert type(dm).__name__ == "Flux" and dm.hidden_size == HIDDEN and dm.num_heads == HEADS
    assert sum(dm.params.axes_dim) == HIDDEN // HEADS  # the detector's RoPE axes fit the head size
    assert next(dm.parameters()).dtype == torch.float32
    return model, tr


def _student(tr, path: Path, window: int, f: int, seed: int) -> Path:
    """Attention weights a distillation could have produced (trained projections, pooling weights for f > 1)."""
    from clear_cli.models.weights import save_attention_weights

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in tr.named_parameters():
        if any(f".attn.{x}." in name for x in ("to_q", "to_k", "to_v", "to_out")):
            out[name] = p.detach() + torch.randn(p.shape, generator=g) * 0.2 * float(p.detach().abs().mean())
    if f > 1:
        for blk in ("transformer_blocks.0", "single_transformer_blocks.0"):
            w = torch.full((1, 1, 1, f, 1, f, 1), 1.0 / f ** 2) + 0.1 * torch.randn(1, 1, 1, f, 1, f, 1, generator=g)
            out[f"{blk}.attn.processor.spatial_weight"] = w
    return save_attention_weights(path, out, {"window": window, "down_factor": f, "base_model": "clear-test-flux"})


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    h, w = GRID
    return dict(noise=torch.randn(1, 16, 2 * h, 2 * w, generator=g), context=torch.randn(1, TEXT, CTX, generator=g),
                y=torch.randn(1, VEC, generator=g))


# ----------------------------------------------------------------------------------------------- one step each

def comfy_velocity(model, x) -> torch.Tensor:
    """One euler step from sigma 1 through ComfyUI's sampler; x0 = noise - v there, so v = noise - x0."""
    import comfy.sample

    pos = [[x["context"], {"pooled_output": x["y"], "guidance": 3.5}]]
    neg = [[torch.zeros_like(x["context"]), {"pooled_output": torch.zeros_like(x["y"]), "guidance": 3.5}]]
    out = comfy.sample.sample(model, x["noise"], 1, 1.0, "euler", "simple", pos, neg, torch.zeros_like(x["noise"]),
                              denoise=1.0, disable_pbar=True, seed=0)
    x0 = model.model.process_latent_in(out.float())
    return x["noise"] - x0


def diffusers_velocity(tr, x) -> torch.Tensor:
    b, c, hh, ww = x["noise"].shape
    h, w = hh // 2, ww // 2
    packed = x["noise"].view(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    with torch.no_grad():
        v = tr(hidden_states=packed, encoder_hidden_states=x["context"], pooled_projections=x["y"],
               timestep=torch.ones(b), guidance=torch.full((b,), 3.5), img_ids=ids.reshape(-1, 3),
               txt_ids=torch.zeros(TEXT, 3), return_dict=False)[0]
    return v.view(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh, ww)


def diffusers_clear(tr, x, weights: Path | None, window: int, f: int, **kw) -> torch.Tensor:
    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights, load_tensors

    linearize(tr, window=window, down_factor=f, backend="tiled", **kw)
    previous = apply_attention_weights(tr, load_attention_weights(weights)) if weights else {}
    try:
        return diffusers_velocity(tr, x)
    finally:
        load_tensors(tr, previous)
        unlinearize(tr)


def _diff(a, b) -> float:
    return float((a - b).abs().max())


def test_stock_models_agree_before_any_clear(flux, inputs):
    """The harness itself: ComfyUI's FLUX and diffusers' on the same file give the same velocity."""
    model, tr = flux
    d = _diff(comfy_velocity(model, inputs), diffusers_velocity(tr, inputs))
    print(f"stock ComfyUI vs stock diffusers: max |dv| = {d:.2e}")
    assert d < TOL


@pytest.mark.parametrize("window,f", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_node_matches_diffusers_linearize(flux, inputs, node_cls, tmp_path, window, f):
    model, tr = flux
    student = _student(tr, tmp_path / "clear_attn.safetensors", window, f, seed=window * 10 + f)
    patched = node_cls().apply(model, "none", 1.0, window, f, "tiled", weights_path=str(student))[0]
    got = comfy_velocity(patched, inputs)
    want = diffusers_clear(tr, inputs, student, window, f)
    full = diffusers_velocity(tr, inputs)
    d = _diff(got, want)
    print(f"r={window} f={f}: ComfyUI node vs diffusers+linearize max |dv| = {d:.2e} "
          f"(CLEAR vs stock attention: {_diff(want, full):.2e})")
    assert d < TOL
    assert _diff(want, full) > 100 * TOL  # CLEAR (and the weights) changed the model: the check can fail


def test_proportional_attention_and_ntk_match(flux, inputs, node_cls, tmp_path):
    model, tr = flux
    student = _student(tr, tmp_path / "clear_attn.safetensors", 2, 2, seed=5)
    patched = node_cls().apply(model, "none", 1.0, 2, 2, "tiled", weights_path=str(student),
                               proportional_attention=True, ntk_factor=10.0)[0]
    d = _diff(comfy_velocity(patched, inputs),
              diffusers_clear(tr, inputs, student, 2, 2, proportional_attention=True, ntk_factor=10.0))
    print(f"r=2 f=2, proportional attention + NTK x10: max |dv| = {d:.2e}")
    assert d < TOL


def test_comfy_lora_through_stock_loader_equals_the_attention_file(flux, inputs, node_cls, comfy, tmp_path,
                                                                   monkeypatch):
    """`clear export --format comfy` + LoraLoaderModelOnly + the node (apply_weights off) = the attention file."""
    import types

    import clear_cli.models.pipeline as pipeline
    from clear_cli.jobs.export import export

    model, tr = flux
    student = _student(tr, tmp_path / "clear_attn.safetensors", 2, 2, seed=11)
    monkeypatch.setattr(pipeline, "load_pipeline", lambda name, **kw: types.SimpleNamespace(transformer=tr))
    lora = comfy.work / "loras" / "clear_lora_comfy.safetensors"
    export(student, format="comfy", energy=1.0, out=lora, overwrite=True, progress=False)
    with_lora = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora.name, 1.0)[0]
    via_lora = node_cls().apply(with_lora, lora.name, 1.0, 0, 0, "tiled", apply_weights=False)[0]
    via_file = node_cls().apply(model, "none", 1.0, 0, 0, "tiled", weights_path=str(student))[0]
    a, b = comfy_velocity(via_lora, inputs), comfy_velocity(via_file, inputs)
    want = diffusers_clear(tr, inputs, student, 2, 2)
    print(f"comfy LoRA via LoraLoaderModelOnly vs attention file: {_diff(a, b):.2e}; vs diffusers {_diff(a, want):.2e}")
    assert _diff(a, b) < TOL and _diff(a, want) < TOL


def test_strength_and_other_loras_stack(flux, inputs, node_cls, tmp_path):
    """strength 0.5 = half the weight change (diffusers' model with W_base + 0.5 (W_student - W_base))."""
    from clear_cli.models.weights import load_attention_weights, save_attention_weights

    model, tr = flux
    student = _student(tr, tmp_path / "clear_attn.safetensors", 2, 1, seed=3)
    w = load_attention_weights(student)
    state = tr.state_dict()
    half = save_attention_weights(tmp_path / "half.safetensors",
                                  {k: state[k] + 0.5 * (v - state[k]) for k, v in w.tensors.items()},
                                  {"window": 2, "down_factor": 1})
    patched = node_cls().apply(model, "none", 0.5, 2, 0, "tiled", weights_path=str(student))[0]
    d = _diff(comfy_velocity(patched, inputs), diffusers_clear(tr, inputs, half, 2, 1))
    print(f"strength 0.5: max |dv| = {d:.2e}")
    assert d < TOL


def test_reference_images_step_aside_with_one_warning(flux, inputs, node_cls, caplog):
    """Kontext reference latents: the previous attention (stock), once warned; equal to stock ComfyUI's output."""
    import logging

    import comfy.sample

    model, _ = flux
    patched = node_cls().apply(model, "none", 1.0, 2, 1, "tiled")[0]
    ref = [torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))]

    def run(m):
        pos = [[inputs["context"], {"pooled_output": inputs["y"], "guidance": 3.5, "reference_latents": ref}]]
        return comfy.sample.sample(m, inputs["noise"], 1, 1.0, "euler", "simple", pos, pos,
                                   torch.zeros_like(inputs["noise"]), disable_pbar=True, seed=0)

    with caplog.at_level(logging.WARNING, "clear_cli.comfy"):
        caplog.clear()
        got = run(patched)
    warned = [r.getMessage() for r in caplog.records if r.name == "clear_cli.comfy"]
    assert len(warned) == 1 and "reference-image" in warned[0]
    assert _diff(got, run(model)) < TOL


def test_static_shift_keeps_the_sdedit_start(flux):
    """The workflow's ModelSamplingFlux at the base size: a 0.7 stage starts near sigma 0.88, not at pure noise."""
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    model, _ = flux
    starts = {}
    for size in (1024, 4096):
        m = ModelSamplingFlux().patch(model, 1.15, 0.5, size, size)[0]
        ks = comfy.samplers.KSampler(m, steps=14, device="cpu", sampler="euler", scheduler="simple", denoise=0.7,
                                     model_options=m.model_options)
        starts[size] = float(ks.sigmas[0])
    print(f"denoise 0.7, 14 steps: start sigma {starts[1024]:.3f} with the base size's shift, "
          f"{starts[4096]:.5f} with the 4096 size's")
    assert 0.85 < starts[1024] < 0.9 and starts[4096] > 0.999


def test_example_workflow_matches_this_comfyui(comfy, node_cls):
    """Every node of the shipped API workflow exists here, with these inputs in this widget order."""
    import json

    from clear_cli.comfy.install import pack_source
    from clear_cli.comfy.workflows import NAME, WIDGETS

    _run(comfy.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    api = json.loads((pack_source() / "api_workflows" / f"{NAME}_api.json").read_text())
    for nid, node in api.items():
        cls = comfy.nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
        spec = cls.INPUT_TYPES()
        names = [k for part in ("required", "optional") for k in spec.get(part, {})]
        assert set(node["inputs"]) <= set(names), (nid, node["class_type"], set(node["inputs"]) - set(names))
        widgets = [k for k in names if k in node["inputs"] and not isinstance(node["inputs"][k], list)]
        assert widgets == [k for k in WIDGETS[node["class_type"]] if k in widgets], node["class_type"]
        for k, v in node["inputs"].items():
            kind = spec.get("required", {}).get(k) or spec.get("optional", {}).get(k)
            if isinstance(kind[0], list) and not isinstance(v, list) and k not in ("unet_name", "clip_name1",
                                                                                   "clip_name2", "vae_name"):
                assert v in kind[0], (node["class_type"], k, v)


def test_node_pack_pyproject_reads_with_comfyuis_parser(comfy):
    """The [tool.comfy] metadata as ComfyUI's own registry parser reads it (needs pydantic-settings)."""
    from clear_cli.comfy.install import pack_source

    config_parser = pytest.importorskip("comfy_config.config_parser")
    cfg = config_parser.extract_node_configuration(str(pack_source()))
    assert cfg.project.name == "comfyui-clear" and cfg.project.dependencies == []
    assert cfg.tool_comfy.display_name == "CLEAR Attention" and cfg.tool_comfy.publisher_id
