"""A tiny ControlNet for the tiny teacher, trained here in a minute or two on a CPU: the stand-in for a FLUX ControlNet
when measuring how CLEAR weights carry over to a plugin on top (bench/transfer.py, issue 18).

    cn = train_controlnet("out/tiny-controlnet")    # a diffusers FluxControlNetModel folder (from_pretrained)

Task: the control image is the scene in grey (luminance, three equal channels), so the ControlNet tells the teacher
where the objects are and how bright they are; the prompt still says which colours. The ControlNet is built from
the teacher (`FluxControlNetModel.from_transformer`, 1 double + 1 single block, weights copied, zero-initialised
control projections as diffusers does), and trained alone (teacher, text encoders and VAE frozen) with the
teacher's own flow-matching loss, its residuals added to the frozen teacher's blocks. Seeded.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clear_cli.config import doc, to_dict
from clear_cli.tiny import TRAIN_SEEDS, scenes

INFO_FILE = "controlnet.json"


def grey(images: np.ndarray) -> np.ndarray:
    """Control images: [..., 3] in [0, 1] -> their luminance in three equal channels."""
    y = images @ np.array([0.299, 0.587, 0.114], dtype=images.dtype)
    return np.repeat(y[..., None], 3, axis=-1)


@dataclass
class ControlNetConfig:
    steps: int = doc(300, "optimizer steps")
    batch: int = doc(16, "scenes per step")
    lr: float = doc(1e-3, "AdamW learning rate (20 warmup steps, cosine to 10%)")
    scenes: int = doc(512, "scenes drawn and encoded once")
    res: int = doc(128, "pixels (the teacher's own)")
    layers: int = doc(1, "double blocks copied from the teacher")
    single_layers: int = doc(1, "single blocks copied from the teacher")
    seed: int = doc(0, "seed of the scenes, the noise and every batch")
    base: str = doc("tiny", "the model the ControlNet steers")
    threads: int = doc(1, "torch CPU threads")


def encode(pipe, images: np.ndarray) -> torch.Tensor:
    """VAE latent means, normalised and packed [N, tokens, 64], of images [N, H, W, 3] in [0, 1]."""
    vae = pipe.vae
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + 64])).permute(0, 3, 1, 2).float() * 2 - 1
            z = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
            b, c, h, w = z.shape
            out.append(pipe._pack_latents(z, b, c, h, w))
    return torch.cat(out)


def _lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build(transformer, cfg: ControlNetConfig):
    from diffusers import FluxControlNetModel

    c = transformer.config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return FluxControlNetModel.from_transformer(transformer, num_layers=cfg.layers,
                                                    num_single_layers=cfg.single_layers,
                                                    attention_head_dim=c.attention_head_dim,
                                                    num_attention_heads=c.num_attention_heads)


def train_controlnet(out: str | Path, config: ControlNetConfig | None = None, **options) -> dict:
    """Train the tiny ControlNet and save it as a diffusers folder at `out`; returns its info (also OUT/controlnet.json)."""
    import dataclasses

    from clear_cli.models import load_pipeline
    from clear_cli.tiny.train import encode_text

    cfg = dataclasses.replace(config or ControlNetConfig(), **options)
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    pipe = load_pipeline(cfg.base)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        m.requires_grad_(False)
    rng = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0xC0C0])
    seeds = rng.integers(0, TRAIN_SEEDS, size=cfg.scenes)
    imgs, caps = scenes.make_batch(seeds, cfg.res)
    x0_all, cond_all = encode(pipe, imgs), encode(pipe, grey(imgs))
    side = cfg.res // 16
    img_ids = pipe._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
    cn = build(pipe.transformer, cfg)
    cn.train()
    params = [p for p in cn.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    losses: list[float] = []
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg.steps, cfg.lr)
        idx = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0xC0C1, step]).integers(0, len(seeds), size=cfg.batch)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        sel = torch.from_numpy(idx)
        x0, cond = x0_all[sel], cond_all[sel]
        emb, pooled, txt_ids = encode_text(pipe, [caps[i] for i in idx])
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(cfg.batch, generator=gen))
        guidance = 1.0 + 4.0 * torch.rand(cfg.batch, generator=gen)
        xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
        common = dict(hidden_states=xt, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
        blocks, single = cn(controlnet_cond=cond, **common)
        pred = pipe.transformer(controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                                **common)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    cn.eval()
    out = Path(out)
    cn.save_pretrained(str(out))  # diffusers writes config.json + safetensors
    info = {"config": to_dict(cfg), "seconds": round(time.perf_counter() - t0, 1), "torch": torch.__version__,
            "loss_first_20": float(np.mean(losses[:20])), "loss_last_20": float(np.mean(losses[-20:]))}
    (out / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info
