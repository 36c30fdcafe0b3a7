"""Running a linearized FLUX transformer on one band of the image: the band-aware CLEAR processor.

Everything in a FLUX block but attention is token-wise, so a process runs the whole transformer on its band's image
tokens (with the band's `img_ids`, so RoPE uses the true positions) and the full text; only attention needs the other
bands. `band_processors(transformer)` turns the installed CLEAR processors into `BandClearProcessor`s (same object,
same parameters: only the class changes, for the duration of the block); inside `band_context(group)` their attention
runs `band_attention` over the group, elsewhere they behave exactly as before. The group lives in a context variable,
so P simulated ranks can share one model in one process (threads), as the tests do.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from clear_cli.attention.context import CallContext, proportional_scale
from clear_cli.attention.processors import ClearFluxAttnProcessor
from clear_cli.parallel.attention import BandGroup, band_attention

_GROUP: contextvars.ContextVar[BandGroup | None] = contextvars.ContextVar("clear_band_group", default=None)


class BandClearProcessor(ClearFluxAttnProcessor):
    """A ClearFluxAttnProcessor whose attention covers one band when a `band_context` is open."""

    def _clear(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None,
               call: CallContext | None) -> torch.Tensor:
        group = _GROUP.get()
        if group is None:
            return super()._clear(attn, query, key, value, encoder_hidden_states, attention_mask, call)
        if call is None:
            raise ValueError("band attention needs the model's call context (call the linearized transformer)")
        if attention_mask is not None:
            raise ValueError("CLEAR processors do not take an attention_mask (the CLEAR pattern is the mask)")
        s = self._state.settings
        if call.layout.references:
            raise ValueError(f"patch-parallel generation takes one image, not reference images too "
                             f"({call.layout.describe()}): run Kontext on one GPU")
        if call.grid != group.band_grid:
            raise ValueError(f"the transformer got a {call.grid[0]}x{call.grid[1]} token grid but this process's band "
                             f"is {group.band_grid[0]}x{group.band_grid[1]}: pass the band's latents and img_ids")
        if s.down_factor != group.down_factor:
            raise ValueError(f"the bands were cut for down_factor {group.down_factor}, the model runs "
                             f"{s.down_factor}")
        h, w = group.grid
        text_len = query.shape[1] - call.grid[0] * call.grid[1]
        scale = None
        if s.proportional_attention:  # N is the whole image's joint length, not the band's
            scale = proportional_scale(text_len + h * w, s.train_seq_len, attn.head_dim, s.log_scale_factor)
        down_weight = self.spatial_weight if s.down_factor > 1 else None
        out = band_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), text_len=text_len,
                             group=group, window=s.window, down_weight=down_weight, scale=scale)
        return out.transpose(1, 2)


@contextlib.contextmanager
def band_processors(transformer: nn.Module) -> Iterator[int]:
    """Make the CLEAR processors of `transformer` band-aware for the block (yields how many); restores their class.

    The processors keep their identity, parameters and teacher buffers, so `linearize` (which keeps processors
    that are instances of ClearFluxAttnProcessor) and state dicts are unaffected.
    """
    from clear_cli.attention.linearize import attention_modules

    swapped = []
    for attn in attention_modules(transformer):
        proc = attn.processor
        if type(proc) is ClearFluxAttnProcessor:
            proc.__class__ = BandClearProcessor
            swapped.append(proc)
    if not swapped and not any(isinstance(a.processor, BandClearProcessor) for a in attention_modules(transformer)):
        raise ValueError("the transformer has no CLEAR processors: call clear_cli.linearize(...) first")
    try:
        yield len(swapped)
    finally:
        for proc in swapped:
            proc.__class__ = ClearFluxAttnProcessor


@contextlib.contextmanager
def band_context(group: BandGroup) -> Iterator[BandGroup]:
    """Inside, band-aware processors attend over `group` (this thread / task only)."""
    token = _GROUP.set(group)
    try:
        yield group
    finally:
        _GROUP.reset(token)
