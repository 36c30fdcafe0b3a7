"""CLEAR attention: mask geometry, exact work counting and kernels (reference, tiled, flex, triton)."""

from __future__ import annotations

from clear_cli.attention.counting import attention_flops, count_pairs, paper_pairs
from clear_cli.attention.geometry import circle_size
from clear_cli.attention.kernels import BACKENDS, clear_attention

__all__ = ["clear_attention", "count_pairs", "paper_pairs", "attention_flops", "circle_size", "BACKENDS"]
