"""Per-image SSIM and PSNR between two image batches (uint8 [B, 3, H, W], same size)."""

from __future__ import annotations

import math

import torch

PSNR_CAP_DB = 100.0
"""PSNR of identical images is infinite; means and JSON use this cap instead (and say so)."""


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 in [0, 1]."""
    return images.to(torch.float32) / 255.0


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM per image [B] (torchmetrics, Gaussian 11x11 window, data range 1)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x, y = to_unit(a), to_unit(b)
    return structural_similarity_index_measure(x, y, data_range=1.0, reduction="none").reshape(-1).to(torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image [B] over 8-bit pixels; `inf` where the images are identical."""
    diff = a.to(torch.int32) - b.to(torch.int32)  # exact on 8-bit levels
    mse = (diff.to(torch.float64) ** 2).flatten(1).mean(1) / 255.0 ** 2
    out = torch.full_like(mse, math.inf)
    nz = mse > 0
    out[nz] = 10.0 * torch.log10(1.0 / mse[nz])
    return out


def mean_psnr(values: torch.Tensor) -> tuple[float, int]:
    """(mean PSNR with each image capped at PSNR_CAP_DB, number of identical pairs)."""
    n_inf = int(torch.isinf(values).sum())
    return float(values.clamp(max=PSNR_CAP_DB).mean()), n_inf
