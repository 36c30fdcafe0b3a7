"""Stand-ins for the parts of ComfyUI the CLEAR node touches, for CI (ComfyUI itself is GPL-3.0, not on PyPI and
never vendored; tests/integration/test_comfyui_real.py runs the same node against a real checkout).

They follow ComfyUI's contracts as its source describes them, not its code:
- `StandInPatcher`: ModelPatcher's clone / add_patches (patches keyed by key or (key, (dim, start, length)), applied
  as W[narrow] += strength * diff) / get_key_patches / wrappers / callbacks / object patches / model_options
  (deep-copied by clone).
- `comfy_attention`: the attention dispatch in comfy/ldm/modules/attention.py: with an override in
  transformer_options, call `override(func, q, k, v, heads, **kwargs)` instead of `func`.
- `FakeFlux`: a diffusion model with FLUX's `_forward` signature, patch size and blocks, whose blocks make one
  attention call each on [B, heads, T + H*W, D] (text first), optionally reporting block_type / block_index.
- `bfl_state`: a diffusers FLUX state dict in ComfyUI's fused layout (checked against diffusers' own converter).
"""

from __future__ import annotations

import copy
import types

import torch
import torch.nn.functional as F
from torch import nn

PREFIX = "diffusion_model."


# ----------------------------------------------------------------------------------------------- layouts

def bfl_state(state: dict[str, torch.Tensor], n_double: int, n_single: int, prefix: str = PREFIX
              ) -> dict[str, torch.Tensor]:
    """The attention tensors of a diffusers FLUX state dict in ComfyUI's layout (fused qkv, linear1 with mlp rows)."""
    out = {}
    for i in range(n_double):
        a, o = f"transformer_blocks.{i}.attn.", f"{prefix}double_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{o}img_attn.qkv.{part}"] = torch.cat([state[f"{a}to_{x}.{part}"] for x in "qkv"])
            out[f"{o}img_attn.proj.{part}"] = state[f"{a}to_out.0.{part}"]
            out[f"{o}txt_attn.qkv.{part}"] = torch.cat([state[f"{a}add_{x}_proj.{part}"] for x in "qkv"])
            out[f"{o}txt_attn.proj.{part}"] = state[f"{a}to_add_out.{part}"]
        for d, c in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                     ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{o}{c}.scale"] = state[f"{a}{d}.weight"]
    for i in range(n_single):
        b, o = f"single_transformer_blocks.{i}.", f"{prefix}single_blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{o}linear1.{part}"] = torch.cat([state[f"{b}attn.to_{x}.{part}"] for x in "qkv"]
                                                  + [state[f"{b}proj_mlp.{part}"]])
        out[f"{o}norm.query_norm.scale"] = state[f"{b}attn.norm_q.weight"]
        out[f"{o}norm.key_norm.scale"] = state[f"{b}attn.norm_k.weight"]
    return out


# ----------------------------------------------------------------------------------------------- attention

def plain_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                    **kwargs):
    """A ComfyUI-style backend: [B, H, L, D] (skip_reshape) or [B, L, H*D] in; [B, L, H*D] out unless told."""
    if not skip_reshape:
        q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def comfy_attention(q, k, v, heads, *, transformer_options, mask=None, skip_reshape=True, func=plain_attention):
    """The override dispatch: the override (when set) gets the backend and every argument."""
    override = (transformer_options or {}).get("optimized_attention_override")
    kw = dict(mask=mask, skip_reshape=skip_reshape, transformer_options=transformer_options)
    if override is not None:
        return override(func, q, k, v, heads, _inside_attn_wrapper=True, **kw)
    return func(q, k, v, heads, **kw)


# ----------------------------------------------------------------------------------------------- a fake FLUX

