"""CLEAR attention inside ComfyUI's FLUX: the attention override, the per-call geometry, and when to step aside.

ComfyUI's FLUX computes attention in `comfy/ldm/flux/math.py attention(q, k, v, pe, mask, transformer_options)`:
RoPE, then `optimized_attention(q, k, v, heads, skip_reshape=True, mask=..., transformer_options=...)` on
[B, heads, T + H*W, head_dim] (text first, image tokens row-major), returning [B, T + H*W, heads * head_dim]. Every
backend there is wrapped so that `transformer_options["optimized_attention_override"](func, *args, **kwargs)` runs
instead when it is set; `func` is the backend it replaces. The token grid is local to the model's `_forward`, so a
`DIFFUSION_MODEL` wrapper reads it from the latent (H, W over the patch size) and the text length from the context,
and hands both to the override in a per-call copy of transformer_options. Pooling weights need the block: newer
ComfyUI puts `block_type` / `block_index` in transformer_options; where it does not, forward pre-hooks on the
blocks, set for the length of the call, say which block runs.

A call CLEAR cannot compute exactly (an attention mask, Kontext reference tokens, lengths that do not add up to
text + grid, a grid the down factor does not divide, a model that is not FLUX.1-shaped, grouped-query attention,
no block for pooling weights) goes to the override that was installed before (or the backend itself), and the first
of each kind is logged once per sampling run: never approximated silently.

Nothing here imports ComfyUI; `clear_cli.comfy.node` connects it to a ModelPatcher.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from clear_cli.attention.context import ClearSettings, proportional_scale

log = logging.getLogger("clear_cli.comfy")

OVERRIDE_KEY = "optimized_attention_override"
CALL_KEY = "clear_attention_call"
KEY = "clear_attention"  # the wrapper / callback key on the ModelPatcher


@dataclass
class CallInfo:
    """One diffusion-model call as CLEAR sees it (built by the wrapper, read by the override)."""

    patch: "ClearPatch"
    text_len: int | None = None
    grid: tuple[int, int] | None = None
    reason: str | None = None
    """why no attention call of this model call can run CLEAR (None: each is checked on its own)"""
    block: tuple[str, int] | None = None
    """the block running now, from the block hooks (ComfyUI versions that do not report it)"""


def flux1_reason(model: Any) -> str | None:
    """Why `model` (a ComfyUI diffusion model) is not FLUX.1-shaped for CLEAR, or None when it is."""
    cls = type(model)
    if cls.__name__ != "Flux" or cls.__module__ != "comfy.ldm.flux.model":
        return f"the model is {cls.__module__}.{cls.__name__}, not ComfyUI's FLUX.1 (comfy.ldm.flux.model.Flux)"
    params = getattr(model, "params", None)
    if getattr(params, "global_modulation", False):
        return "the model is FLUX.2-shaped (global modulation), not FLUX.1"
    if getattr(model, "patch_size", 2) != 2:
        return f"the model's patch size is {model.patch_size}, FLUX.1's is 2"
    blocks = list(getattr(model, "double_blocks", [])) + list(getattr(model, "single_blocks", []))
    if not blocks:
        return "the model has no double_blocks / single_blocks"
    if any(getattr(b, "flipped_img_txt", False) for b in blocks):
        return "the model puts image tokens before text tokens (flipped_img_txt)"
    return None


class ClearPatch:
    """One CLEAR node's settings and state: pooling weights, the overrides it installed, what it has warned about."""

    def __init__(self, settings: ClearSettings, pools: dict[tuple[str, int], torch.Tensor] | None = None,
                 model_reason: str | None = None):
        self.settings = settings
        self.pools = dict(pools or {})
        self.model_reason = model_reason
        self.installed: set[Callable] = set()
        self._chains: dict[int, tuple[Any, Callable]] = {}
        self._warned: set[str] = set()
        self._pool_cache: dict[tuple, torch.Tensor] = {}
        self.native_blocks = False  # ComfyUI reported block_type / block_index: no block hooks needed
        self._signatures: dict[type, inspect.Signature] = {}

    def __deepcopy__(self, memo: dict) -> "ClearPatch":
        # Shared state, like the override closure that holds it: ComfyUI deep-copies model options (and whatever
        # they reference) when it clones a model, and a copy would no longer recognise its own calls.
        return self

    def __copy__(self) -> "ClearPatch":
        return self

    # -- state --------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """ON_CLEANUP: forget per-run state (device copies of the pooling weights, warnings given)."""
        self._pool_cache.clear()
        self._warned.clear()

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("CLEAR attention: %s; these calls use the previous attention instead (not CLEAR)", message)

    # -- installing ---------------------------------------------------------------------------------------------
    def override_over(self, previous: Callable | None) -> Callable:
        """This patch's override chained to `previous` (one per previous, so re-installing is idempotent)."""
        hit = self._chains.get(id(previous))
        if hit is not None and hit[0] is previous:
            return hit[1]
        ov = _make_override(self, previous)
        self._chains[id(previous)] = (previous, ov)
        self.installed.add(ov)
        return ov

    def install(self, transformer_options: dict) -> None:
        """Put this patch's override on top of whatever override is set, unless one of ours already is."""
        current = transformer_options.get(OVERRIDE_KEY)
        if current in self.installed:
            return
        transformer_options[OVERRIDE_KEY] = self.override_over(current)

    def prepare_state(self, patcher: Any, timestep: Any = None, model_options: dict | None = None, *_: Any) -> None:
        """ON_PREPARE_STATE: re-install on top (ComfyUI passes model_options in newer versions, not in older ones)."""
        opts = model_options if model_options is not None else getattr(patcher, "model_options", None)
        if isinstance(opts, dict):
            self.install(opts.setdefault("transformer_options", {}))

    def cleanup(self, patcher: Any = None, *_: Any) -> None:
        self.reset()

    # -- the DIFFUSION_MODEL wrapper ----------------------------------------------------------------------------
    def wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Read the call's geometry, put a CallInfo and the override (on top) into a copy of transformer_options."""
        model = getattr(executor, "class_obj", None)
        sig = self._signature(model)
        try:
            bound = sig.bind(*args, **kwargs) if sig is not None else None
        except TypeError:
            bound = None
        if bound is None or "transformer_options" not in sig.parameters:
            self.warn_once("signature", "the diffusion model's forward does not look like ComfyUI's FLUX "
                                        "(x, timestep, context, ..., transformer_options)")
            return executor(*args, **kwargs)
        a = bound.arguments
        info = CallInfo(patch=self, reason=self.model_reason)
        x, context = a.get("x"), a.get("context")
        if info.reason is None:
            if not (isinstance(x, torch.Tensor) and x.dim() == 4 and isinstance(context, torch.Tensor)
                    and context.dim() == 3):
                info.reason = "the model call's latent is not [B, C, H, W] (or its context not [B, T, D])"
            elif a.get("ref_latents") is not None:
                info.reason = "reference-image tokens (Kontext / edit models) are appended after the image"
            else:
                p = int(getattr(model, "patch_size", 2))
                h, w = -(-int(x.shape[-2]) // p), -(-int(x.shape[-1]) // p)
                info.text_len, info.grid = int(context.shape[1]), (h, w)
                f = self.settings.down_factor
                if h % f or w % f:
                    info.reason = (f"the {h}x{w} token grid is not a multiple of down_factor {f} "
                                   f"(use a size whose latent is a multiple of {2 * f})")
        opts = dict(a.get("transformer_options") or {})  # a copy: the sampler's dict is shared between calls
        opts[CALL_KEY] = info
        self.install(opts)
        a["transformer_options"] = opts
        hooks = self._block_hooks(model, info) if info.reason is None and self._needs_blocks() else []
        try:
            return executor(*bound.args, **bound.kwargs)
        finally:
            for h in hooks:
                h.remove()

    def _signature(self, model: Any) -> inspect.Signature | None:
        fn = getattr(model, "_forward", None)
        if fn is None:
            return None
        cls = type(model)
        if cls not in self._signatures:
            self._signatures[cls] = inspect.signature(fn)
        return self._signatures[cls]

    def _needs_blocks(self) -> bool:
        return self.settings.down_factor > 1 and bool(self.pools) and not self.native_blocks

    @staticmethod
    def _block_hooks(model: Any, info: CallInfo) -> list:
        """Forward pre-hooks that record which block runs (removed when the call ends)."""
        hooks = []
        for kind, blocks in (("double", getattr(model, "double_blocks", [])),
                             ("single", getattr(model, "single_blocks", []))):
            for i, block in enumerate(blocks):
                def mark(_module, _args, kind=kind, i=i):
                    info.block = (kind, i)
                hooks.append(block.register_forward_pre_hook(mark))
        return hooks

    # -- one attention call -------------------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: Any,
               skip_reshape: bool, skip_output_reshape: bool, kwargs: dict,
               attn_precision: Any = None) -> tuple[torch.Tensor | None, tuple]:
        """(output, ()) when CLEAR ran, else (None, (kind, message)) saying why it stepped aside."""
        opts = kwargs.get("transformer_options") or {}
        info = opts.get(CALL_KEY)
        if not isinstance(info, CallInfo) or info.patch is not self:
            return None, ("no_call", "an attention call came without the CLEAR wrapper's geometry (e.g. a "
                                     "ControlNet's own attention, or a model not called through FLUX's forward)")
        if info.reason is not None:
            return None, (f"call:{info.reason}", info.reason)
        if mask is not None:
            return None, ("mask", "an attention mask is set (CLEAR's circle is the mask; masked prompts are not "
                                  "supported)")
        if kwargs.get("enable_gqa"):
            return None, ("gqa", "grouped-query attention")
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not q.is_floating_point():
            return None, ("tensors", "q, k, v are not floating-point tensors")
        if skip_reshape:
            if q.dim() != 4:
                return None, ("shape", f"q has shape {tuple(q.shape)}, expected [B, heads, tokens, head_dim]")
            qh, kh, vh = q, k, v
        else:
            if q.dim() != 3 or q.shape[-1] % heads:
                return None, ("shape", f"q has shape {tuple(q.shape)}, expected [B, tokens, heads * head_dim]")
            b, n, _ = q.shape
            qh, kh, vh = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        if not (qh.shape == kh.shape == vh.shape):
            return None, ("shape", f"q, k, v shapes differ ({tuple(qh.shape)}, {tuple(kh.shape)}, "
                                   f"{tuple(vh.shape)}): not self-attention over one sequence")
        b, nh, n, d = qh.shape
        (h, w), t = info.grid, info.text_len
        if n != t + h * w:
            return None, ("lengths", f"{n} tokens do not add up to {t} text + {h}x{w} image tokens (something "
                                     "added tokens to the sequence)")
        block = self._block(opts, info)
        down_weight = None
        s = self.settings
        if s.down_factor > 1 and self.pools:
            if block is None:
                return None, ("block", "this ComfyUI does not say which block runs, which the pooling weights need")
            down_weight = self._pool(block, qh)
            if down_weight is None:
                return None, ("block", f"no pooling weights for {block[0]} block {block[1]}")
        scale = kwargs.get("scale")
        if scale is None and s.proportional_attention:
            scale = proportional_scale(n, s.train_seq_len, d, s.log_scale_factor)
        from clear_cli.attention import clear_attention

        dtype = qh.dtype
        if attn_precision == torch.float32 and dtype != torch.float32:  # the caller asked for fp32 attention
            qh, kh, vh = qh.float(), kh.float(), vh.float()
            down_weight = None if down_weight is None else down_weight.float()
        out = clear_attention(qh, kh, vh, text_len=t, grid=(h, w), window=s.window, down_factor=s.down_factor,
                              down_weight=down_weight, scale=scale, backend=s.backend).to(dtype)
        if skip_output_reshape:
            return out, ()
        return out.transpose(1, 2).reshape(b, n, nh * d), ()

    def _block(self, opts: dict, info: CallInfo) -> tuple[str, int] | None:
        kind, index = opts.get("block_type"), opts.get("block_index")
        if kind in ("double", "single") and isinstance(index, int):
            self.native_blocks = True
            return kind, index
        return info.block

    def _pool(self, block: tuple[str, int], ref: torch.Tensor) -> torch.Tensor | None:
        key = (block, ref.device, ref.dtype)
        hit = self._pool_cache.get(key)
        if hit is None:
            w = self.pools.get(block)
            if w is None:
                return None
            hit = self._pool_cache[key] = w.to(device=ref.device, dtype=ref.dtype)
        return hit


