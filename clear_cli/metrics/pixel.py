"""PSNR and SSIM: one definition for `clear eval`, `clear gen --compare`, `clear tiny check` and the gain script.

Plain torch in float64 (no extra dependency). Images are batches (uint8 [B, C, H, W] as the eval reads them, or
floats in [0, 1]); `image_psnr` / `image_ssim` take one image of any kind (PIL, HxWxC array, CxHxW tensor).

- PSNR: 10 log10(1 / MSE) over [0, 1] pixels, per image; `inf` for identical images (8-bit input is compared
  on its exact levels). Means cap each image at `PSNR_CAP_DB` (`mean_psnr`).
- SSIM: Wang et al. 2004 as torchmetrics computes it by default (so figures compare with its users'): an 11x11
  Gaussian window (sigma 1.5), K1 0.01, K2 0.03, data range 1, biased (co)variances clamped at 0, the image
  reflect-padded by 5 pixels and the SSIM map averaged over every pixel and channel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
"""PSNR of identical images is infinite; means and JSON use this cap instead (and say so)."""

_WIN, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03


def as_batch(images) -> torch.Tensor:
    """uint8 or float images [B, C, H, W] (or one image: PIL, HxWxC array, CxHxW tensor) -> float64 in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        import numpy as np

        arr = np.asarray(images)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        images = torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # a copy: PIL arrays are read-only
    x = images.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dtype == torch.uint8:
        return x.to(torch.float64) / 255.0
    return x.to(torch.float64)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = as_batch(a), as_batch(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(a, b) -> torch.Tensor:
    """PSNR in dB per image [B] (float64); `inf` where the images are identical."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype == torch.uint8:
        diff = (a.to(torch.int32) - b.to(torch.int32)).to(torch.float64)  # exact on 8-bit levels
        mse = (diff ** 2).reshape(diff.shape[0] if a.dim() == 4 else 1, -1).mean(1) / 255.0 ** 2
    else:
        x, y = _pair(a, b)
        mse = ((x - y) ** 2).flatten(1).mean(1)
    out = torch.full_like(mse, math.inf)
    nz = mse > 0
    out[nz] = 10.0 * torch.log10(1.0 / mse[nz])
    return out


def _gauss() -> torch.Tensor:
    r = torch.arange(_WIN, dtype=torch.float64) - (_WIN - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * _SIGMA ** 2))
    return g / g.sum()


def ssim(a, b) -> torch.Tensor:
    """SSIM per image [B] (float64; 1.0 for identical images), averaged over channels and pixels."""
    x, y = _pair(a, b)
    c = x.shape[1]
    pad = (_WIN - 1) // 2
    if min(x.shape[-2:]) <= pad:
        raise ValueError(f"SSIM needs images larger than {pad}x{pad} pixels")
    g = _gauss()
    kx = g.view(1, 1, 1, _WIN).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, _WIN, 1).repeat(c, 1, 1, 1)
    x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian over the padded image
        return F.conv2d(F.conv2d(t, kx, groups=c), ky, groups=c)

    mx, my = blur(x), blur(y)
    sxx = (blur(x * x) - mx * mx).clamp(min=0)
    syy = (blur(y * y) - my * my).clamp(min=0)
    sxy = blur(x * y) - mx * my
    c1, c2 = _K1 ** 2, _K2 ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def image_psnr(a, b) -> float:
    """PSNR in dB of one image pair (any kind `as_batch` reads); inf if identical."""
    return float(psnr(a, b)[0])


def image_ssim(a, b) -> float:
    """SSIM of one image pair (any kind `as_batch` reads)."""
    return float(ssim(a, b)[0])


def mean_psnr(values: torch.Tensor) -> tuple[float, int]:
    """(mean PSNR with each image capped at PSNR_CAP_DB, number of identical pairs)."""
    n_inf = int(torch.isinf(values).sum())
    return float(values.clamp(max=PSNR_CAP_DB).mean()), n_inf
