"""Reading a synth dataset: `SynthDataset(dir)` (a torch Dataset) and `dataset_card(dir)`.

Latents are stored as the VAE's `latent_dist` (mean and std) BEFORE FLUX's shift/scale; `model_latents`
turns them into what the transformer sees: `(z - shift_factor) * scaling_factor`, z the mean or a sample.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from clear_cli.data import layout, store
from clear_cli.errors import ClearError


def dataset_card(root: str | Path) -> dict:
    """The dataset card (`dataset.json`): config, model facts, resolution, text length, tensor shapes, counts."""
    return layout.read_card(Path(root))


class SynthDataset(torch.utils.data.Dataset):
    """The finished samples of a synth dataset, in index order.

    Each item is a dict: `index` (int), `prompt` (str), `seed` (int; -1 for imported images), `width`, `height`,
    and, when cached, `t5_embeds` [T, D_t5], `pooled_embeds` [D_clip], `latent_mean` / `latent_std`
    [C, H/8, W/8] (torch tensors in the stored dtype); with `with_images=True` also `image` (uint8 [3, H, W]).
    Works with a DataLoader (default collate stacks the tensors and lists the strings).
    """

    def __init__(self, root: str | Path, *, with_images: bool = False, allow_incomplete: bool = False,
                 max_open_shards: int = 8):
        self.root = Path(root)
        self.card = dataset_card(self.root)
        counts = self.card.get("counts", {})
        if not counts.get("complete") and not allow_incomplete:
            raise ClearError(f"{self.root} is incomplete ({counts.get('samples', 0)} of {self.card['n']} samples)",
                             "rerun the same `clear synth` command to finish it, or pass allow_incomplete=True")
        self.records = store.read_manifest(self.root)
        self.with_images = with_images
        self._shards: OrderedDict[str, Any] = OrderedDict()
        self._max_open = max(1, max_open_shards)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def text_len(self) -> int:
        return int(self.card["model"]["text_len"])

    @property
    def resolution(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        r = self.card["resolution"]
        return int(r["width"]), int(r["height"])

    def _shard(self, rel: str):
        from safetensors import safe_open

        f = self._shards.get(rel)
        if f is None:
            f = safe_open(str(self.root / rel), "pt")
            self._shards[rel] = f
            if len(self._shards) > self._max_open:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(rel)
        return f

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        item: dict[str, Any] = {"index": rec["index"], "prompt": rec["prompt"],
                                "seed": -1 if rec.get("seed") is None else int(rec["seed"]),
                                "width": rec["width"], "height": rec["height"]}
        rel = rec["files"].get("tensors")
        if rel:
            f = self._shard(rel)
            for name in self.card.get("tensors", {}):
                item[name] = f.get_tensor(layout.tensor_key(rec["index"], name))
        if self.with_images and "image" in rec["files"]:
            item["image"] = read_image(self.root / rec["files"]["image"])
        return item

    def __getstate__(self) -> dict:  # DataLoader workers: shard handles do not pickle; reopen lazily
        state = self.__dict__.copy()
        state["_shards"] = OrderedDict()
        return state

    def model_latents(self, item: dict, *, sample: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The latent the transformer sees (fp32), `(z - shift) * scale`, z = the mean or mean + std * eps."""
        return model_latents(item["latent_mean"], item["latent_std"], self.card, sample=sample, generator=generator)


def model_latents(mean: torch.Tensor, std: torch.Tensor, card: dict, *, sample: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the card's VAE shift and scale to cached latents (mean, or a sample when `sample=True`), in fp32.

    fp32 whatever the stored dtype: a sample drawn around a bf16 mean must not be rounded back to bf16.
    """
    z = mean.float()
    if sample:
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu").to(mean.device)
        z = z + std.float() * eps
    vae = card["model"]
    if "latents_mean" in vae:   # Qwen-Image: per-channel statistics, (z - mean) / std
        shape = (-1,) + (1,) * (z.dim() - 1)
        m = torch.tensor(vae["latents_mean"], dtype=torch.float32, device=z.device).view(shape)
        s = torch.tensor(vae["latents_std"], dtype=torch.float32, device=z.device).view(shape)
        return (z - m) / s
    return (z - float(vae["vae_shift_factor"])) * float(vae["vae_scaling_factor"])


def read_image(path: Path) -> torch.Tensor:
    """An image file as uint8 [3, H, W]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
