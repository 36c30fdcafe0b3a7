"""Attention-weight files as ComfyUI weight patches, and their pooling weights per block.

Every file the node takes becomes `diff` patches on the ComfyUI model's own keys (slices of the fused layers where
diffusers' projections are fused: `comfy.keys`), which ComfyUI applies as W += strength * diff when it loads the
model, so the node's strength and other LoRAs stack:

- our attention file (`clear distill`, `clear export --format full`) and the published checkpoints hold absolute
  projections: diff = file - the model's current (unpatched) weights, so strength 1 gives the file's weights on
  the model it was trained from. (On a derivative of FLUX.1-dev that overwrites the derivative's projections; to
  apply a file as a delta there, export a LoRA against FLUX.1-dev and load that instead: docs/comfyui.md.)
- our diffusers LoRA (`--format lora`): diff = B @ A, bias diff = the stored bias delta.
- our ComfyUI LoRA (`--format comfy`, `lora_unet_*`): diff = alpha / rank * up @ down on the whole fused layer,
  bias diff = `diff_b`, exactly what ComfyUI's LoRA loader would do.

Pooling weights (down_factor > 1) come out per (block type, block index), e.g. ("single", 3), the key the attention
override looks them up by.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clear_cli.comfy.keys import DOUBLE_PROJ, SINGLE_PROJ, block_of, to_comfy
from clear_cli.errors import ClearError

PREFIX = "diffusion_model."
_COMFY_LORA = re.compile(r"^(?P<name>lora_unet_\w+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|diff_b)$")

Patches = dict  # {comfy key or (comfy key, (dim, start, length)): ("diff", (tensor,))}


@dataclass
class ComfyLora:
    """Our `clear export --format comfy` file: low-rank factors per fused ComfyUI layer, bias diffs, pooling weights."""

    path: Path
    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    alpha: dict[str, float]
    diff_b: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]
    """pooling weights under the transformer's keys (``<attn>.processor.spatial_weight``)"""
    window: int | None
    down_factor: int | None
    metadata: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    kind: str = "comfy"


def is_comfy_lora(keys) -> bool:
    return any(k.startswith("lora_unet_") for k in keys)


def load_weights(spec: str | os.PathLike):
    """Read any file the node takes: AttnWeights (ours, published, our diffusers LoRA) or ComfyLora (ours)."""
    from clear_cli.models.weights import _read_safetensors, load_attention_weights, resolve_spec

    path = resolve_spec(spec)
    tensors, meta = _read_safetensors(path)
    if not is_comfy_lora(tensors):
        return load_attention_weights(path)
    return _comfy_lora(path, tensors, meta)


