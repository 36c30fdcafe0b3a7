"""Qwen-Image (QwenImageTransformer2DModel, QwenImagePipeline).

Joint sequence [text][image row-major] in every one of its 60 double-stream blocks (no single-stream blocks); the
attention modules are diffusers' generic `Attention` with `QwenDoubleStreamAttnProcessor2_0`. The grid comes from
`img_shapes` ([(frames, H, W)] per sample, in tokens after 2x2 packing); text padding from
`encoder_hidden_states_mask` ([B, T], the processors receive it per call). RoPE (QwenEmbedRope) is centred: image
rows and columns run from -H/2 to H/2 (`scale_rope=True`), text positions continue after the largest image index.
NTK scaling rebuilds it with theta x factor, the same rule as FLUX's (every axis). 16 px per token (VAE /8, 2x2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clear_cli.attention.adapters.base import ModelAdapter, ModelFacts
from clear_cli.attention.context import CallContext
from clear_cli.attention.processors import ClearProcessorBase

IMAGE_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")  # the image branch; add_*_proj / to_add_out are text


class ClearQwenAttnProcessor(ClearProcessorBase):
    """CLEAR in one Qwen-Image double-stream attention: QwenDoubleStreamAttnProcessor2_0's math (image and text
    projections, RMSNorm, complex RoPE, [text, image] joint attention, to_out / to_add_out), with `clear_attention`
    (and the padding mask) for the attention itself, and the frozen image-branch projections in a teacher pass."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple | None = None, clear_call: CallContext | None = None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states is None:
            raise ValueError("Qwen-Image attention needs encoder_hidden_states (the text stream)")
        if attention_mask is not None:
            raise ValueError("Qwen-Image attention takes encoder_hidden_states_mask, not an attention_mask")
        clear_call = clear_call if clear_call is not None else self._state.last_call
        teacher = clear_call is not None and clear_call.teacher
        if teacher and not self.has_teacher:
            raise ValueError("teacher_mode needs the original projections: call linearize(..., keep_teacher=True)")
        proj = self._teacher_linear if teacher else (lambda name, x: attn.get_submodule(name)(x))
        head_dim = attn.inner_dim // attn.heads
        split = lambda x: x.unflatten(-1, (-1, head_dim))  # noqa: E731
        img_q, img_k, img_v = (split(proj(n, hidden_states)) for n in ("to_q", "to_k", "to_v"))
        txt_q = split(attn.add_q_proj(encoder_hidden_states))
        txt_k = split(attn.add_k_proj(encoder_hidden_states))
        txt_v = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if attn.norm_added_q is not None:
            txt_q = attn.norm_added_q(txt_q)
        if attn.norm_added_k is not None:
            txt_k = attn.norm_added_k(txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q = apply_rotary_emb_qwen(img_q, img_freqs, use_real=False)
            img_k = apply_rotary_emb_qwen(img_k, img_freqs, use_real=False)
            txt_q = apply_rotary_emb_qwen(txt_q, txt_freqs, use_real=False)
            txt_k = apply_rotary_emb_qwen(txt_k, txt_freqs, use_real=False)
        query = torch.cat([txt_q, img_q], dim=1)
        key = torch.cat([txt_k, img_k], dim=1)
        value = torch.cat([txt_v, img_v], dim=1)
        text_mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.to(torch.bool)
        t = encoder_hidden_states.shape[1]
        if teacher:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            mask = None
            if text_mask is not None:
                ones = text_mask.new_ones(text_mask.shape[0], hidden_states.shape[1])
                mask = torch.cat([text_mask, ones], 1)[:, None, None, :]
            out = dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        else:
            out = self._clear(attn, query, key, value, encoder_hidden_states, None, clear_call, text_mask=text_mask)
        out = out.flatten(2, 3).to(query.dtype)
        txt_out, img_out = out[:, :t], out[:, t:]
        img_out = self._teacher_linear("to_out.0", img_out.contiguous()) if teacher else \
            attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.contiguous())
        self._record(clear_call, lambda: torch.cat([txt_out, img_out], dim=1))
        return img_out, txt_out


