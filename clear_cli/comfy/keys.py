"""Where a diffusers FLUX attention parameter lives in ComfyUI's FLUX (the BFL layout ComfyUI keeps).

ComfyUI stores FLUX's attention fused: in double block N, `double_blocks.N.img_attn.qkv` holds [q; k; v] rows
(`to_q`, `to_k`, `to_v` of diffusers' `transformer_blocks.N.attn`), `img_attn.proj` is `to_out.0`, and the text
branch (`add_*_proj`, `to_add_out`) is `txt_attn.qkv` / `txt_attn.proj`; in single block N, `single_blocks.N.linear1`
holds [q; k; v; mlp_in] rows, so `to_q/k/v` are its first 3 x hidden rows. The RMSNorm scales are
`...norm.query_norm.scale` / `...norm.key_norm.scale`. Pooling weights (down_factor > 1) have no place in ComfyUI's
model: the node keeps them per (block type, block index).

`to_comfy` gives (ComfyUI key, row offset) for one diffusers key, the offset as ComfyUI's patches take it
(`(dim, start, length)`, as in `comfy.utils.flux_to_diffusers`). A test checks every mapping against diffusers' own
FLUX single-file converter (`convert_flux_transformer_checkpoint_to_diffusers`), an independent reading of the layout.
"""

from __future__ import annotations

import re

# diffusers projection under transformer_blocks.N.attn. -> (BFL layer under double_blocks.N., row slot); slots of a
# fused layer are stacked in slot order (q, k, v); an unfused layer has the one slot 0.
DOUBLE_PROJ = {
    "to_q": ("img_attn.qkv", 0), "to_k": ("img_attn.qkv", 1), "to_v": ("img_attn.qkv", 2),
    "to_out.0": ("img_attn.proj", 0),
    "add_q_proj": ("txt_attn.qkv", 0), "add_k_proj": ("txt_attn.qkv", 1), "add_v_proj": ("txt_attn.qkv", 2),
    "to_add_out": ("txt_attn.proj", 0),
}
# single_transformer_blocks.N.attn. -> single_blocks.N.: linear1 = [q; k; v; mlp_in] rows (mlp_in is `proj_mlp`,
# outside the attention module, after the three hidden-wide slots).
SINGLE_PROJ = {"to_q": ("linear1", 0), "to_k": ("linear1", 1), "to_v": ("linear1", 2)}
DOUBLE_NORMS = {
    "norm_q.weight": "img_attn.norm.query_norm.scale", "norm_k.weight": "img_attn.norm.key_norm.scale",
    "norm_added_q.weight": "txt_attn.norm.query_norm.scale", "norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_NORMS = {"norm_q.weight": "norm.query_norm.scale", "norm_k.weight": "norm.key_norm.scale"}
FUSED = ("qkv", "linear1")  # layer names whose rows are several diffusers projections

BLOCKS = {"transformer_blocks": ("double_blocks", "double"), "single_transformer_blocks": ("single_blocks", "single")}
_KEY = re.compile(r"^(?P<block>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.attn\.(?P<rest>.+)$")


def block_of(key: str) -> tuple[str, int] | None:
    """("double" | "single", block index) of a diffusers attention key (or module path), None if it is not one."""
    m = _KEY.match(key)
    return None if m is None else (BLOCKS[m["block"]][1], int(m["i"]))


def to_comfy(key: str, hidden: int, prefix: str = "diffusion_model.") -> tuple[str, tuple[int, int, int] | None]:
    """(ComfyUI state-dict key, (dim, start, length) rows of it or None for the whole tensor) of a diffusers key.

    `key`: a diffusers FLUX attention parameter (`transformer_blocks.0.attn.to_k.bias`, ...); `hidden`: the model
    width (3072 for FLUX.1). KeyError, naming the key, for anything with no place in ComfyUI's FLUX (pooling
    weights, unknown projections).
    """
    m = _KEY.match(key)
    if m is None:
        raise KeyError(f"{key} is not an attention parameter of a FLUX block")
    bfl_block, kind = BLOCKS[m["block"]]
    base = f"{prefix}{bfl_block}.{m['i']}."
    rest = m["rest"]
    norms = DOUBLE_NORMS if kind == "double" else SINGLE_NORMS
    if rest in norms:
        return base + norms[rest], None
    module, _, part = rest.rpartition(".")
    table = DOUBLE_PROJ if kind == "double" else SINGLE_PROJ
    if part not in ("weight", "bias") or module not in table:
        raise KeyError(f"{key} has no place in ComfyUI's FLUX layout")
    layer, slot = table[module]
    offset = (0, slot * hidden, hidden) if layer.endswith(FUSED) else None
    return f"{base}{layer}.{part}", offset


def lora_name(comfy_key: str, prefix: str = "diffusion_model.") -> str:
    """ComfyUI's `lora_unet_` name of a model weight key (comfy/lora.py, model_lora_keys_unet): dots as underscores."""
    stem = comfy_key[len(prefix):] if comfy_key.startswith(prefix) else comfy_key
    stem = stem[: -len(".weight")] if stem.endswith(".weight") else stem
    return "lora_unet_" + stem.replace(".", "_")
