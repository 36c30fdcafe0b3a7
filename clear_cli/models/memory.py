"""What one transformer with teacher copies saves against the authors' two model copies (DESIGN.md §4).

Weights only (activations and optimizer state are the same either way): two copies hold 2 x the model; ours holds
the model plus frozen copies of the image-branch attention projections. Counted exactly from a model, or from a
config on the meta device (no weights needed):

    python -m clear_cli.models.memory            # FLUX.1-dev and the tiny model
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from clear_cli.models.flux_dev import TRANSFORMER as FLUX_DEV  # FLUX.1-dev's transformer config


@dataclass
class MemoryFigure:
    params: int  # all transformer parameters
    trained: int  # the attention parameters distillation trains
    teacher_copy: int  # elements of the frozen teacher copies
    dtype_bytes: int

    @property
    def two_copies_bytes(self) -> int:
        return 2 * self.params * self.dtype_bytes

    @property
    def one_copy_bytes(self) -> int:
        return (self.params + self.teacher_copy) * self.dtype_bytes

    @property
    def saved_bytes(self) -> int:
        return self.two_copies_bytes - self.one_copy_bytes

    def line(self, name: str) -> str:
        def n(x: int) -> str:
            return f"{x / 1e9:.3f}B" if x >= 1e8 else f"{x / 1e6:.3f}M"

        def b(x: int) -> str:
            return f"{x / 1024 ** 3:.2f} GiB" if x >= 1024 ** 3 else f"{x / 1024 ** 2:.2f} MiB"

        return (f"{name}: {n(self.params)} parameters, {n(self.trained)} trained; weights in "
                f"{self.dtype_bytes * 8}-bit: two copies {b(self.two_copies_bytes)}, one copy + teacher "
                f"projections {b(self.one_copy_bytes)}, saved {b(self.saved_bytes)} "
                f"({100 * self.saved_bytes / self.two_copies_bytes:.1f}%)")


def teacher_copy_elements(transformer: torch.nn.Module) -> int:
    """Elements the frozen copies take: every image-branch projection that trains (pooling weights excluded)."""
    from clear_cli.attention.adapters import adapter_for

    adapter = adapter_for(transformer)
    n = 0
    for attn in adapter.attention_modules(transformer):
        n += sum(p.numel() for proj in adapter.image_projections(attn)
                 for p in attn.get_submodule(proj).parameters(recurse=False))
    return n


def memory_figure(transformer: torch.nn.Module, dtype_bytes: int = 2) -> MemoryFigure:
    from clear_cli.attention.linearize import trainable_attention_parameters

    params = sum(p.numel() for p in transformer.parameters())
    trained = sum(p.numel() for p in trainable_attention_parameters(transformer).values())
    return MemoryFigure(params=params, trained=trained, teacher_copy=teacher_copy_elements(transformer),
                        dtype_bytes=dtype_bytes)


def flux_dev_figure(dtype_bytes: int = 2) -> MemoryFigure:
    """FLUX.1-dev's figure, counted on the meta device (no download)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV)
    return memory_figure(model, dtype_bytes)


def main() -> None:
    from clear_cli.models import tiny

    print(flux_dev_figure(2).line("FLUX.1-dev (bf16)"))
    from diffusers import FluxTransformer2DModel

    print(memory_figure(FluxTransformer2DModel(**tiny.TRANSFORMER), 4).line("tiny (fp32)"))


if __name__ == "__main__":
    main()