class FakeBlock(nn.Module):
    """One attention call per forward on q = k = v = a fixed projection of the joint sequence."""

    def __init__(self, kind: str, index: int, heads: int, head_dim: int, report: bool, log: list):
        super().__init__()
        self.kind, self.index, self.heads, self.head_dim, self.report, self.log = kind, index, heads, head_dim, \
            report, log
        self.seed = 100 + index + (50 if kind == "single" else 0)

    def forward(self, seq: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if self.report:  # newer ComfyUI sets these in transformer_options before each block
            transformer_options["block_type"] = self.kind
            transformer_options["block_index"] = self.index
        b, n, _ = seq.shape
        g = torch.Generator().manual_seed(self.seed)
        qkv = torch.randn(3, b, self.heads, n, self.head_dim, generator=g)
        out = comfy_attention(*qkv, self.heads, transformer_options=transformer_options)
        self.log.append((self.kind, self.index, out))
        return seq


class FakeFlux(nn.Module):
    """FLUX's `_forward` signature, patch size, text-first joint sequence and double/single blocks."""

    def __init__(self, n_double: int = 2, n_single: int = 2, heads: int = 2, head_dim: int = 8,
                 report_blocks: bool = False):
        super().__init__()
        self.patch_size = 2
        self.hidden_size = heads * head_dim
        self.params = types.SimpleNamespace(patch_size=2)
        self.log: list = []
        self.seen_options: list[dict] = []
        self.double_blocks = nn.ModuleList(FakeBlock("double", i, heads, head_dim, report_blocks, self.log)
                                           for i in range(n_double))
        self.single_blocks = nn.ModuleList(FakeBlock("single", i, heads, head_dim, report_blocks, self.log)
                                           for i in range(n_single))
        self.pe_embedder = types.SimpleNamespace(theta=10000, axes_dim=[2, 3, 3])

    def _forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        self.seen_options.append(transformer_options)
        h, w = -(-x.shape[-2] // 2), -(-x.shape[-1] // 2)
        extra = 0 if ref_latents is None else sum(-(-r.shape[-2] // 2) * -(-r.shape[-1] // 2) for r in ref_latents)
        seq = torch.zeros(x.shape[0], context.shape[1] + h * w + extra, self.hidden_size)
        for block in list(self.double_blocks) + list(self.single_blocks):
            seq = block(seq, transformer_options=transformer_options)
        return x


FakeFlux.__name__ = FakeFlux.__qualname__ = "Flux"
FakeFlux.__module__ = "comfy.ldm.flux.model"


class Executor:
    """ComfyUI's WrapperExecutor, reduced: wrappers in order, then the model's _forward."""

    def __init__(self, model, wrappers: list, idx: int = 0):
        self.class_obj, self.wrappers, self.idx = model, wrappers, idx

    def __call__(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.class_obj._forward(*args, **kwargs)
        return self.wrappers[self.idx](Executor(self.class_obj, self.wrappers, self.idx + 1), *args, **kwargs)


# ----------------------------------------------------------------------------------------------- ModelPatcher

class Holder(nn.Module):
    """model.diffusion_model + the fused attention tensors under ComfyUI's keys (buffers are enough here)."""

    def __init__(self, diffusion_model: nn.Module, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.diffusion_model = diffusion_model
        self._fused = {k: v.clone() for k, v in tensors.items()}

    def state_dict(self, *args, **kwargs):  # the keys ComfyUI's model has, e.g. diffusion_model.single_blocks.0...
        return dict(self._fused)


class StandInPatcher:
    """The ModelPatcher API the node uses, with its semantics."""

    def __init__(self, model: Holder):
        self.model = model
        self.patches: dict[str, list] = {}
        self.model_options: dict = {"transformer_options": {}}
        self.wrappers: dict[str, dict[str, list]] = {}
        self.callbacks: dict[str, dict[str, list]] = {}
        self.object_patches: dict[str, object] = {}

    def clone(self) -> "StandInPatcher":
        n = StandInPatcher(self.model)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: v[:] for k, v in d.items()} for t, d in self.wrappers.items()}
        n.callbacks = {t: {k: v[:] for k, v in d.items()} for t, d in self.callbacks.items()}
        n.object_patches = dict(self.object_patches)
        return n

    def get_model_object(self, name: str):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def get_key_patches(self, filter_prefix=None):
        return {k: [(v, lambda a, **kw: a)] + self.patches.get(k, []) for k, v in self.model.state_dict().items()
                if filter_prefix is None or k.startswith(filter_prefix)}

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        sd, added = self.model.state_dict(), []
        for k, v in patches.items():
            key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
            if key in sd:
                self.patches.setdefault(key, []).append((strength_patch, v, strength_model, offset, None))
                added.append(k)
        return added

    def patched_state(self) -> dict[str, torch.Tensor]:
        """Every patched weight as ComfyUI computes it: W (or its rows) += strength * diff, in float32."""
        out = {}
        for key, weight in self.model.state_dict().items():
            w = weight.detach().clone().float()
            for strength, (kind, (diff,)), strength_model, offset, _ in self.patches.get(key, []):
                assert kind == "diff" and strength_model == 1.0
                target = w if offset is None else w.narrow(*offset)
                assert target.shape == diff.shape, (key, target.shape, diff.shape)
                target += strength * diff.float()
            out[key] = w
        return out

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def get_all_wrappers(self, wrapper_type):
        return [w for ws in self.wrappers.get(wrapper_type, {}).values() for w in ws]

    def add_callback_with_key(self, call_type, key, callback):
        self.callbacks.setdefault(call_type, {}).setdefault(key, []).append(callback)

    def get_all_callbacks(self, call_type):
        return [c for cs in self.callbacks.get(call_type, {}).values() for c in cs]

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def run(self, x, context, *, ref_latents=None, transformer_options=None):
        """One model call as the sampler makes it: model_options' transformer_options, wrappers, _forward."""
        opts = copy.copy(self.model_options["transformer_options"]) if transformer_options is None \
            else transformer_options
        ex = Executor(self.model.diffusion_model, self.get_all_wrappers("diffusion_model"))
        return ex(x, torch.ones(x.shape[0]), context, None, None, ref_latents, None, opts)
