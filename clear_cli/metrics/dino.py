"""DINO similarity: cosine of the CLS features of two images under a DINOv2 (or DINO ViT) model from transformers."""

from __future__ import annotations

import torch

from clear_cli.metrics.loading import from_pretrained, load_pretrained
from clear_cli.metrics.vision import IMAGENET_MEAN, IMAGENET_STD, resize_crop_normalize

DEFAULT_DINO = "facebook/dinov2-base"


class DinoFeatures:
    """CLS features of an AutoModel (Dinov2Model / ViTModel) from a hub id or a local directory."""

    def __init__(self, model: str = DEFAULT_DINO, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModel

        self.model = load_pretrained(model, "--dino-model", "DINO model",
                                     lambda source: from_pretrained(AutoModel, source, dtype=dtype).to(device).eval())
        self.device = torch.device(device)
        self.dtype = dtype
        # DINOv2's processor: shortest side 256, centre crop 224; a small test model uses its own size.
        self.crop = min(224, int(getattr(self.model.config, "image_size", 224)))
        self.resize = round(self.crop * 256 / 224)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> unit-norm CLS features [B, D] (float32, CPU)."""
        x = resize_crop_normalize(images, resize=self.resize, crop=self.crop, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                  device=self.device, dtype=self.dtype)
        cls = self.model(pixel_values=x).last_hidden_state[:, 0].float()
        return torch.nn.functional.normalize(cls, dim=-1).cpu()