def _make_override(patch: ClearPatch, previous: Callable | None) -> Callable:
    """The function ComfyUI calls instead of its attention backend (a closure: ModelPatcher.clone deep-copies
    model_options, and a function is copied by reference, so every clone shares this patch)."""

    def clear_attention_override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                                 skip_output_reshape=False, **kwargs):
        out, why = patch.attend(q, k, v, heads, mask, skip_reshape, skip_output_reshape, kwargs, attn_precision)
        if out is not None:
            return out
        patch.warn_once(*why)
        kw = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                  skip_output_reshape=skip_output_reshape, **kwargs)
        if previous is None:
            return func(q, k, v, heads, **kw)
        return previous(func, q, k, v, heads, **kw)

    clear_attention_override.clear_patch = patch
    return clear_attention_override


def settings(window: int, down_factor: int = 1, backend: str = "auto", *, proportional_attention: bool = False,
             train_seq_len: int | None = None, log_scale_factor: float | None = None,
             ntk_factor: float | None = None) -> ClearSettings:
    """Checked ClearSettings for the node (the same rules as `clear_cli.linearize`)."""
    from clear_cli.attention import BACKENDS
    from clear_cli.attention.context import FLUX_TRAIN_SEQ_LEN

    for name, value in (("window", window), ("down_factor", down_factor)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if ntk_factor is not None and not (ntk_factor > 0 and math.isfinite(ntk_factor)):
        raise ValueError(f"ntk_factor must be > 0, got {ntk_factor!r}")
    c = (10.0 if down_factor > 1 else 1.0) if log_scale_factor is None else float(log_scale_factor)
    return ClearSettings(window=int(window), down_factor=int(down_factor), backend=backend,
                         proportional_attention=bool(proportional_attention),
                         train_seq_len=FLUX_TRAIN_SEQ_LEN if train_seq_len is None else int(train_seq_len),
                         log_scale_factor=c, ntk_factor=ntk_factor)
