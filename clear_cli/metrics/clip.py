"""CLIP text score and CLIP image similarity with transformers' CLIPModel (a thin adapter, not torchmetrics'
CLIPScore, which breaks on transformers 5).

text score = 100 * max(cos(image, text), 0), as torchmetrics / the CLIPScore paper define it;
image similarity = cos(image_a, image_b) of the projected image embeddings.
"""

from __future__ import annotations

import torch

from clear_cli.metrics.loading import from_pretrained, load_pretrained
from clear_cli.metrics.vision import CLIP_MEAN, CLIP_STD, resize_crop_normalize

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


class ClipScorer:
    """A CLIPModel + tokenizer from a hub id or a local directory (`save_pretrained` output)."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoTokenizer, CLIPModel

        self.model, self.tokenizer = load_pretrained(model, "--clip-model", "CLIP model", lambda source: (
            from_pretrained(CLIPModel, source, dtype=dtype).to(device).eval(), from_pretrained(AutoTokenizer, source)))
        self.device = torch.device(device)
        self.dtype = dtype
        self.size = int(self.model.config.vision_config.image_size)
        self.max_len = int(min(getattr(self.tokenizer, "model_max_length", 77) or 77,
                               self.model.config.text_config.max_position_embeddings))

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> unit-norm image embeddings [B, D] (float32, CPU)."""
        x = resize_crop_normalize(images, resize=self.size, crop=self.size, mean=CLIP_MEAN, std=CLIP_STD,
                                  device=self.device, dtype=self.dtype)
        pooled = self.model.vision_model(pixel_values=x).pooler_output
        emb = self.model.visual_projection(pooled).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unit-norm text embeddings [B, D] (truncated to CLIP's text length)."""
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_len,
                             return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        emb = self.model.text_projection(out.pooler_output).float()
        return torch.nn.functional.normalize(emb, dim=-1).cpu()


def text_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-image CLIP score [B]: 100 * max(cos, 0)."""
    return (100.0 * (image_embeds * text_embeds).sum(-1)).clamp(min=0).double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity [B] of (already unit-norm) embeddings."""
    return (a * b).sum(-1).double()
