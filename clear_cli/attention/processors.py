"""The CLEAR attention processor for diffusers' FluxAttention (double- and single-stream blocks).

It reproduces FluxAttnProcessor's math (projections, RMSNorm, added text projections in double blocks, RoPE via
diffusers' apply_rotary_emb, the to_out / to_add_out split) and calls `layout.attend` (`clear_attention` on the call's
token layout: reference images, as in Kontext, join the text as global tokens) for the attention itself.
It is an nn.Module so that the pooling weights (down_factor f > 1) are parameters under the published checkpoints'
key, `...attn.processor.spatial_weight` [1,1,1,f,1,f,1]. With `keep_teacher`, it also holds frozen copies of the
original image-branch projections (non-persistent buffers) and, in a teacher pass, computes the original model
with them: F.linear on the frozen weights and full attention, never an in-place swap of `.data` (DESIGN.md §4).

Under torch.compile (`clear_cli.models.compile`, fullgraph) the processor traces into its block's graph without
breaks: it branches only on Python values that dynamo guards (the call's grid and mode, the settings, shapes), and
the kernels' plans and masks enter the graph as constants built outside it (`clear_cli.attention.tracing`).
The same code path runs eager and compiled; on CPU under compile the tiled kernel's differentiable path runs
(the band path keeps scratch buffers between calls).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from clear_cli.attention.context import CallContext, ClearState, proportional_scale
from clear_cli.attention.layout import KERNEL_RULE, TokenLayout, attend, layout_mask

TEACHER_DOUBLE = ("to_q", "to_k", "to_v", "to_out.0")  # image branch of a double block
TEACHER_SINGLE = ("to_q", "to_k", "to_v")  # single blocks have no to_out


def _buffer_name(proj: str, part: str) -> str:
    return f"teacher_{proj.replace('.', '_')}_{part}"


class ClearFluxAttnProcessor(nn.Module):
    """CLEAR local attention in one FluxAttention; settings come from the model's shared ClearState."""

    _attention_backend = None  # diffusers' set_attention_backend writes these; the teacher pass honours them
    _parallel_config = None

    def __init__(self, index: int, double: bool, state: ClearState):
        super().__init__()
        self.index = index
        self.double = double
        self._state = state
        self.spatial_weight: nn.Parameter | None = None

    # -- configuration ---------------------------------------------------------------------------------------
    def configure(self, attn: nn.Module) -> None:
        """(Re)build the pooling weight for the current down_factor; keep a trained one when f is unchanged."""
        f = self._state.settings.down_factor
        current = self.spatial_weight
        if f > 1 and (current is None or current.shape[3] != f):
            ref = attn.to_q.weight
            device = "cpu" if ref.device.type == "meta" else ref.device  # offloaded models keep weights on meta
            self.spatial_weight = nn.Parameter(
                torch.full((1, 1, 1, f, 1, f, 1), 1.0 / (f * f), device=device, dtype=ref.dtype))
        elif f == 1 and current is not None:
            self.spatial_weight = None

    def keep_teacher(self, attn: nn.Module) -> None:
        """Store frozen copies of the current (original) image-branch projections; existing copies are kept."""
        if self.has_teacher:
            return
        if getattr(attn, "fused_projections", False):
            raise ValueError("keep_teacher needs unfused projections: call attn.unfuse_projections() "
                             "(transformer.unfuse_qkv_projections()) before linearize")
        for proj in TEACHER_DOUBLE if self.double else TEACHER_SINGLE:
            lin = attn.get_submodule(proj)
            self.register_buffer(_buffer_name(proj, "weight"), lin.weight.detach().clone(), persistent=False)
            bias = None if lin.bias is None else lin.bias.detach().clone()
            self.register_buffer(_buffer_name(proj, "bias"), bias, persistent=False)

    def drop_teacher(self) -> None:
        for proj in TEACHER_DOUBLE:
            for part in ("weight", "bias"):
                self._buffers.pop(_buffer_name(proj, part), None)

    @property
    def has_teacher(self) -> bool:
        return _buffer_name("to_q", "weight") in self._buffers

    def _teacher_linear(self, proj: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._buffers[_buffer_name(proj, "weight")], self._buffers[_buffer_name(proj, "bias")])

    def extra_repr(self) -> str:
        s = self._state.settings
        kind = "double" if self.double else "single"
        return f"index={self.index}, {kind}, window={s.window}, down_factor={s.down_factor}, backend={s.backend!r}"

    # -- the call --------------------------------------------------------------------------------------------
    # Defined as __call__ (not forward), as diffusers' own Module processors do: FluxAttention.forward passes
    # only the keyword arguments that appear in the processor's __call__ signature.
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: tuple | None = None,
                 clear_call: CallContext | None = None):
        from diffusers.models.embeddings import apply_rotary_emb

        if clear_call is None:
            # FluxControlNetModel does not hand joint_attention_kwargs to its blocks: use its latest call.
            clear_call = self._state.last_call
        teacher = clear_call is not None and clear_call.teacher
        if teacher and not self.has_teacher:
            raise ValueError("teacher_mode needs the original projections: call linearize(..., keep_teacher=True)")
        if teacher:
            query = self._teacher_linear("to_q", hidden_states)
            key = self._teacher_linear("to_k", hidden_states)
            value = self._teacher_linear("to_v", hidden_states)
        elif getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
                e_q, e_k, e_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                e_q = attn.add_q_proj(encoder_hidden_states)
                e_k = attn.add_k_proj(encoder_hidden_states)
                e_v = attn.add_v_proj(encoder_hidden_states)
            e_q = attn.norm_added_q(e_q.unflatten(-1, (-1, attn.head_dim)))
            e_k = attn.norm_added_k(e_k.unflatten(-1, (-1, attn.head_dim)))
            e_v = e_v.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([e_q, query], dim=1)
            key = torch.cat([e_k, key], dim=1)
            value = torch.cat([e_v, value], dim=1)

        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        if teacher:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
        else:
            out = self._clear(attn, query, key, value, encoder_hidden_states, attention_mask, clear_call)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            text_out, out = out.split_with_sizes(
                [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            out = out.contiguous()
            out = self._teacher_linear("to_out.0", out) if teacher else attn.to_out[0](out)
            out = attn.to_out[1](out)
            text_out = attn.to_add_out(text_out.contiguous())
            self._record(clear_call, lambda: torch.cat([text_out, out], dim=1))
            return out, text_out
        self._record(clear_call, lambda: out)
        return out

    def _clear(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
               call: CallContext | None) -> torch.Tensor:
        if call is None:
            raise ValueError("CLEAR processors read the token grid from the model's call (img_ids): call the "
                             "linearized transformer itself, not one attention module on its own")
        if attention_mask is not None:
            raise ValueError("CLEAR processors do not take an attention_mask (the CLEAR pattern is the mask)")
        s = self._state.settings
        # Image tokens come last, so the text length is whatever precedes them; this also holds where a model
        # adds tokens of its own (ControlNet-Union prepends a mode token).
        n, lay = query.shape[1], call.layout
        text_len = n - lay.n_image
        if text_len < 0 or (encoder_hidden_states is not None and encoder_hidden_states.shape[1] != text_len):
            raise ValueError(f"attention got {n} tokens, which do not end in the call's {lay.n_image} image tokens "
                             f"({lay.describe()})" + ("" if encoder_hidden_states is None else
                                                      f" after {encoder_hidden_states.shape[1]} text tokens"))
        if text_len != lay.text_len:
            lay = dataclasses.replace(lay, text_len=text_len)
        scale = None
        if s.proportional_attention:
            scale = proportional_scale(n, s.train_seq_len, attn.head_dim, s.log_scale_factor)
        down_weight = self.spatial_weight if s.down_factor > 1 else None
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if lay.references and s.reference_rule != KERNEL_RULE:
            return _measured_rule(q, k, v, lay, s.window, s.reference_rule, scale).transpose(1, 2)
        # The `global` rule: reference tokens join the text in front of the target grid (layout.py), so every
        # backend runs its plain text + grid path; the permutation is undone on the output.
        out = attend(q, k, v, lay, window=s.window, down_factor=s.down_factor, down_weight=down_weight,
                     scale=scale, backend=s.backend)
        return out.transpose(1, 2)

    def _record(self, call: CallContext | None, value) -> None:
        # First recording per call wins: gradient checkpointing re-runs the block during backward.
        cap = None if call is None else call.capture
        if cap is None or self.index not in cap.layers or self.index in call.recorded:
            return
        call.recorded.add(self.index)
        cap.outputs[self.index] = value()


def _measured_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, window: int, rule: str,
                   scale: float | None) -> torch.Tensor:
    """A reference rule other than `global` (layout.py), on the dense mask: for measuring the choice only."""
    from clear_cli.attention.geometry import default_scale
    from clear_cli.attention.reference import MAX_REFERENCE_TOKENS

    if q.shape[2] > MAX_REFERENCE_TOKENS:
        raise ValueError(f"reference rule {rule!r} builds an N x N mask; {q.shape[2]} tokens is too many "
                         f"(max {MAX_REFERENCE_TOKENS}); use reference_rule='global'")
    mask = layout_mask(layout, window, rule, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=default_scale(q.shape[-1], scale))