def _comfy_lora(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> ComfyLora:
    from clear_cli.models.weights import POOL_PREFIX, _meta_int, _pool_factor, processor_key

    down: dict[str, torch.Tensor] = {}
    up: dict[str, torch.Tensor] = {}
    alpha: dict[str, float] = {}
    diff_b: dict[str, torch.Tensor] = {}
    pools: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for k, v in tensors.items():
        if k.startswith(POOL_PREFIX):
            pools[processor_key(k)] = v
            continue
        m = _COMFY_LORA.match(k)
        if m is None:
            bad.append(k)
            continue
        name, part = m["name"], m["part"]
        if part == "lora_down.weight":
            down[name] = v
        elif part == "lora_up.weight":
            up[name] = v
        elif part == "alpha":
            alpha[name] = float(v)
        else:
            diff_b[name] = v
    if bad:
        raise ClearError(f"{path.name} is not a CLEAR ComfyUI LoRA: {len(bad)} key(s) are neither lora_unet_* "
                         f"factors nor clear_pool.* pooling weights (e.g. {bad[0]})",
                         "pass the file `clear export --format comfy` wrote, or load other LoRAs with LoraLoader")
    for name in sorted(set(down) | set(up)):
        if name not in down or name not in up:
            raise ClearError(f"{path.name}: {name} lacks its {'lora_down' if name not in down else 'lora_up'} "
                             "weight", "re-export it with `clear export --format comfy`")
        if down[name].ndim != 2 or up[name].ndim != 2 or up[name].shape[1] != down[name].shape[0]:
            raise ClearError(f"{path.name}: {name} has lora_down {list(down[name].shape)} and lora_up "
                             f"{list(up[name].shape)}, expected [rank, in] and [out, rank]")
    window, f = _meta_int(meta, "window", path), _meta_int(meta, "down_factor", path)
    shape_f = _pool_factor(pools, path)
    origin = {k: "metadata" for k, v in (("window", window), ("down_factor", f)) if v is not None}
    if shape_f is not None and f is not None and shape_f != f:
        raise ClearError(f"{path.name}: metadata says down_factor {f} but the pooling weights are "
                         f"{shape_f}x{shape_f}", "the file is inconsistent; re-export it")
    if f is None:
        f, origin["down_factor"] = (shape_f, "pooling weights' shape") if shape_f else (1, "no pooling weights")
    return ComfyLora(path=path, down=down, up=up, alpha=alpha, diff_b=diff_b, tensors=pools, window=window,
                     down_factor=f, metadata=meta, origin=origin)


def pool_weights(weights) -> dict[tuple[str, int], torch.Tensor]:
    """{(block type, block index): [f, f] pooling weight} of a file (empty for down_factor 1)."""
    from clear_cli.models.weights import POOL_SUFFIX

    out: dict[tuple[str, int], torch.Tensor] = {}
    for k, v in weights.tensors.items():
        if k.endswith(POOL_SUFFIX):
            block = block_of(k)
            if block is None:
                raise ClearError(f"{weights.path.name}: pooling weight {k} belongs to no FLUX block")
            f = int(v.shape[3])
            out[block] = v.detach().reshape(f, f).to("cpu", torch.float32)
    return out


def diff_dtype(base: torch.dtype, source: torch.dtype) -> torch.dtype:
    """Precision of a stored diff: the model's own when it is a float type ComfyUI computes in, else the file's."""
    if base in (torch.float32, torch.float16, torch.bfloat16):
        return base
    return source if source in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def weight_patches(weights, base: Callable[[str], torch.Tensor], hidden: int, *, prefix: str = PREFIX) -> Patches:
    """ComfyUI `diff` patches for every projection in `weights` (see the module docstring).

    `base(key)`: the model's current unpatched tensor for a ComfyUI key (KeyError when it has none); `hidden`: the
    model width. ClearError, naming the tensor, when the file does not fit the model.
    """
    from clear_cli.models.weights import POOL_SUFFIX

    patches: Patches = {}
    name = weights.path.name

    def target(key: str) -> tuple[str, tuple[int, int, int] | None, torch.Tensor]:
        try:
            ckey, offset = to_comfy(key, hidden, prefix)
        except KeyError as e:
            raise ClearError(f"weights {name}: {e.args[0]}", "pass a CLEAR attention file for FLUX") from None
        try:
            full = base(ckey)
        except KeyError:
            raise ClearError(f"weights {name} do not fit this model: it has no {ckey[len(prefix):]} (for {key})",
                             "were they made for a FLUX model with more blocks?") from None
        part = full if offset is None else full.narrow(*offset)  # a view: nothing is copied
        return ckey, offset, part

    def put(ckey: str, offset, diff: torch.Tensor, like: torch.Tensor, key: str, source: torch.dtype) -> None:
        if tuple(diff.shape) != tuple(like.shape):
            raise ClearError(f"weights {name} do not fit this model: {key} is {list(diff.shape)}, the model's "
                             f"{ckey[len(prefix):]}{'' if offset is None else ' rows'} {list(like.shape)}",
                             "were they made for another FLUX size?")
        diff = diff.to("cpu", diff_dtype(like.dtype, source)).contiguous()  # ComfyUI moves patches where it needs
        patches[ckey if offset is None else (ckey, offset)] = ("diff", (diff,))

    if getattr(weights, "kind", "") == "comfy":
        names = {layer: _comfy_layer_key(layer, name, prefix) for layer in set(weights.down) | set(weights.diff_b)}
        for layer in sorted(weights.down):
            ckey = names[layer]
            d, u = weights.down[layer].float(), weights.up[layer].float()
            scale = weights.alpha.get(layer, float(d.shape[0])) / d.shape[0]
            put(ckey, None, scale * (u @ d), _base_or_fail(base, ckey, name, prefix), layer, weights.up[layer].dtype)
        for layer, db in sorted(weights.diff_b.items()):
            bkey = names[layer][: -len(".weight")] + ".bias"
            put(bkey, None, db.float(), _base_or_fail(base, bkey, name, prefix), f"{layer}.diff_b", db.dtype)
        return patches

    for module, d in sorted(getattr(weights, "lora", {}).items()):
        ckey, offset, like = target(f"{module}.weight")
        put(ckey, offset, d.B.float() @ d.A.float(), like, module, d.B.dtype)
        if d.bias is not None:
            bkey, boff, blike = target(f"{module}.bias")
            put(bkey, boff, d.bias.float(), blike, f"{module} (bias)", d.bias.dtype)
    for key, v in sorted(weights.tensors.items()):
        if key.endswith(POOL_SUFFIX):
            continue
        ckey, offset, like = target(key)
        put(ckey, offset, v.float() - like.detach().to("cpu").float(), like, key, v.dtype)
    return patches


def _comfy_layer_key(layer: str, name: str, prefix: str) -> str:
    """The ComfyUI weight key of a `lora_unet_` layer name of our comfy export (only the layers it writes)."""
    m = re.match(r"^lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)$", layer)
    table = DOUBLE_PROJ if m and m[1] == "double_blocks" else SINGLE_PROJ
    layers = {n.replace(".", "_"): n for n, _ in table.values()}
    if m is None or m[3] not in layers:
        raise ClearError(f"weights {name}: {layer} is not an attention layer of ComfyUI's FLUX",
                         "pass the file `clear export --format comfy` wrote")
    return f"{prefix}{m[1]}.{m[2]}.{layers[m[3]]}.weight"


def _base_or_fail(base: Callable[[str], torch.Tensor], key: str, name: str, prefix: str) -> torch.Tensor:
    try:
        return base(key)
    except KeyError:
        raise ClearError(f"weights {name} do not fit this model: it has no {key[len(prefix):]}") from None


def state_lookup(state: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """`base` for `weight_patches` over a plain state dict."""
    return lambda key: state[key]
