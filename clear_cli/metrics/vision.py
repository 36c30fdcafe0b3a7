"""Shared image preprocessing for the transformers metric networks (batched, in torch, no PIL round trip)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_crop_normalize(images: torch.Tensor, *, resize: int, crop: int, mean, std,
                          device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> shortest side to `resize` (bicubic, antialiased), centre crop `crop`, normalised."""
    x = images.to(device, torch.float32) / 255.0
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    size = (max(crop, round(h * scale)), max(crop, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    x = x[..., top: top + crop, left: left + crop]
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)
