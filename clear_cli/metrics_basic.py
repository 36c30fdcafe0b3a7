"""PSNR and SSIM between two images, in plain torch (no extra dependency), for `clear gen --compare`.

SSIM follows Wang et al. 2004 as torchmetrics computes it by default: an 11x11 Gaussian window (sigma 1.5),
K1 0.01, K2 0.03, data range 1, biased (co)variances, per channel on valid (unpadded) windows, averaged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image) -> torch.Tensor:
    """PIL image / uint8 HxWxC array / float tensor -> float64 [C, H, W] in [0, 1]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().to(torch.float64)
        return t if t.dim() == 3 else t.unsqueeze(0)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(arr.astype(np.float64))
    if arr.dtype == np.uint8:
        t = t / 255.0
    return t.permute(2, 0, 1).contiguous()


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_tensor(a), to_tensor(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    x, y = _pair(a, b)
    mse = float(torch.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(a, b, data_range: float = 1.0, win: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity over channels (1.0 for identical images)."""
    x, y = _pair(a, b)
    c = x.shape[0]
    if min(x.shape[1:]) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} pixels")
    g = _gauss(win, sigma)
    kx = g.view(1, 1, 1, win).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, win, 1).repeat(c, 1, 1, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid windows only
        return F.conv2d(F.conv2d(t.unsqueeze(0), kx, groups=c), ky, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return float(s.mean())
