"""Train the tiny FLUX teacher on procedural scenes, on a CPU, seeded and resumable.

Stages (each resumable from its last checkpoint in `out/`):
1. `vae`: the tiny VAE as an autoencoder on random crops of scenes. It decodes from the latent *mean* with a
   very small KL weight (decoding sampled latents teaches it to average colours away; DESIGN.md §8).
2. `cache`: encode a fixed, seeded set of scenes to latent means once (the VAE encoder costs more per image
   than a transformer step), then measure the latents' shift and scale and store them in the VAE config.
3. `flux`: the tiny FluxTransformer2DModel by rectified flow matching, in FluxPipeline's own conventions:
   latents `(z - shift) * scale`, 2x2 packing, img_ids/txt_ids from the pipeline, `timestep = sigma`, a
   guidance embedding, velocity target `noise - x0`. The T5 and CLIP encoders train with it (frozen random
   encoders left the model unable to tell the object's colour word from the background's), and the loss
   weighs the tokens objects cover more (objects are a few percent of a scene's pixels).
4. `decoder`: the VAE decoder alone, on the frozen encoder's latents, sharpened on full-size scenes.

Every batch, noise draw and crop is a function of (seed, stage, step), so a resumed run continues exactly as
an uninterrupted one would. Checkpoints are safetensors (model, AdamW moments, EMA) plus a small JSON state;
nothing is pickled. The result is one safetensors file that `load_pipeline("tiny")` reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from clear_cli.config import doc, merge_options, to_dict
from clear_cli.errors import ClearError, UsageError
from clear_cli.files import atomic_copy, atomic_write_text, check_out_dir, remove_owned, save_safetensors
from clear_cli.logs import Log, sayer
from clear_cli.models import tiny
from clear_cli.tiny import scenes

RESULT_NAME = "tiny_flux.safetensors"
OWNED = ("state.json", "train_log.jsonl", "checkpoints", RESULT_NAME)  # all that --overwrite may delete
STAGES = ("vae", "cache", "flux", "decoder", "done")


# How a call runs, not what it trains: never recorded in the run's state, so they may change on resume.
RUN_FIELDS = ("out", "minutes", "resume", "overwrite", "device", "install")


@dataclass
class TinyTrainConfig:
    """`clear tiny train`: the recipe of the tiny teacher, then how this call runs (RUN_FIELDS)."""

    seed: int = doc(0, "seed of the model init, the scenes, the noise and every batch")
    res: int = doc(128, "training resolution of the transformer (pixels, multiple of 16)")
    vae_steps: int = doc(3000, "VAE optimizer steps")
    vae_batch: int = doc(16, "VAE batch (crops, 3 in 4 centred on an object)")
    vae_crop: int = doc(64, "VAE crop size in pixels (the VAE is convolutional; crops keep it cheap)")
    vae_lr: float = doc(3e-3, "VAE learning rate (AdamW, 50 warmup steps, cosine to 10%)")
    kl_weight: float = doc(1e-6, "KL weight of the VAE (very small: decode from the mean)")
    object_weight: float = doc(4.0, "reconstruction weight of object pixels vs background (objects are small)")
    cache_size: int = doc(8192, "scenes encoded once to latents for the transformer stage")
    steps: int = doc(6000, "transformer optimizer steps (more on --resume auto extends a finished run)")
    batch_size: int = doc(64, "transformer batch")
    lr: float = doc(1e-3, "transformer learning rate (AdamW, warmup then cosine to 10%)")
    warmup: int = doc(100, "transformer warmup steps")
    ema: float = doc(0.998, "EMA decay of the trained weights (the EMA is what ships)")
    flux_object_weight: float = doc(4.0, "flow-loss weight of object-covered tokens vs background (objects are small)")
    train_text: bool = doc(True, "train T5 and CLIP with the transformer (frozen random ones misbind colour words)")
    guidance_range: tuple[float, float] = doc((1.0, 5.0), "guidance values fed to the guidance embedding")
    decoder_steps: int = doc(400, "VAE decoder steps after the transformer (frozen encoder: latents unchanged)")
    decoder_batch: int = doc(4, "decoder batch (full-resolution scenes)")
    decoder_lr: float = doc(3e-4, "decoder learning rate (AdamW, cosine to 10%)")
    ckpt_every: int = doc(200, "checkpoint every N steps (and at the end of each stage / the time limit)")
    log_every: int = doc(10, "write the mean loss to train_log.jsonl every N steps")
    threads: int = doc(2, "torch CPU threads")
    out: str = doc("out/tiny", "run folder: checkpoints, train_log.jsonl, the result")
    minutes: float | None = doc(None, "stop (with a checkpoint) after this many minutes")
    resume: str | None = doc(None, "`auto`: continue the run in --out")
    overwrite: bool = doc(False, "delete a previous run in --out and start again")
    device: str = doc("cpu", "cpu (the documented recipe), auto, cuda or cuda:N")
    install: bool = doc(False, "copy the result to the package (the shipped weights)")


def _recipe(cfg: TinyTrainConfig) -> dict:
    """What the run records and a resume compares: the config without RUN_FIELDS (`batch_size` under its old
    key `batch`, so runs started before 0.2 resume)."""
    return {("batch" if k == "batch_size" else k): v for k, v in to_dict(cfg).items() if k not in RUN_FIELDS}


@dataclass
class TrainResult:
    out: Path
    stage: str
    step: int
    finished: bool
    weights: Path | None
    seconds: float


# ---------------------------------------------------------------- small helpers


def _rng(cfg: TinyTrainConfig, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed & 0xFFFFFFFF, stage, step])


def _torch_gen(cfg: TinyTrainConfig, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + stage * 7_919 + step) % (2**63))


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _to_chw(imgs: np.ndarray) -> torch.Tensor:
    """[B,H,W,3] in [0,1] -> [B,3,H,W] in [-1,1] (the VAE's range)."""
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous() * 2.0 - 1.0


def _save_ckpt(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
               ema: dict[str, torch.Tensor] | None = None) -> None:
    """Model weights, AdamW moments (per parameter name) and the EMA in one safetensors file."""
    state = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            state[f"opt.{n}.exp_avg"] = st["exp_avg"].contiguous()
            state[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
            state[f"opt.{n}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    for k, v in (ema or {}).items():
        state[f"ema.{k}"] = v.contiguous()
    save_safetensors(path, state)


def _load_ckpt(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
               ema: dict[str, torch.Tensor] | None = None) -> None:
    from safetensors.torch import load_file

    dev = next(model.parameters()).device
    state = {k: v.to(dev) for k, v in load_file(str(path)).items()}
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    for n, p in model.named_parameters():
        if f"opt.{n}.exp_avg" in state:
            opt.state[p] = {
                "step": torch.tensor(float(state[f"opt.{n}.step"].item())),  # AdamW keeps it on the CPU
                "exp_avg": state[f"opt.{n}.exp_avg"].clone(),
                "exp_avg_sq": state[f"opt.{n}.exp_avg_sq"].clone(),
            }
    if ema is not None:
        for k in ema:
            if f"ema.{k}" in state:
                ema[k].copy_(state[f"ema.{k}"])


class _Run:
    """Paths and the JSON state of one training directory."""

    def __init__(self, out: Path):
        self.out = out
        self.ckpt = out / "checkpoints"
        self.state_path = out / "state.json"
        self.log_path = out / "train_log.jsonl"
        self.clock: Callable[[], float] = lambda: 0.0  # seconds spent on the run so far, all calls together

    def state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            return json.loads(self.state_path.read_text())
        except json.JSONDecodeError as e:
            raise ClearError(f"{self.state_path} is not valid JSON ({e})",
                             "delete the folder or pass another --out to start afresh") from e

    def write_state(self, **state: Any) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=1))

    def log(self, **row: Any) -> None:
        with open(self.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from clear_cli.logs import progress_bar as tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if tty else 30.0, file=sys.stderr)


# ---------------------------------------------------------------- stage 1: VAE


def _vae_batch(cfg: TinyTrainConfig, step: int) -> torch.Tensor:
    """Crops of full-size scenes, most of them centred on an object (jittered, clamped to the image).

    Objects cover a few percent of a scene and their colours are what the teacher must keep: uniform random
    crops spend most of the VAE's steps on flat background.
    """
    rng = _rng(cfg, 1, step)
    seeds = rng.integers(0, scenes.TRAIN_SEEDS, size=cfg.vae_batch)
    full = max(cfg.res, cfg.vae_crop)
    sc = [scenes.sample_scene(int(s)) for s in seeds]
    imgs = scenes.render(sc, full)
    c, hi = cfg.vae_crop, full - cfg.vae_crop
    ys = rng.integers(0, hi + 1, size=cfg.vae_batch)
    xs = rng.integers(0, hi + 1, size=cfg.vae_batch)
    for i, s in enumerate(sc):
        if rng.random() < 0.75:
            cy, cx = scenes.object_center_px(s.objects[int(rng.integers(len(s.objects)))], full)
            jy, jx = rng.integers(-c // 4, c // 4 + 1, size=2)
            ys[i] = min(max(cy + jy - c // 2, 0), hi)
            xs[i] = min(max(cx + jx - c // 2, 0), hi)
    crops = np.stack([im[y:y + c, x:x + c] for im, y, x in zip(imgs, ys, xs)])
    return _to_chw(crops)


def object_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weights [B,1,H,W] (mean 1): `weight` where a pixel differs from its image's border median.

    Objects cover a few percent of a scene; unweighted, the autoencoder learns backgrounds and blurs objects
    into them, and object colours are exactly what the teacher must keep.
    """
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=-1)  # [B,3,4S]
    bg = border.median(dim=-1).values[:, :, None, None]
    fg = ((x - bg).abs().amax(1, keepdim=True) > 0.2).float()
    w = 1.0 + (weight - 1.0) * fg
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def recon_loss(rec: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
    w = object_weights(x, weight)
    return (w * (rec - x) ** 2).mean() + 0.5 * (w * (rec - x).abs()).mean()


def vae_loss(vae, x: torch.Tensor, kl_weight: float, object_weight: float = 1.0) -> tuple[torch.Tensor, float]:
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.mean).sample
    mse = F.mse_loss(rec, x)
    loss = recon_loss(rec, x, object_weight) + kl_weight * post.kl().mean() / x[0].numel()
    return loss, float(mse.detach())


# ---------------------------------------------------------------- stage 3: FLUX


def encode_text(pipe, captions: list[str], grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T5 embeddings, pooled CLIP, txt_ids) exactly as FluxPipeline computes them at the tiny text length."""
    with torch.set_grad_enabled(grad):
        return pipe.encode_prompt(prompt=captions, prompt_2=None, device=pipe.transformer.device,
                                  max_sequence_length=tiny.TEXT_LEN)


def trained_modules(pipe, train_text: bool) -> torch.nn.ModuleDict:
    """What the flux stage trains, under the pipeline's component names (checkpoint and EMA keys follow them)."""
    mods = {"transformer": pipe.transformer}
    if train_text:
        mods.update(text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)
    return torch.nn.ModuleDict(mods)


def object_cover(seeds: np.ndarray, res: int, batch: int = 256) -> torch.Tensor:
    """Share of each packed token's pixels [N, (res/16)^2] that an object covers in scene `seed`.

    Drawn twice (with and without the objects), so textured backgrounds do not count as objects.
    """
    out = []
    for i in range(0, len(seeds), batch):
        sc = [scenes.sample_scene(int(s)) for s in seeds[i:i + batch]]
        full = scenes.render(sc, res)
        bare = scenes.render([replace(x, objects=()) for x in sc], res)
        fg = torch.from_numpy((np.abs(full - bare).max(-1) > 0.05).astype(np.float32))[:, None]
        out.append(F.avg_pool2d(fg, 16).flatten(1))  # one packed token = 2x2 latents = 16x16 pixels
    return torch.cat(out)


def token_weights(cover: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-token flow-loss weights [B, tokens] (mean 1 per image): 1 on background, `weight` under objects."""
    w = 1.0 + (weight - 1.0) * cover
    return w / w.mean(dim=1, keepdim=True)


def flux_loss(pipe, z: torch.Tensor, captions: list[str], gen: torch.Generator,
              guidance_range: tuple[float, float], train_text: bool = False,
              weights: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching loss on normalised latents z [B,16,h,w] in FluxPipeline's conventions.

    weights: optional per-token weights [B, tokens] (see `token_weights`); the plain mean when None.
    """
    b, c, h, w = z.shape
    emb, pooled, txt_ids = encode_text(pipe, captions, grad=train_text)
    x0 = pipe._pack_latents(z, b, c, h, w)
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
    # Drawn on the CPU generator so that a run's noise does not depend on the device.
    noise = torch.randn(x0.shape, generator=gen).to(z.device)
    sigma = torch.sigmoid(torch.randn(b, generator=gen)).to(z.device)  # logit-normal over (0, 1)
    lo, hi = guidance_range
    guidance = (lo + (hi - lo) * torch.rand(b, generator=gen)).to(z.device)
    s = sigma[:, None, None]
    xt = (1 - s) * x0 + s * noise
    pred = pipe.transformer(hidden_states=xt, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                            encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    if weights is None:
        return F.mse_loss(pred, noise - x0)
    return (((pred - (noise - x0)) ** 2).mean(-1) * weights).mean()


# ---------------------------------------------------------------- the driver


def _latest_ckpt(run: _Run, stage: str) -> tuple[int, Path] | None:
    found = sorted(p for p in run.ckpt.glob(f"{stage}_*.safetensors") if p.stem.split("_")[1].isdigit())
    if not found:
        return None
    p = found[-1]
    return int(p.stem.split("_")[1]), p


def _run_stage(name: str, run: _Run, model: torch.nn.Module, opt: torch.optim.Optimizer, total: int, lr: float,
               warmup: int, step_fn: Callable[[int], tuple[torch.Tensor, dict[str, float]]], cfg: TinyTrainConfig, *,
               resume: str | None, deadline: float | None, progress: bool, on_step=None, save_state=None,
               ema: dict[str, torch.Tensor] | None = None, log_lr: bool = False) -> tuple[bool, int]:
    """The loop every stage shares: resume from the stage's last checkpoint, warmup + cosine learning rate,
    clipped AdamW steps, the EMA (when given), the loss log, checkpoints, the progress bar and the time limit.

    step_fn(step) -> (loss, extras): extras (floats) go to the log row and the bar. Returns (finished, step).
    """
    start = 0
    last = _latest_ckpt(run, name) if resume else None
    if last:
        start, path = last
        _load_ckpt(path, model, opt, ema)
    bar = _progress(total, start, name, progress)
    acc: list[float] = []
    for step in range(start, total):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, lr, warmup)
        loss, extras = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                decay = min(cfg.ema, (1 + step) / (10 + step))
                for k, v in model.state_dict().items():
                    ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        acc.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{acc[-1]:.4f}", **{k: f"{v:.4f}" for k, v in extras.items()})
        if on_step:
            on_step(name, step, acc[-1])
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            lr_now = {"lr": opt.param_groups[0]["lr"]} if log_lr else {}
            run.log(stage=name, step=done, loss=float(np.mean(acc)), **lr_now, **extras, seconds=round(run.clock(), 1))
            acc = []
        out_of_time = deadline is not None and time.monotonic() > deadline
        if done % cfg.ckpt_every == 0 or done == total or out_of_time:
            _save_ckpt(run.ckpt / f"{name}_{done:06d}.safetensors", model, opt, ema)
            if save_state:
                save_state(name, done)
        if out_of_time and done < total:
            bar.close()
            return False, done
    bar.close()
    return True, total


def train(config: TinyTrainConfig | None = None, *, log: Log | None = None, progress: bool = True,
          on_step: Callable[[str, int, float], None] | None = None, **options: Any) -> TrainResult:
    """Train (or resume) the tiny teacher in `out`; returns where it stopped.

    `config` or keyword `options` (TinyTrainConfig fields). resume: None (fresh; refuses a folder that already
    holds a run unless overwrite), "auto" (continue the run in `out` from its latest checkpoints; starts fresh if
    there is none). minutes: wall-clock limit for this call; at the limit a checkpoint is written and `finished`
    is False (rerun with resume="auto"). device: where the models train (the recipe is the same; numbers differ
    within float noise). install: copy a finished result over the shipped weights. `log`: where it stopped.
    """
    if "batch" in options:  # the name before 0.2
        options["batch_size"] = options.pop("batch")
    cfg = merge_options(TinyTrainConfig, config, options, job="train")  # NaN/inf refused there
    if cfg.minutes is not None and cfg.minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {cfg.minutes}")
    small = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if f.type in (int, "int") and f.name not in ("seed", "warmup") and getattr(cfg, f.name) < 1]
    if small:  # before the VAE stage, not after it; a 0-step run would write an untrained model
        raise UsageError(f"{', '.join(small)}: must be at least 1")
    check_out_dir(cfg.out)
    result = _train(Path(cfg.out), cfg, minutes=cfg.minutes, resume=cfg.resume, overwrite=cfg.overwrite,
                    progress=progress, device=cfg.device, on_step=on_step)
    say = sayer(log)
    if not result.finished:
        say(f"stopped at the time limit in stage {result.stage}, step {result.step} ({result.seconds / 60:.1f} min "
            f"so far); continue with: clear tiny train --out {cfg.out} --resume auto")
        return result
    say(f"done in {result.seconds / 60:.1f} min: {result.weights}")
    if cfg.install and result.weights is not None:
        say(f"installed: {install_weights(result.weights)}")
    return result


def _train(out: Path, cfg: TinyTrainConfig, *, minutes: float | None, resume: str | None, overwrite: bool,
           progress: bool, device: str, on_step: Callable[[str, int, float], None] | None) -> TrainResult:
    """The four stages in order, each resumable from its checkpoints: the VAE (`--vae-*`), the latent cache
    (`--cache-size`), the transformer (`--steps`, `--batch-size`, `--lr`, `--warmup`, `--ema`, `--train-text`),
    the decoder (`--decoder-*`); then the result file. `--minutes` stops any stage with a checkpoint."""
    from clear_cli.devices import resolve_device

    dev = resolve_device(str(device))
    run, prev = _open_run(out, cfg, resume, overwrite)
    torch.set_num_threads(cfg.threads)
    t_start = time.monotonic()
    deadline = t_start + minutes * 60 if minutes else None
    spent = float(prev.get("seconds", 0.0)) if prev else 0.0
    stage = _first_stage(cfg, prev)
    run.clock = lambda: spent + time.monotonic() - t_start

    def save_state(stage_now: str, step: int) -> None:
        run.write_state(stage=stage_now, step=step, config=_recipe(cfg),
                        seconds=run.clock())

    comps = tiny.build_components(seed=cfg.seed)
    for name in tiny.COMPONENT_PREFIXES:
        comps[name].to(dev)
    vae = comps["vae"]
    if stage == "done":
        result = out / RESULT_NAME
        return TrainResult(out, "done", cfg.steps, True, result if result.is_file() else None, spent)
    steps = dict(resume=resume, deadline=deadline, progress=progress, on_step=on_step, save_state=save_state)

    # ---- stage 1: VAE
    vae_final = run.ckpt / "vae_final.safetensors"
    if stage == "vae":
        ok, done = _vae_stage(cfg, run, vae, dev, **steps)
        if not ok:
            return TrainResult(out, "vae", done, False, None, run.clock())
        save_safetensors(vae_final, {k: v.contiguous() for k, v in vae.state_dict().items()})
        stage = "cache"
        save_state(stage, 0)

    from safetensors.torch import load_file

    vae.load_state_dict(load_file(str(vae_final), device=str(dev)))
    vae.eval()

    # ---- stage 2: latent cache + latent statistics
    cache_path = run.ckpt / "latents.safetensors"
    if stage == "cache":
        _cache_stage(cfg, run, vae, dev, cache_path, progress)
        stage = "flux"
        save_state(stage, 0)
    latents, seeds, captions = _read_cache(cache_path, vae, dev)

    # ---- stage 3: the transformer
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**comps)
    trained = trained_modules(pipe, cfg.train_text)
    flux_final = run.ckpt / "flux_final.safetensors"
    if stage != "flux":
        trained.load_state_dict(load_file(str(flux_final), device=str(dev)))
    else:
        finished = _flux_stage(cfg, run, pipe, latents, seeds, captions, dev, resume, deadline, progress, on_step,
                               save_state)
        if not finished[0]:
            return TrainResult(out, "flux", finished[1], False, None, run.clock())
        # clone: T5 ties its input embedding to `shared`, and safetensors refuses shared storage
        save_safetensors(flux_final, {k: v.contiguous().clone() for k, v in trained.state_dict().items()})
        stage = "decoder"
        save_state(stage, 0)

    # ---- stage 4: sharpen the decoder on the frozen encoder's latents (the transformer's latent space stays)
    ok, step = finetune_decoder(vae, cfg, run, dev, **steps)
    if not ok:
        return TrainResult(out, "decoder", step, False, None, run.clock())
    trained.eval()
    vae.eval()
    return _save_result(cfg, run, comps, out, save_state)


def _first_stage(cfg: TinyTrainConfig, prev: dict | None) -> str:
    stage = prev["stage"] if prev else "vae"
    if prev and cfg.steps > prev["config"]["steps"] and stage in ("decoder", "done"):
        # More transformer steps on resume: continue the flux stage from its last checkpoint (the cosine
        # schedule is re-stretched to the new total); the finished decoder stage is reused as it is.
        stage = "flux"
    return stage


def _open_run(out: Path, cfg: TinyTrainConfig, resume: str | None, overwrite: bool) -> tuple["_Run", dict | None]:
    """Check the options and the folder: a fresh run, `--overwrite`, or `--resume auto` with the same recipe."""
    if cfg.res % 16 or cfg.res < 32:
        raise UsageError(f"--res must be a multiple of 16 and at least 32, got {cfg.res}")
    if resume not in (None, "auto"):
        raise UsageError(f"--resume takes 'auto', got {resume!r}")
    out = Path(out)
    run = _Run(out)
    prev = run.state()
    if prev is not None and resume is None:
        if not overwrite:
            raise ClearError(f"{out} already holds a training run",
                             "pass --resume auto to continue it, --overwrite to start again, or another --out")
        remove_owned(out, OWNED)
        prev = None
    if prev is not None:
        saved = prev.get("config", {})
        mine = json.loads(json.dumps(_recipe(cfg)))
        diff = [k for k in mine if k not in ("threads", "steps") and saved.get(k) != mine[k]]
        if mine["steps"] < saved.get("steps", 0):
            diff.append("steps (fewer than the run already has)")
        if diff:
            raise ClearError(f"{out} was trained with other settings ({', '.join(diff)})",
                             "resume with the same options, or start a new run with another --out")
    run.ckpt.mkdir(parents=True, exist_ok=True)
    return run, prev


def _vae_stage(cfg: TinyTrainConfig, run: "_Run", vae, dev: torch.device, **steps: Any) -> tuple[bool, int]:
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def vae_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, mse = vae_loss(vae, _vae_batch(cfg, step).to(dev), cfg.kl_weight, cfg.object_weight)
        return loss, {"mse": mse}

    return _run_stage("vae", run, vae, opt, cfg.vae_steps, cfg.vae_lr, 50, vae_step, cfg, **steps)


def _cache_stage(cfg: TinyTrainConfig, run: "_Run", vae, dev: torch.device, cache_path: Path, progress: bool) -> None:
    """Encode `cache_size` training scenes once; the latent statistics become the VAE's shift and scale."""
    n_lat = cfg.res // 8
    seeds = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 3]).integers(0, scenes.TRAIN_SEEDS, size=cfg.cache_size)
    lat = torch.empty(cfg.cache_size, 16, n_lat, n_lat)
    bar = _progress(cfg.cache_size, 0, "encode", progress)
    with torch.no_grad():
        for i in range(0, cfg.cache_size, 64):
            imgs = scenes.make_batch(seeds[i:i + 64], cfg.res)[0]
            lat[i:i + 64] = vae.encode(_to_chw(imgs).to(dev)).latent_dist.mean.cpu()
            bar.update(len(imgs))
    bar.close()
    shift, std = float(lat.mean()), float(lat.std())
    save_safetensors(cache_path, {"latents": lat, "seeds": torch.from_numpy(seeds.astype(np.int64))},
                     metadata={"shift_factor": repr(shift), "scaling_factor": repr(1.0 / std)})
    run.log(stage="cache", step=cfg.cache_size, shift_factor=shift, scaling_factor=1.0 / std,
            seconds=round(run.clock(), 1))


def _read_cache(cache_path: Path, vae, dev: torch.device) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(scaled latents, scene seeds, captions) of the cache; sets the VAE's shift and scaling factors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(cache_path), "pt") as f:
        meta = f.metadata()
    cache = load_file(str(cache_path))
    shift, scale = float(meta["shift_factor"]), float(meta["scaling_factor"])
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    latents = ((cache["latents"] - shift) * scale).to(dev)
    seeds = cache["seeds"].numpy()
    return latents, seeds, [scenes.caption(scenes.sample_scene(int(s))) for s in seeds]


def _save_result(cfg: TinyTrainConfig, run: "_Run", comps: dict, out: Path, save_state) -> TrainResult:
    for name in tiny.COMPONENT_PREFIXES:
        comps[name].to("cpu")
    seconds = run.clock()
    result = out / RESULT_NAME
    tiny.save_trained(comps, result, metadata={
        "config": json.dumps(_recipe(cfg)), "seconds": f"{seconds:.0f}", "torch": torch.__version__,
        "command": "clear tiny train", "format": "clear-tiny-flux-1",
    })
    save_state("done", cfg.steps)
    return TrainResult(out, "done", cfg.steps, True, result, seconds)


def _flux_stage(cfg, run, pipe, latents, seeds, captions, dev, resume, deadline, progress, on_step, save_state
                ) -> tuple[bool, int]:
    """Flow matching of the transformer (and the text encoders); leaves the EMA weights in them when finished."""
    tr = trained_modules(pipe, cfg.train_text)
    weights = token_weights(object_cover(seeds, cfg.res), cfg.flux_object_weight)
    tr.train()  # the tiny models have no dropout: train/eval only differs in autograd bookkeeping
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in tr.state_dict().items()}

    def flux_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = _rng(cfg, 2, step).integers(0, len(latents), size=cfg.batch_size)
        sel = torch.from_numpy(idx)
        loss = flux_loss(pipe, latents[sel.to(dev)], [captions[i] for i in idx], _torch_gen(cfg, 2, step),
                         tuple(cfg.guidance_range), cfg.train_text, weights[sel].to(dev))
        return loss, {}

    ok, done = _run_stage("flux", run, tr, opt, cfg.steps, cfg.lr, cfg.warmup, flux_step, cfg, resume=resume,
                          deadline=deadline, progress=progress, on_step=on_step, save_state=save_state, ema=ema,
                          log_lr=True)
    if ok:
        tr.load_state_dict(ema)
    return ok, done


def _decoder_batch(cfg: TinyTrainConfig, step: int) -> torch.Tensor:
    seeds = _rng(cfg, 4, step).integers(0, scenes.TRAIN_SEEDS, size=cfg.decoder_batch)
    return _to_chw(scenes.make_batch(seeds, cfg.res)[0])


def finetune_decoder(vae, cfg: TinyTrainConfig, run: "_Run", dev: torch.device, *, resume: str | None,
                     deadline: float | None, progress: bool = True, on_step=None,
                     save_state: Callable[[str, int], None] | None = None) -> tuple[bool, int]:
    """Train only the VAE decoder on full-size scenes from the frozen encoder's latent means."""
    for p in vae.encoder.parameters():
        p.requires_grad_(False)
    vae.train()
    opt = torch.optim.AdamW([p for p in vae.parameters() if p.requires_grad], lr=cfg.decoder_lr, weight_decay=0.0)

    def decoder_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        x = _decoder_batch(cfg, step).to(dev)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        return recon_loss(rec, x, cfg.object_weight), {"mse": float(F.mse_loss(rec, x).detach())}

    ok, done = _run_stage("decoder", run, vae, opt, cfg.decoder_steps, cfg.decoder_lr, 20, decoder_step, cfg,
                          resume=resume, deadline=deadline, progress=progress, on_step=on_step,
                          save_state=save_state)
    if not ok:
        return False, done
    for p in vae.parameters():
        p.requires_grad_(True)
    vae.eval()
    return True, cfg.decoder_steps


def load_flux_checkpoint(components: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Put a run's flux checkpoint (its EMA weights, as they would ship) and that run's VAE into `components`.

    The VAE and its latent statistics come from `vae_final.safetensors` and `latents.safetensors` beside the
    checkpoint, so a run can be checked while it trains (`clear tiny check --model RUN/checkpoints/flux_N...`).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    vae_file, cache_file = path.with_name("vae_final.safetensors"), path.with_name("latents.safetensors")
    if not (vae_file.is_file() and cache_file.is_file()):
        raise UsageError(f"{path} is a training checkpoint, but its run's vae_final.safetensors and "
                         "latents.safetensors are not beside it; check a finished run's tiny_flux.safetensors")
    state = load_file(str(path))
    ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    if not any(k.startswith("transformer.") for k in ema):  # runs from before `train_text`: transformer only
        ema = {f"transformer.{k}": v for k, v in ema.items()}
    components["vae"].load_state_dict(load_file(str(vae_file)))
    with safe_open(str(cache_file), "pt") as f:
        meta = f.metadata()
    components["vae"].register_to_config(shift_factor=float(meta["shift_factor"]),
                                         scaling_factor=float(meta["scaling_factor"]))
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        sub = {k[len(name) + 1:]: v for k, v in ema.items() if k.startswith(name + ".")}
        if sub:
            components[name].load_state_dict(sub)
    return components


def config_from_options(**overrides: Any) -> TinyTrainConfig:
    """A config with the given non-None fields replaced (unknown names are a usage error with a did-you-mean)."""
    if "batch" in overrides:  # the name before 0.2
        overrides["batch_size"] = overrides.pop("batch")
    return merge_options(TinyTrainConfig, None, {k: v for k, v in overrides.items() if v is not None}, job="train")


def install_weights(path: str | Path) -> Path:
    """Copy a trained result over the shipped tiny weights (atomically) after checking that it loads."""
    src = Path(path)
    comps = tiny.build_components(seed=0)
    try:
        tiny.load_trained(comps, src)
    except Exception as e:
        raise ClearError(f"{src} is not a tiny FLUX weight file ({e})", "pass the tiny_flux.safetensors a run wrote")
    return atomic_copy(src, tiny.TINY_WEIGHTS)


def sharpen_decoder(weights: str | Path, out: str | Path, cfg: TinyTrainConfig | None = None, *,
                    minutes: float | None = None, resume: str | None = None, progress: bool = True,
                    device: str | torch.device = "cpu") -> TrainResult:
    """Run only stage 4 (decoder fine-tuning) on an existing tiny weight file; writes out/tiny_flux.safetensors.

    The encoder, the transformer and the text encoders are untouched, so the model draws the same latents.
    """
    from safetensors import safe_open

    from clear_cli.devices import resolve_device

    cfg = cfg or TinyTrainConfig()
    dev = resolve_device(str(device))
    torch.set_num_threads(cfg.threads)
    comps = tiny.build_components(seed=cfg.seed)
    tiny.load_trained(comps, Path(weights))
    with safe_open(str(weights), "pt") as f:
        meta = dict(f.metadata() or {})
    run = _Run(Path(out))
    run.ckpt.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    run.clock = lambda: time.monotonic() - t0
    vae = comps["vae"].to(dev)
    ok, step = finetune_decoder(vae, cfg, run, dev, resume=resume, progress=progress,
                                deadline=t0 + minutes * 60 if minutes else None)
    if not ok:
        return TrainResult(Path(out), "decoder", step, False, None, run.clock())
    vae.to("cpu")
    result = Path(out) / RESULT_NAME
    meta.update(decoder_steps=str(cfg.decoder_steps), decoder_seconds=f"{run.clock():.0f}")
    meta.pop("vae_config", None)
    tiny.save_trained(comps, result, metadata=meta)
    return TrainResult(Path(out), "done", step, True, result, run.clock())