class NTKQwenEmbedRope(nn.Module):
    """Qwen-Image's centred RoPE with theta x `ntk_factor` (a fresh QwenEmbedRope; the original is kept)."""

    def __init__(self, original: nn.Module, ntk_factor: float):
        super().__init__()
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

        self.ntk_factor = float(ntk_factor)
        self.inner = QwenEmbedRope(theta=original.theta * self.ntk_factor, axes_dim=list(original.axes_dim),
                                   scale_rope=original.scale_rope)
        self._original = (original,)  # out of the module tree and the state dict

    @property
    def original(self) -> nn.Module:
        return self._original[0]

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


class QwenImageAdapter(ModelAdapter):
    family = "qwen-image"
    about = "QwenImageTransformer2DModel (Qwen-Image; 60 double-stream blocks, 2x2 patches, centred RoPE)"
    transformer_classes = ("QwenImageTransformer2DModel",)
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
    kwargs_argument = "attention_kwargs"
    # 1328^2 is Qwen-Image's native 1:1 size (83 x 83 tokens); text length: the prompt's own (padded per batch),
    # capped at 512 by the pipeline's default max_sequence_length; 256 assumed for N_train.
    facts = ModelFacts(text_len=512, base_res=1328, pixels_per_token=16, train_text_len=256,
                       shift_rule="dynamic: mu linear in the image token count (base_shift 0.5 .. max_shift 0.9 "
                                  "over 256 .. 8192 tokens), no cap")

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """The `attn` of every QwenImageTransformerBlock, in block order."""
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

        return [m.attn for m in transformer.modules() if isinstance(m, QwenImageTransformerBlock)]

    def is_double(self, attn: nn.Module) -> bool:
        return True

    def image_projections(self, attn: nn.Module) -> tuple[str, ...]:
        return IMAGE_PROJECTIONS

    def attention_loss_layers(self, modules: list[nn.Module]) -> list[int]:
        """Ten layers spread evenly as the authors' ten of FLUX's 57 (Qwen-Image, 60 blocks: 5, 11, ..., 59);
        every layer when there are fewer than 10."""
        step = max(1, len(modules) // 10)
        return [i for i in range(len(modules)) if (i + 1) % step == 0][-10:]

    def make_processor(self, index: int, attn: nn.Module, state: Any) -> nn.Module:
        return ClearQwenAttnProcessor(index, double=True, state=state, teacher_projections=IMAGE_PROJECTIONS)

    def read_call(self, arguments: dict):
        shapes, hidden = arguments.get("img_shapes"), arguments.get("hidden_states")
        enc, mask = arguments.get("encoder_hidden_states"), arguments.get("encoder_hidden_states_mask")
        if not shapes:
            raise ValueError("the CLEAR Qwen-Image transformer was called without img_shapes: it reads the token "
                             "grid from them")
        first = shapes[0] if isinstance(shapes[0], list) else shapes
        if len(first) != 1 or any((s if isinstance(s, list) else [s]) != first for s in shapes):
            raise ValueError(f"img_shapes hold {len(first)} images per sample ({first}); CLEAR supports one image "
                             "grid per call, the same for the whole batch (edit pipelines with reference images "
                             "are not supported yet)")
        frames, h, w = (int(x) for x in first[0])
        if frames != 1:
            raise ValueError(f"img_shapes give {frames} frames; CLEAR's 2-D rule needs one frame per image")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.shape[1] != h * w:
            raise ValueError(f"img_shapes give a {h}x{w} grid ({h * w} tokens) but hidden_states hold "
                             f"{hidden.shape[1]} image tokens")
        if not isinstance(enc, torch.Tensor):
            raise ValueError("the CLEAR Qwen-Image transformer was called without encoder_hidden_states")
        return int(enc.shape[1]), (h, w), None if mask is None else mask.to(torch.bool), None

    def scale_rope(self, transformer: nn.Module, ntk_factor: float) -> None:
        if not ntk_factor > 0:
            raise ValueError(f"ntk_factor must be > 0, got {ntk_factor!r}")
        pe = transformer.pos_embed
        original = pe.original if isinstance(pe, NTKQwenEmbedRope) else pe
        transformer.pos_embed = NTKQwenEmbedRope(original, ntk_factor)

    def restore_rope(self, transformer: nn.Module) -> None:
        pe = getattr(transformer, "pos_embed", None)
        if isinstance(pe, NTKQwenEmbedRope):
            transformer.pos_embed = pe.original

    def rope_ntk_factor(self, transformer: nn.Module) -> float | None:
        pe = getattr(transformer, "pos_embed", None)
        return pe.ntk_factor if isinstance(pe, NTKQwenEmbedRope) else None
