"""Derivatives of the tiny teacher, made here in a minute or two on a CPU (as FLUX.1-schnell, Krea or a community
fine-tune are derivatives of FLUX.1-dev): the stand-ins for measuring CLEAR's zero-shot transfer (bench/transfer.py).

    derive("out/tiny-roll", style="roll")                        # a full fine-tune: a diffusers folder (--model DIR)
    derive("out/tiny-invert-lora", style="invert", lora_rank=8)  # a style LoRA: a diffusers LoRA file

Styles (captions unchanged, so every prompt means the same scene in another look):
- ``roll``: colour channels rotated, (R, G, B) <- (B, R, G): red objects come out green, blue backgrounds red,
  white stays white. A palette every colour word maps to anew.
- ``invert``: colours inverted (1 - x).

The transformer alone is trained (text encoders and VAE frozen, as fine-tunes of FLUX train its transformer), by
the teacher's own flow-matching loss (`clear_cli.tiny.train.flux_loss`) on scenes drawn in that style and encoded
by the teacher's VAE. Seeded: the same call gives the same model on the same machine (float sums may differ
across thread counts). Shipped nothing: rebuilding is cheaper than carrying the weights (see docs/tiny.md).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from clear_cli.config import doc, to_dict
from clear_cli.errors import UsageError
from clear_cli.tiny import TRAIN_SEEDS, scenes

STYLES = ("roll", "invert")
INFO_FILE = "derive.json"


def apply_style(images: np.ndarray, style: str) -> np.ndarray:
    """Images [..., 3] in [0, 1] drawn in `style`."""
    if style == "roll":
        return np.ascontiguousarray(images[..., (2, 0, 1)])
    if style == "invert":
        return 1.0 - images
    raise UsageError(f"style {style!r} is not one of {', '.join(STYLES)}")


@dataclass
class DeriveConfig:
    style: str = doc("roll", "roll (colour channels rotated) or invert (1 - colours)")
    steps: int = doc(300, "optimizer steps")
    batch: int = doc(32, "scenes per step")
    lr: float = doc(1e-3, "AdamW learning rate (20 warmup steps, cosine to 10%); a LoRA wants more (3e-3)")
    scenes: int = doc(1024, "scenes drawn in the style and encoded once")
    res: int = doc(128, "pixels (the teacher's own)")
    lora_rank: int = doc(0, "0: fine-tune every transformer weight (a derivative model); > 0: a LoRA of this rank")
    lora_targets: tuple[str, ...] = doc(("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                                         "proj_mlp", "proj_out"), "modules a LoRA adapts (name suffixes)")
    seed: int = doc(0, "seed of the scenes, the noise and every batch")
    base: str = doc("tiny", "the model derived from")
    threads: int = doc(1, "torch CPU threads")


@dataclass
class DeriveResult:
    path: Path
    """the diffusers folder (full fine-tune) or the LoRA file"""
    seconds: float
    losses: list[float]
    config: DeriveConfig


def _latents(pipe, cfg: DeriveConfig) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(normalised latent means [N,16,h,w], captions, scene seeds) of `cfg.scenes` scenes drawn in the style."""
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0xDE71])
    seeds = rng.integers(0, TRAIN_SEEDS, size=cfg.scenes)
    vae = pipe.vae
    lat, caps = [], []
    with torch.no_grad():
        for i in range(0, len(seeds), 64):
            imgs, c = scenes.make_batch(seeds[i:i + 64], cfg.res)
            x = torch.from_numpy(apply_style(imgs, cfg.style)).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0
            lat.append(vae.encode(x).latent_dist.mean)
            caps += c
    z = (torch.cat(lat) - vae.config.shift_factor) * vae.config.scaling_factor
    return z, caps, seeds


def _lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def derive(out: str | Path, config: DeriveConfig | None = None, *, progress: bool = False,
           on_step: Callable[[int, float], None] | None = None, **options) -> DeriveResult:
    """Fine-tune `config.base` (the tiny teacher) in `config.style`; writes a diffusers folder (`lora_rank` 0) or a
    LoRA file (``out`` ending in .safetensors, or ``out/style_lora.safetensors``) and returns where."""
    import dataclasses

    from clear_cli.models import load_pipeline, save_pipeline
    from clear_cli.tiny.train import flux_loss, object_cover, token_weights

    cfg = dataclasses.replace(config or DeriveConfig(), **options)
    if cfg.style not in STYLES:
        raise UsageError(f"style {cfg.style!r} is not one of {', '.join(STYLES)}")
    for name in ("steps", "batch", "scenes"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"{name} {getattr(cfg, name)} must be at least 1")
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    pipe = load_pipeline(cfg.base)
    z, caps, seeds = _latents(pipe, cfg)
    weights = token_weights(object_cover(seeds, cfg.res), 4.0)  # the teacher's own object weighting
    tr = pipe.transformer
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.requires_grad_(False)
    if cfg.lora_rank > 0:
        from peft import LoraConfig

        tr.requires_grad_(False)
        targets = sorted({n for n, _ in tr.named_modules() if n.endswith(tuple(cfg.lora_targets))})
        tr.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                  target_modules=targets), adapter_name="style")
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    tr.train()
    losses: list[float] = []
    from clear_cli.logs import progress_bar as tqdm

    bar = tqdm(range(cfg.steps), desc=f"derive {cfg.style}", disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.steps, cfg.lr)
        idx = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0xDE72, step]).integers(0, len(z), size=cfg.batch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        sel = torch.from_numpy(idx)
        loss = flux_loss(pipe, z[sel], [caps[i] for i in idx], gen, (1.0, 5.0), False, weights[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step:
            on_step(step, losses[-1])
    tr.eval()
    seconds = time.perf_counter() - t0
    info = {"config": to_dict(cfg), "seconds": round(seconds, 1), "torch": torch.__version__,
            "loss_first_20": float(np.mean(losses[:20])), "loss_last_20": float(np.mean(losses[-20:]))}
    out = Path(out)
    if cfg.lora_rank > 0:
        from peft.utils import get_peft_model_state_dict

        path = out if out.suffix == ".safetensors" else out / "style_lora.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(tr, adapter_name="style")
        type(pipe).save_lora_weights(str(path.parent), transformer_lora_layers=state, weight_name=path.name)
        path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    else:
        path = save_pipeline(pipe, out)
        (path / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return DeriveResult(path=path, seconds=seconds, losses=losses, config=cfg)
