"""Chroma (ChromaTransformer2DModel, ChromaPipeline): FLUX's layout and FluxAttention, plus a text padding mask.

The grid comes from `img_ids` as in FLUX; the transformer's `attention_mask` ([B, T + H*W], text then image) marks
the text tokens to keep: the prompt and its first padding token (the rest of the T5 padding is dropped). Merged
with CLEAR's rule:
- a bool mask is padding: a dropped text key is seen by no query (`clear_cli.attention.padding`);
- the float 0/1 mask ChromaPipeline passes is what diffusers 0.42 applies *additively*: each block multiplies it
  into [B, 1, N, N] (m_q * m_k) and SDPA adds that to the logits. Linearized Chroma reproduces exactly that, so a
  whole-grid window equals stock: text queries attend densely with the same bias; image queries (m_q = 1) see the
  text keys with a bias m_k - 1 relative to the image keys, carried as one extra head channel (q: 1, k: bias /
  scale) so every CLEAR kernel runs it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clear_cli.attention.adapters.base import ModelAdapter
from clear_cli.attention.adapters.flux import FluxAdapter
from clear_cli.attention.context import CallContext, flux_call_geometry, proportional_scale
from clear_cli.attention.processors import ClearFluxAttnProcessor


class ClearChromaAttnProcessor(ClearFluxAttnProcessor):
    """FluxAttention's CLEAR processor, reading the call's text mask instead of the block's [B, 1, N, N] one."""

    def _clear(self, attn, query, key, value, encoder_hidden_states, attention_mask, call: CallContext | None,
               text_mask=None):
        raw = None if call is None else call.text_mask
        if raw is None or raw.dtype == torch.bool:   # no mask, or padding proper
            return super()._clear(attn, query, key, value, encoder_hidden_states, None, call, text_mask=raw)
        return self._additive(query, key, value, call, raw)

    def _additive(self, query, key, value, call: CallContext, m: torch.Tensor) -> torch.Tensor:
        """diffusers 0.42's additive 0/1 mask (module docstring), with CLEAR's rule for the image queries."""
        from clear_cli.attention import clear_attention

        s = self._state.settings
        b, n, heads, d = query.shape
        t = m.shape[1]
        scale = (proportional_scale(n, s.train_seq_len, d, s.log_scale_factor) if s.proportional_attention
                 else d ** -0.5)
        m = m.to(query.dtype)
        q, k, v = (x.transpose(1, 2) for x in (query, key, value))
        # text queries: dense, bias m_q * m_k as stock
        full = torch.cat([m, m.new_ones(b, n - t)], 1)
        bias = (m[:, :, None] * full[:, None, :])[:, None]
        o_text = F.scaled_dot_product_attention(q[:, :, :t], k, v, attn_mask=bias, scale=scale)
        # image queries: text keys biased by m_k - 1 through one extra channel
        extra_k = torch.zeros(b, heads, n, 1, dtype=q.dtype, device=q.device)
        extra_k[:, :, :t, 0] = ((m - 1) / scale)[:, None, :]
        q2 = torch.cat([q, torch.ones_like(extra_k)], -1)
        k2 = torch.cat([k, extra_k], -1)
        v2 = torch.cat([v, torch.zeros_like(extra_k)], -1)
        down_weight = self.spatial_weight if s.down_factor > 1 else None
        o = clear_attention(q2, k2, v2, text_len=t, grid=call.grid, window=s.window, down_factor=s.down_factor,
                            down_weight=down_weight, scale=scale, backend=s.backend)[..., :d]
        return torch.cat([o_text, o[:, :, t:]], 2).transpose(1, 2)


class ChromaAdapter(FluxAdapter):
    family = "chroma"
    about = "ChromaTransformer2DModel (Chroma: FLUX.1-schnell's layout, T5 only, text padding mask)"
    transformer_classes = ("ChromaTransformer2DModel",)
    pipeline_classes = ("ChromaPipeline", "ChromaImg2ImgPipeline")

    def matches(self, transformer: nn.Module) -> bool:
        return ModelAdapter.matches(self, transformer)   # by class name, not FLUX's "holds FluxAttention"

    def make_processor(self, index: int, attn: nn.Module, state: Any) -> nn.Module:
        return ClearChromaAttnProcessor(index, double=self.is_double(attn), state=state)

    def read_call(self, arguments: dict):
        text_len, layout = flux_call_geometry(arguments)
        grid = layout.target.shape
        if layout.references:
            raise ValueError(f"Chroma calls hold one image grid; got {layout.describe()}")
        mask = arguments.get("attention_mask")
        if mask is None:
            return text_len, grid, None, layout
        if mask.dim() != 2 or mask.shape[1] != text_len + grid[0] * grid[1]:
            raise ValueError(f"Chroma's attention_mask must be [batch, text + image tokens] = "
                             f"[B, {text_len + grid[0] * grid[1]}], got {tuple(mask.shape)}")
        return text_len, grid, mask[:, :text_len], layout

