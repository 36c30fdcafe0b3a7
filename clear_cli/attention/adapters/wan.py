"""Wan 2.x (WanTransformer3DModel; WanPipeline, WanImageToVideoPipeline): the first video family.

Wan's self-attention (`attn1` of every block) holds video tokens only, frame-major on a (frames, rows, columns)
grid read from the latent each forward receives; text reaches the video through the cross-attention (`attn2`),
which keeps its stock processor. The processor, the grid hook and the 3-D RoPE NTK rule live in
`clear_cli.attention.wan`; this adapter is how `linearize` and the rest of `clear` find them (VideoAdapter in
base.py: `install` / `uninstall` instead of the image families' shared ClearState path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clear_cli.attention import wan
from clear_cli.attention.adapters.base import ModelFacts, VideoAdapter


class WanAdapter(VideoAdapter):
    family = "wan"
    about = "WanTransformer3DModel (Wan 2.x text/image to video: 3-D RoPE, video-only self-attention)"
    transformer_classes = ("WanTransformer3DModel",)
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline", "WanVideoToVideoPipeline")
    kwargs_argument = "attention_kwargs"
    text_first = False   # no text tokens in the self-attention at all
    # Wan 2.1 at 480p (832 x 480): VAE /8 and patch 2 -> 16 px per token; 512 umT5 tokens; shift 5 (flow match)
    facts = ModelFacts(text_len=512, base_res=480, pixels_per_token=16, train_text_len=0, shift_rule="fixed")
    temporal_factor = 4   # pixel frames per latent frame (the Wan VAE; patch 1 in time)

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        return wan.self_attention_modules(transformer)

    def is_double(self, attn: nn.Module) -> bool:
        return False

    def image_projections(self, attn: nn.Module) -> tuple[str, ...]:
        return ("to_q", "to_k", "to_v")

    def attention_loss_layers(self, modules: list[nn.Module]) -> list[int]:
        return list(range(len(modules)))

    def make_processor(self, index: int, attn: nn.Module, state: Any) -> nn.Module:
        return wan.ClearWanAttnProcessor(state)

    def read_call(self, arguments: dict):
        raise ValueError("Wan calls hold a 3-D token grid and no text in self-attention: use read_grid")

    def read_grid(self, transformer: nn.Module, arguments: dict) -> tuple[int, int, int]:
        x = arguments.get("hidden_states")
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            raise ValueError("Wan's hidden_states must be a latent video [batch, channels, frames, height, width], "
                             f"got {None if x is None else tuple(x.shape)}")
        p_t, p_h, p_w = transformer.config.patch_size
        return (x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w)

    # -- install ---------------------------------------------------------------------------------------------
    def install(self, transformer: nn.Module, window: int, time_window: int, backend: str,
                ntk_factor: float | None) -> None:
        wan.linearize_wan(transformer, window, time_window, backend, ntk_factor=ntk_factor)

    def uninstall(self, transformer: nn.Module) -> None:
        wan.unlinearize_wan(transformer)

    def is_installed(self, transformer: nn.Module) -> bool:
        return wan.is_wan_linearized(transformer)

    # -- RoPE ------------------------------------------------------------------------------------------------
    def scale_rope(self, transformer: nn.Module, ntk_factor: float) -> None:
        state = getattr(transformer, wan.STATE_ATTR, None)
        if state is None:
            raise ValueError("Wan's RoPE is scaled by linearize(..., ntk_factor=): the model is not linearized")
        wan._set_rope(transformer, state, ntk_factor)

    def restore_rope(self, transformer: nn.Module) -> None:
        state = getattr(transformer, wan.STATE_ATTR, None)
        if state is not None:
            wan._set_rope(transformer, state, None)

    def rope_ntk_factor(self, transformer: nn.Module) -> float | None:
        state = getattr(transformer, wan.STATE_ATTR, None)
        return None if state is None else state.ntk_factor
