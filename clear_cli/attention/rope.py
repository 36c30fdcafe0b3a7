"""RoPE NTK scaling for high resolution, by the CLEAR authors' rule (DESIGN.md §5).

The authors multiply RoPE's theta by the factor on every axis (factor 10: theta 10,000 -> 100,000), which
diffusers' `get_1d_rotary_pos_embed(..., ntk_factor=)` does. We swap the transformer's `pos_embed` for an
equivalent module that passes the factor, and keep the original to put back; nothing else changes.
"""

from __future__ import annotations

import torch
from torch import nn


class NTKFluxPosEmbed(nn.Module):
    """FLUX's rotary embedding (diffusers' FluxPosEmbed) with theta multiplied by `ntk_factor` on every axis."""

    def __init__(self, theta: float, axes_dim: list[int] | tuple[int, ...], ntk_factor: float = 1.0,
                 original: nn.Module | None = None):
        super().__init__()
        self.theta = theta
        self.axes_dim = axes_dim
        self.ntk_factor = float(ntk_factor)
        self._original = (original,)  # a tuple keeps it out of the module tree (and out of state_dict)

    @property
    def original(self) -> nn.Module | None:
        return self._original[0]

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Mirrors FluxPosEmbed.forward line for line so that factor 1 reproduces it bit for bit.
        from diffusers.models.embeddings import get_1d_rotary_pos_embed
        from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

        pos = ids.float()
        freqs_dtype = maybe_adjust_dtype_for_device(torch.float64, ids.device)
        cos_out, sin_out = [], []
        for i in range(ids.shape[-1]):
            cos, sin = get_1d_rotary_pos_embed(
                self.axes_dim[i], pos[:, i], theta=self.theta, ntk_factor=self.ntk_factor,
                repeat_interleave_real=True, use_real=True, freqs_dtype=freqs_dtype,
            )
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, axes_dim={list(self.axes_dim)}, ntk_factor={self.ntk_factor}"


def rope_ntk_factor(transformer: nn.Module) -> float | None:
    """The NTK factor the transformer's RoPE runs with (None: stock RoPE)."""
    pe = getattr(transformer, "pos_embed", None)
    return pe.ntk_factor if isinstance(pe, NTKFluxPosEmbed) else None


def scale_rope(transformer: nn.Module, ntk_factor: float) -> nn.Module:
    """Run the transformer's RoPE with theta x `ntk_factor` on every axis (replaces an earlier factor)."""
    if not ntk_factor > 0:
        raise ValueError(f"ntk_factor must be > 0, got {ntk_factor!r}")
    pe = getattr(transformer, "pos_embed", None)
    original = pe.original if isinstance(pe, NTKFluxPosEmbed) else pe
    if original is None or not hasattr(original, "theta") or not hasattr(original, "axes_dim"):
        raise ValueError(f"{type(transformer).__name__} has no FLUX-style pos_embed (theta, axes_dim) to scale")
    transformer.pos_embed = NTKFluxPosEmbed(original.theta, original.axes_dim, ntk_factor, original=original)
    return transformer


def restore_rope(transformer: nn.Module) -> nn.Module:
    """Put back the stock RoPE module (no-op when it was never scaled)."""
    pe = getattr(transformer, "pos_embed", None)
    if isinstance(pe, NTKFluxPosEmbed) and pe.original is not None:
        transformer.pos_embed = pe.original
    return transformer
