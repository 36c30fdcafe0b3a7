"""FLUX (FluxTransformer2DModel and every model built of FluxAttention: ControlNet, Kontext, Fill, derivatives).

Joint sequence [text][image row-major]; 19 double blocks (text and image projections) then 38 single blocks (one
set of projections over the joint sequence); the grid comes from `img_ids` (columns 1, 2 = row, column); RoPE is
FluxPosEmbed over (id, row, column), scaled by swapping in NTKFluxPosEmbed (attention/rope.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from clear_cli.attention import rope
from clear_cli.attention.adapters.base import ModelAdapter, ModelFacts
from clear_cli.attention.context import flux_call_geometry
from clear_cli.flux import BASE_RES, PIXELS_PER_TOKEN, TEXT_LEN


class FluxAdapter(ModelAdapter):
    family = "flux"
    about = "FluxTransformer2DModel and models of FluxAttention (FLUX.1-dev/schnell, Krea, Kontext, ControlNet)"
    transformer_classes = ("FluxTransformer2DModel",)
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxFillPipeline",
                        "FluxControlNetPipeline", "FluxKontextPipeline")
    facts = ModelFacts(text_len=TEXT_LEN, base_res=BASE_RES, pixels_per_token=PIXELS_PER_TOKEN,
                       train_text_len=TEXT_LEN,
                       shift_rule="dynamic: mu linear in the image token count (base_shift..max_shift), no cap")

    def matches(self, transformer: nn.Module) -> bool:
        # Any module holding FluxAttention (ControlNet models, wrappers) is FLUX unless a more specific adapter
        # (Chroma) claimed it first.
        return bool(self.attention_modules(transformer))

    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """Every FluxAttention in processor order: double blocks first, then single blocks (as registered)."""
        from diffusers.models.transformers.transformer_flux import FluxAttention

        return [m for m in transformer.modules() if isinstance(m, FluxAttention)]

    def attention_loss_layers(self, modules: list[nn.Module]) -> list[int]:
        """The authors' layers: processor index % 4 == 0 among single-stream blocks (FLUX: single 1, 5, ..., 37)."""
        return [i for i, m in enumerate(modules) if i % 4 == 0 and not self.is_double(m)]

    def make_processor(self, index: int, attn: nn.Module, state: Any) -> nn.Module:
        from clear_cli.attention.processors import ClearFluxAttnProcessor

        return ClearFluxAttnProcessor(index, double=self.is_double(attn), state=state)

    def read_call(self, arguments: dict):
        text_len, layout = flux_call_geometry(arguments)   # the target grid and any reference images (Kontext)
        return text_len, layout.target.shape, None, layout

    def scale_rope(self, transformer: nn.Module, ntk_factor: float) -> None:
        rope.scale_rope(transformer, ntk_factor)

    def restore_rope(self, transformer: nn.Module) -> None:
        rope.restore_rope(transformer)

    def rope_ntk_factor(self, transformer: nn.Module) -> float | None:
        return rope.rope_ntk_factor(transformer)
