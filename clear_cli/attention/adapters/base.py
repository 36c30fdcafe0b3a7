"""The model adapter: what the rest of `clear` needs to know about one family of diffusion transformers.

One small file per family (flux.py, qwen_image.py, chroma.py) subclasses `ModelAdapter`; `clear_cli.attention.
adapters.adapter_for(transformer)` picks the one whose `matches` says yes. docs/models.md walks through adding one.
Everything here is data or a small method on the transformer and its call; nothing imports above `attention`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelFacts:
    """Numbers a family samples and trains with (help texts and defaults read them)."""

    text_len: int          # default text length (tokens) the model runs at
    base_res: int          # training (base) resolution in px
    pixels_per_token: int  # px per token side (VAE factor x patch size)
    train_text_len: int    # text tokens assumed in N_train for proportional attention
    shift_rule: str        # how the scheduler's shift is set (see sampling/plan.py for the cascade's use)

    @property
    def train_seq_len(self) -> int:
        """Joint length T + H*W at the base resolution (N_train of proportional attention)."""
        side = self.base_res // self.pixels_per_token
        return side * side + self.train_text_len


class ModelAdapter(ABC):
    """Base class of the per-family adapters. Subclasses set the class attributes and implement the methods."""

    family: str = ""                       # the name users see (`--model` families, docs)
    about: str = ""                        # one line: which diffusers classes it serves
    transformer_classes: tuple[str, ...] = ()   # diffusers transformer class names (matched along the MRO)
    pipeline_classes: tuple[str, ...] = ()      # diffusers pipelines of the family (docs, messages)
    kwargs_argument: str = "joint_attention_kwargs"   # transformer.forward argument whose dict reaches processors
    text_first: bool = True                # global (text) tokens precede the image tokens in the joint sequence
    video: bool = False                    # a video family (VideoAdapter): 3-D grid, linearize takes time_window
    facts: ModelFacts

    # -- which modules ---------------------------------------------------------------------------------------
    def matches(self, transformer: nn.Module) -> bool:
        names = {c.__name__ for c in type(transformer).__mro__}
        return bool(names & set(self.transformer_classes))

    @abstractmethod
    def attention_modules(self, transformer: nn.Module) -> list[nn.Module]:
        """The attention modules whose processors CLEAR replaces, in processor order."""
        ...

    def is_double(self, attn: nn.Module) -> bool:
        """True for a double-stream (joint text + image projections) attention."""
        return getattr(attn, "added_kv_proj_dim", None) is not None

    def image_projections(self, attn: nn.Module) -> tuple[str, ...]:
        """Submodule names of the image-branch projections distillation trains (and the teacher keeps frozen)."""
        return ("to_q", "to_k", "to_v", "to_out.0") if self.is_double(attn) else ("to_q", "to_k", "to_v")

    @abstractmethod
    def attention_loss_layers(self, modules: list[nn.Module]) -> list[int]:
        """Processor indices whose outputs feed the attention loss by default."""
        ...

    @abstractmethod
    def make_processor(self, index: int, attn: nn.Module, state: Any) -> nn.Module:
        """The CLEAR processor for one attention module (it reproduces the stock processor's math)."""
        ...

    # -- one call --------------------------------------------------------------------------------------------
    @abstractmethod
    def read_call(self, arguments: dict) -> tuple[int, tuple[int, int], torch.Tensor | None, Any]:
        """(text length, (H, W) target grid, [B, T] bool of valid text keys or None, the call's
        `layout.TokenLayout` or None for text + that one grid) of one transformer call, from the transformer.forward
        arguments bound by name. ValueError names what is missing or inconsistent."""
        ...

    # -- high resolution -------------------------------------------------------------------------------------
    @abstractmethod
    def scale_rope(self, transformer: nn.Module, ntk_factor: float) -> None:
        """Run RoPE with theta x `ntk_factor` on every axis (the authors' NTK rule)."""
        ...

    @abstractmethod
    def restore_rope(self, transformer: nn.Module) -> None:
        ...

    @abstractmethod
    def rope_ntk_factor(self, transformer: nn.Module) -> float | None:
        ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.family}>"


class VideoAdapter(ModelAdapter):
    """A video family: image tokens on a (frames, rows, columns) grid, linearized with a spatial `window` and a
    temporal `time_window` (`attention.video_kernels`). Its processors keep their own state, so `linearize` hands
    the whole install to the adapter instead of the image families' shared ClearState path."""

    video = True
    temporal_factor: int = 1    # pixel frames per latent frame

    @abstractmethod
    def read_grid(self, transformer: nn.Module, arguments: dict) -> tuple[int, int, int]:
        """(frames, rows, columns) token grid of one transformer call, from its forward arguments by name."""
        ...

    @abstractmethod
    def install(self, transformer: nn.Module, window: int, time_window: int, backend: str,
                ntk_factor: float | None) -> None:
        """Install (or reconfigure) the CLEAR processors; validates its arguments (ValueError)."""
        ...

    @abstractmethod
    def uninstall(self, transformer: nn.Module) -> None:
        """Restore the stock processors and RoPE; a no-op on a stock model."""
        ...

    @abstractmethod
    def is_installed(self, transformer: nn.Module) -> bool:
        ...
