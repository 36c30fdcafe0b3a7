"""The example ComfyUI workflows the node pack ships, built from one description in both of ComfyUI's formats.

`hires_workflow()` is the authors' high-resolution protocol (DESIGN.md §5) as a ComfyUI graph: the stock model
draws ~1024^2, then each stage decodes, upscales the image x2 (bicubic), encodes (tiled VAE), and re-samples it with
the CLEAR model at denoise 0.7 (14 steps of a 20-step schedule, as `clear gen`'s refinement), guidance 7.5 (the
authors'), proportional attention and RoPE NTK x10, under a static shift: ModelSamplingFlux at the *base* size
(1024 x 1024), never the stage's (at 4096 x 4096 its shift, mu = 11.5, would start a 0.7 stage at sigma 1.0, pure
noise). The UI file goes to example_workflows/ (ComfyUI lists it under the node pack's templates), the API file
(for `POST /prompt`) to api_workflows/. Regenerate: `python -m clear_cli.comfy.workflows`; a test keeps the shipped
files equal to this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# class -> its widget inputs in INPUT_TYPES order (a test checks them against a real ComfyUI); outputs
WIDGETS = {
    "UNETLoader": ["unet_name", "weight_dtype"],
    "DualCLIPLoader": ["clip_name1", "clip_name2", "type", "device"],
    "VAELoader": ["vae_name"],
    "CLIPTextEncode": ["text"],
    "ConditioningZeroOut": [],
    "FluxGuidance": ["guidance"],
    "EmptySD3LatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [],
    "VAEDecodeTiled": ["tile_size", "overlap", "temporal_size", "temporal_overlap"],
    "VAEEncodeTiled": ["tile_size", "overlap", "temporal_size", "temporal_overlap"],
    "ImageScaleBy": ["upscale_method", "scale_by"],
    "ModelSamplingFlux": ["max_shift", "base_shift", "width", "height"],
    "ClearAttention": ["weights", "strength", "window", "down_factor", "backend", "weights_path", "apply_weights",
                       "proportional_attention", "ntk_factor"],
    "SaveImage": ["filename_prefix"],
    "PreviewImage": [],
}
OUTPUTS = {
    "UNETLoader": ["MODEL"], "DualCLIPLoader": ["CLIP"], "VAELoader": ["VAE"], "CLIPTextEncode": ["CONDITIONING"],
    "ConditioningZeroOut": ["CONDITIONING"], "FluxGuidance": ["CONDITIONING"], "EmptySD3LatentImage": ["LATENT"],
    "KSampler": ["LATENT"], "VAEDecode": ["IMAGE"], "VAEDecodeTiled": ["IMAGE"], "VAEEncodeTiled": ["LATENT"],
    "ImageScaleBy": ["IMAGE"], "ModelSamplingFlux": ["MODEL"], "ClearAttention": ["MODEL"], "SaveImage": [],
    "PreviewImage": [],
}
SEEDED = {"KSampler": "seed"}  # widgets the UI follows with a "control after generate" value
NAME = "CLEAR_FLUX_4K"


@dataclass
class Node:
    id: int
    cls: str
    title: str
    widgets: dict
    links: dict = field(default_factory=dict)  # input name -> (source node id, output slot, type)


def hires_workflow(prompt: str = "a lighthouse on a cliff at sunset, dramatic sky, highly detailed",
                   weights_path: str = "Huage001/CLEAR:clear_local_16.safetensors", base: int = 1024,
                   stages: int = 2, seed: int = 42) -> list[Node]:
    """The graph: base image at `base` px, then `stages` CLEAR refinements of x2 (2 stages: 1K -> 2K -> 4K)."""
    tiles = dict(tile_size=512, overlap=64, temporal_size=64, temporal_overlap=8)
    n = [
        Node(1, "UNETLoader", "Load FLUX.1-dev", dict(unet_name="flux1-dev.safetensors", weight_dtype="default")),
        Node(2, "DualCLIPLoader", "Load CLIP-L + T5", dict(clip_name1="clip_l.safetensors",
                                                           clip_name2="t5xxl_fp16.safetensors", type="flux",
                                                           device="default")),
        Node(3, "VAELoader", "Load VAE", dict(vae_name="ae.safetensors")),
        Node(4, "CLIPTextEncode", "Prompt", dict(text=prompt), {"clip": (2, 0, "CLIP")}),
        Node(5, "ConditioningZeroOut", "Negative (unused at cfg 1)", {}, {"conditioning": (4, 0, "CONDITIONING")}),
        Node(6, "FluxGuidance", "Guidance 3.5 (base)", dict(guidance=3.5), {"conditioning": (4, 0, "CONDITIONING")}),
        Node(7, "EmptySD3LatentImage", "Base size (same aspect as the target)",
             dict(width=base, height=base, batch_size=1)),
        Node(8, "KSampler", "Base image: stock FLUX, full attention",
             dict(seed=seed, steps=28, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0),
             {"model": (1, 0, "MODEL"), "positive": (6, 0, "CONDITIONING"), "negative": (5, 0, "CONDITIONING"),
              "latent_image": (7, 0, "LATENT")}),
        Node(9, "VAEDecode", "Decode base", {}, {"samples": (8, 0, "LATENT"), "vae": (3, 0, "VAE")}),
        Node(10, "PreviewImage", "Base image", {}, {"images": (9, 0, "IMAGE")}),
        Node(11, "ClearAttention", "CLEAR Attention (r = 16)",
             dict(weights="none", strength=1.0, window=0, down_factor=0, backend="auto", weights_path=weights_path,
                  apply_weights=True, proportional_attention=True, ntk_factor=10.0), {"model": (1, 0, "MODEL")}),
        Node(12, "ModelSamplingFlux", "Static shift: the BASE size, not the stage's",
             dict(max_shift=1.15, base_shift=0.5, width=base, height=base), {"model": (11, 0, "MODEL")}),
        Node(13, "FluxGuidance", "Guidance 7.5 (refinement, the authors')", dict(guidance=7.5),
             {"conditioning": (4, 0, "CONDITIONING")}),
    ]
    image, nid = (9, 0), 14
    for s in range(stages):
        size = base * 2 ** (s + 1)
        n += [
            Node(nid, "ImageScaleBy", f"Upscale x2 to {size}", dict(upscale_method="bicubic", scale_by=2.0),
                 {"image": (*image, "IMAGE")}),
            Node(nid + 1, "VAEEncodeTiled", f"Encode {size}", dict(tiles),
                 {"pixels": (nid, 0, "IMAGE"), "vae": (3, 0, "VAE")}),
            Node(nid + 2, "KSampler", f"CLEAR refine {size}: denoise 0.7 (14 of 20 steps)",
                 dict(seed=seed, steps=14, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=0.7),
                 {"model": (12, 0, "MODEL"), "positive": (13, 0, "CONDITIONING"),
                  "negative": (5, 0, "CONDITIONING"), "latent_image": (nid + 1, 0, "LATENT")}),
            Node(nid + 3, "VAEDecodeTiled", f"Decode {size} (tiled)", dict(tiles),
                 {"samples": (nid + 2, 0, "LATENT"), "vae": (3, 0, "VAE")}),
        ]
        image, nid = (nid + 3, 0), nid + 4
    n.append(Node(nid, "SaveImage", "Save", dict(filename_prefix="CLEAR_4K" if stages == 2 else "CLEAR"),
                  {"images": (*image, "IMAGE")}))
    return n


def to_api(nodes: list[Node]) -> dict:
    """ComfyUI's API format (what `POST /prompt` takes)."""
    out = {}
    for nd in nodes:
        inputs = dict(nd.widgets)
        inputs.update({k: [str(src), slot] for k, (src, slot, _) in nd.links.items()})
        out[str(nd.id)] = {"class_type": nd.cls, "inputs": inputs, "_meta": {"title": nd.title}}
    return out


