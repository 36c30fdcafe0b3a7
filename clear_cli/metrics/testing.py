"""Small seeded metric networks written to local paths: what tests (and install smoke checks) pass in place of
the hub networks, through exactly the loading code real use takes (`--clip-model DIR`, `--dino-model DIR`,
`--inception-weights FILE`, `--lpips-weights FILE`). Their numbers mean nothing; the plumbing is what is tested.
"""

from __future__ import annotations

from pathlib import Path

import torch


def write_small_networks(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """Write a tiny CLIP, a tiny DINOv2, a small Inception stand-in and a random LPIPS under `folder`.

    Returns the options to pass: {"clip_model", "dino_model", "inception_weights", "lpips_weights"}.
    """
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model
    from transformers.utils import logging as tlog

    from clear_cli.metrics.inception import SmallConvFeatures, save_feature_net
    from clear_cli.metrics.lpips import build_lpips, save_lpips_weights
    from clear_cli.models import vocab
    from clear_cli.models.tiny import clip_tokenizer

    tlog.disable_progress_bar()
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(vocab.words()), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=32, bos_token_id=3, eos_token_id=1,
                             pad_token_id=0),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=32, patch_size=8),
            projection_dim=16)).eval()
        dino = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8)).eval()
        feats = SmallConvFeatures(channels=(8, 16), dim=32, image_size=64)
        lpips = build_lpips("squeeze", pretrained=False)
    clip.save_pretrained(root / "clip")
    clip_tokenizer().save_pretrained(root / "clip")
    dino.save_pretrained(root / "dino")
    save_feature_net(feats, root / "inception.safetensors")
    save_lpips_weights(lpips, root / "lpips.safetensors", net="squeeze")
    return {"clip_model": str(root / "clip"), "dino_model": str(root / "dino"),
            "inception_weights": str(root / "inception.safetensors"),
            "lpips_weights": str(root / "lpips.safetensors")}


def write_student(path: str | Path, transformer: torch.nn.Module, *, window: int, down_factor: int = 1,
                  base_model: str = "tiny-random", noise: float = 0.0, seed: int = 0) -> Path:
    """A student file from a transformer's own image-branch attention weights (+ optional seeded noise)."""
    import re

    from clear_cli.models.weights import save_attention_weights

    pat = re.compile(r"\.attn\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$")
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, v in transformer.state_dict().items():
        if pat.search(k):
            v = v.detach().float().cpu()
            tensors[k] = v + noise * v.std() * torch.randn(v.shape, generator=gen) if noise else v.clone()
    return save_attention_weights(path, tensors, {"window": window, "down_factor": down_factor,
                                                  "base_model": base_model, "steps": 0, "recipe_hash": "test"})