def to_ui(nodes: list[Node]) -> dict:
    """ComfyUI's UI (LiteGraph) format: what Workflow > Open and the templates browser load."""
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for nd in nodes:
        for k, (src, slot, typ) in nd.links.items():
            lid = len(links) + 1
            links.append([lid, src, slot, nd.id, list(nd.links).index(k), typ])
            out_links.setdefault((src, slot), []).append(lid)
    link_of = {(lk[3], lk[4]): lk[0] for lk in links}
    for order, nd in enumerate(nodes):
        values = []
        for name in WIDGETS[nd.cls]:
            values.append(nd.widgets[name])
            if SEEDED.get(nd.cls) == name:
                values.append("fixed")
        col, row = divmod(order, 7)
        ui_nodes.append({
            "id": nd.id, "type": nd.cls, "title": nd.title, "pos": [40 + 380 * col, 40 + 230 * row],
            "size": [340, 130], "flags": {}, "order": order, "mode": 0,
            "inputs": [{"name": k, "type": typ, "link": link_of[(nd.id, i)]}
                       for i, (k, (_, _, typ)) in enumerate(nd.links.items())],
            "outputs": [{"name": typ, "type": typ, "links": out_links.get((nd.id, slot), []), "slot_index": slot}
                        for slot, typ in enumerate(OUTPUTS[nd.cls])],
            "properties": {"Node name for S&R": nd.cls},
            "widgets_values": values,
        })
    return {"last_node_id": max(nd.id for nd in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def shipped() -> dict[str, dict]:
    """{path relative to the node pack: JSON} of every workflow the node pack ships."""
    nodes = hires_workflow()
    return {f"example_workflows/{NAME}.json": to_ui(nodes), f"api_workflows/{NAME}_api.json": to_api(nodes)}


def render(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def write(pack: Path | None = None) -> list[Path]:
    from clear_cli.comfy.install import pack_source

    root = pack or pack_source()
    out = []
    for rel, obj in shipped().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(obj))
        out.append(path)
    return out


if __name__ == "__main__":
    for p in write():
        print(p)
