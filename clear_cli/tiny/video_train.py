"""Train the tiny Wan teacher on drawn clips (one coloured shape moving in a straight line), seeded, resumable.

Stages (each resumable from its last checkpoint in `out/`), the image teacher's recipe in 3-D:
1. `vae`: AutoencoderKLWan as an autoencoder on 5-frame windows (the first frame alone, then one causal chunk of
   4: both of the Wan VAE's temporal paths) cropped around the moving shape; decodes from the latent mean.
2. `cache`: fixed, seeded clips encoded once to latent means; per-channel mean and std measured on them go to the
   VAE config's `latents_mean` / `latents_std` (what WanPipeline un-normalises with).
3. `wan`: WanTransformer3DModel and the UMT5 encoder together by rectified flow matching in WanPipeline's own
   conventions: latents `(z - mean) / std`, `timestep = 1000 sigma`, velocity target `noise - x0`, UMT5 text at
   the model's length with the pipeline's zero padding; 10% empty captions (classifier-free guidance); tokens a
   shape covers weigh more (it is a few percent of a clip). The EMA ships.

Every batch, crop and noise draw is a function of (seed, stage, step), so `--resume auto` continues exactly as an
uninterrupted run would. Checkpoints are safetensors plus `state.json`; the log is `train_log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from clear_cli.config import doc, merge_options, to_dict
from clear_cli.errors import ClearError, UsageError
from clear_cli.files import atomic_copy, check_out_dir, remove_owned, save_safetensors
from clear_cli.logs import Log, sayer
from clear_cli.models import tiny_wan
from clear_cli.tiny import video_scenes as vs
from clear_cli.tiny.train import TrainResult, _latest_ckpt, _lr_at, _progress, _Run, _run_stage

RESULT_NAME = "tiny_wan.safetensors"
OWNED = ("state.json", "train_log.jsonl", "checkpoints", RESULT_NAME)  # all that --overwrite may delete
STAGES = ("vae", "cache", "wan", "done")
RUN_FIELDS = ("out", "minutes", "resume", "overwrite", "device", "install")  # how a call runs, not the recipe


@dataclass
class TinyWanTrainConfig:
    """`clear tiny video-train`: the recipe of the tiny Wan teacher, then how this call runs (RUN_FIELDS)."""

    seed: int = doc(0, "seed of the model init, the clips, the noise and every batch")
    size: int = doc(64, "frame size of the training clips in pixels (multiple of 8)")
    frames: int = doc(13, "frames per training clip (4k + 1)")
    vae_steps: int = doc(1500, "VAE optimizer steps (600 kept the shape and motion but lost the colour)")
    vae_batch: int = doc(2, "VAE batch (windows of vae_frames frames)")
    vae_frames: int = doc(9, "VAE window in frames: 9 = the first frame + 2 causal chunks (5 never trained chunk 3 on)")
    vae_crop: int = doc(64, "VAE crop in pixels around the shape (64: whole frames; 32 px crops left box artefacts at 64)")
    vae_lr: float = doc(3e-3, "VAE learning rate (AdamW, 30 warmup steps, cosine to 10%)")
    kl_weight: float = doc(1e-6, "KL weight of the VAE (very small: decode from the mean)")
    vae_object_weight: float = doc(4.0, "VAE loss weight of shape pixels vs black (16 flooded the frames)")
    object_weight: float = doc(4.0, "flow-loss weight of tokens the shape covers vs background (the shape is small)")
    cache_size: int = doc(1024, "clips encoded once to latents for the transformer stage")
    steps: int = doc(800, "transformer optimizer steps")
    batch_size: int = doc(32, "transformer batch (clips)")
    lr: float = doc(2e-3, "transformer learning rate (AdamW, warmup then cosine to 10%)")
    warmup: int = doc(50, "transformer warmup steps")
    ema: float = doc(0.995, "EMA decay of the trained weights (the EMA is what ships)")
    drop_text: float = doc(0.1, "share of empty captions in training (for classifier-free guidance)")
    ckpt_every: int = doc(100, "checkpoint every N steps (and at the end of each stage / the time limit)")
    log_every: int = doc(10, "write the mean loss to train_log.jsonl every N steps")
    threads: int = doc(1, "torch CPU threads (1: the machine is shared)")
    out: str = doc("out/tiny-wan", "run folder: checkpoints, train_log.jsonl, the result")
    minutes: float | None = doc(None, "stop (with a checkpoint) after this many minutes")
    resume: str | None = doc(None, "`auto`: continue the run in --out")
    overwrite: bool = doc(False, "delete a previous run in --out and start again")
    device: str = doc("cpu", "cpu (the documented recipe), auto, cuda or cuda:N")
    install: bool = doc(False, "copy the result to the package (the shipped weights)")


def _recipe(cfg: TinyWanTrainConfig) -> dict[str, Any]:
    """What the run records and a resume compares: the config without RUN_FIELDS (`batch_size` under its first
    key `batch`, so runs started before the CLI port resume)."""
    return {("batch" if k == "batch_size" else k): v for k, v in to_dict(cfg).items() if k not in RUN_FIELDS}


def _rng(cfg: TinyWanTrainConfig, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0x3A, stage, step])


def _torch_gen(cfg: TinyWanTrainConfig, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((cfg.seed * 1_000_003 + stage * 7_919 + step + 0x3A0000) % (2**63))


def to_video(clips: np.ndarray) -> torch.Tensor:
    """[B,F,H,W,3] in [0,1] -> [B,3,F,H,W] in [-1,1] (the Wan VAE's layout and range)."""
    return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous() * 2.0 - 1.0


def _fg(x: torch.Tensor) -> torch.Tensor:
    """Shape pixels of a clip in [-1, 1] on black: [B,1,F,H,W] float."""
    return ((x + 1.0).amax(1, keepdim=True) > 0.2).float()


def recon_loss(rec: torch.Tensor, x: torch.Tensor, weight: float) -> torch.Tensor:
    w = 1.0 + (weight - 1.0) * _fg(x)
    w = w / w.mean(dim=(1, 2, 3, 4), keepdim=True)
    return (w * (rec - x) ** 2).mean() + 0.5 * (w * (rec - x).abs()).mean()


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan.decode without its final clamp to [-1, 1], for training: black (-1) sits on the clamp, and
    a decoder that overshoots below it gets no gradient anywhere; it collapsed to all-black in 200 steps."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]  # the decoder's causal cache is filled frame by frame, as in `decode`
        frames.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, 2)


def vae_loss(vae, x: torch.Tensor, kl_weight: float, object_weight: float) -> tuple[torch.Tensor, float]:
    post = vae.encode(x).latent_dist
    rec = decode_unclamped(vae, post.mean)
    loss = recon_loss(rec, x, object_weight) + kl_weight * post.kl().mean() / x[0].numel()
    return loss, float(F.mse_loss(rec, x).detach())


def _vae_batch(cfg: TinyWanTrainConfig, step: int) -> torch.Tensor:
    """`vae_frames`-frame windows of training clips, cropped around the shape's centre in the middle frame."""
    rng = _rng(cfg, 1, step)
    seeds = rng.integers(0, vs.TRAIN_SEEDS, size=cfg.vae_batch)
    clips = [vs.sample_clip(int(s), cfg.frames) for s in seeds]
    video = vs.render(clips, cfg.size, cfg.frames)
    c, hi, out = cfg.vae_crop, cfg.size - cfg.vae_crop, []
    for i, clip in enumerate(clips):
        n = min(cfg.vae_frames, cfg.frames)
        t0 = int(rng.integers(0, cfg.frames - n + 1))
        cx, cy = vs.centers(clip, cfg.frames)[t0 + n // 2] * cfg.size
        jy, jx = rng.integers(-c // 4, c // 4 + 1, size=2)
        y = min(max(int(cy) + int(jy) - c // 2, 0), hi)
        x = min(max(int(cx) + int(jx) - c // 2, 0), hi)
        out.append(video[i, t0:t0 + n, y:y + c, x:x + c])
    return to_video(np.stack(out))


def token_cover(video: torch.Tensor, t_scale: int = 4, s_scale: int = 8) -> torch.Tensor:
    """Share of each latent token's pixels the shape covers: [B, T*h*w] (latent frame 0 is frame 0 alone)."""
    fg = _fg(video)[:, 0]  # [B,F,H,W]
    first = F.avg_pool2d(fg[:, :1], s_scale)  # [B,1,h,w]
    rest = F.avg_pool3d(fg[:, None, 1:], (t_scale, s_scale, s_scale))[:, 0]  # [B,T-1,h,w]
    return torch.cat([first, rest], 1).flatten(1)


def token_weights(cover: torch.Tensor, weight: float) -> torch.Tensor:
    w = 1.0 + (weight - 1.0) * cover
    return w / w.mean(dim=1, keepdim=True)


def encode_text(pipe, captions: list[str], grad: bool = False) -> torch.Tensor:
    """UMT5 embeddings exactly as WanPipeline computes them (zeros past each caption) at the tiny text length."""
    with torch.set_grad_enabled(grad):
        return pipe._get_t5_prompt_embeds(captions, max_sequence_length=tiny_wan.TEXT_LEN,
                                          device=pipe.transformer.device)


def wan_loss(pipe, z: torch.Tensor, captions: list[str], gen: torch.Generator,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """Flow-matching loss on normalised latents z [B,16,T,h,w] in WanPipeline's conventions."""
    emb = encode_text(pipe, captions, grad=True)
    noise = torch.randn(z.shape, generator=gen).to(z.device)  # CPU generator: the run does not depend on the device
    sigma = torch.sigmoid(torch.randn(z.shape[0], generator=gen)).to(z.device)  # logit-normal over (0, 1)
    s = sigma[:, None, None, None, None]
    xt = (1 - s) * z + s * noise
    pred = pipe.transformer(hidden_states=xt, timestep=sigma * 1000.0, encoder_hidden_states=emb,
                            return_dict=False)[0]
    err = ((pred - (noise - z)) ** 2).mean(1).flatten(1)  # [B, tokens]
    return err.mean() if weights is None else (err * weights).mean()


def trained_modules(pipe) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({"transformer": pipe.transformer, "text_encoder": pipe.text_encoder})


def _check_cfg(cfg: TinyWanTrainConfig) -> None:
    if cfg.size % 8 or cfg.size < 32:
        raise UsageError(f"--size must be a multiple of 8 and at least 32, got {cfg.size}")
    if cfg.frames % 4 != 1 or cfg.frames < 5:
        raise UsageError(f"--frames must be 4k + 1 and at least 5 (the Wan VAE compresses time by 4), got {cfg.frames}")
    if cfg.vae_frames % 4 != 1:
        raise UsageError(f"vae_frames must be 4k + 1, got {cfg.vae_frames}")
    if cfg.vae_crop > cfg.size or cfg.vae_crop % 8:
        raise UsageError(f"vae_crop must be a multiple of 8 and at most --size, got {cfg.vae_crop}")


def _cache_stage(cfg: TinyWanTrainConfig, run: _Run, vae, dev: torch.device, cache_path: Path, progress: bool) -> None:
    """Encode the fixed training clips once; store latents, token covers and per-channel latent statistics."""
    seeds = np.random.default_rng([cfg.seed & 0xFFFFFFFF, 0x3A, 3]).integers(0, vs.TRAIN_SEEDS, size=cfg.cache_size)
    n_t, n_s = (cfg.frames - 1) // 4 + 1, cfg.size // 8
    lat = torch.empty(cfg.cache_size, 16, n_t, n_s, n_s)
    cover = torch.empty(cfg.cache_size, n_t * n_s * n_s)
    bar = _progress(cfg.cache_size, 0, "encode", progress)
    with torch.no_grad():
        for i in range(0, cfg.cache_size, 16):
            video = to_video(vs.make_batch(seeds[i:i + 16], cfg.size, cfg.frames)[0])
            lat[i:i + 16] = vae.encode(video.to(dev)).latent_dist.mean.cpu()
            cover[i:i + 16] = token_cover(video)
            bar.update(len(video))
    bar.close()
    mean = lat.mean(dim=(0, 2, 3, 4))
    std = lat.std(dim=(0, 2, 3, 4))
    save_safetensors(cache_path, {"latents": lat, "cover": cover, "seeds": torch.from_numpy(seeds.astype(np.int64))},
                     metadata={"latents_mean": json.dumps(mean.tolist()), "latents_std": json.dumps(std.tolist())})
    run.log(stage="cache", step=cfg.cache_size, latent_std_mean=float(std.mean()), seconds=round(run.clock(), 1))


def _wan_stage(cfg, run, pipe, tr, latents, weights, captions, dev, resume, deadline, progress, on_step,
               save_state) -> tuple[bool, int, dict[str, torch.Tensor]]:
    """Flow matching of the transformer and UMT5 (the shared stage loop); returns (finished, step, EMA)."""
    tr.train()
    opt = torch.optim.AdamW(tr.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in tr.state_dict().items()}

    def wan_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = _rng(cfg, 2, step)
        idx = rng.integers(0, len(latents), size=cfg.batch_size)
        drop = rng.random(cfg.batch_size) < cfg.drop_text
        caps = ["" if d else captions[i] for i, d in zip(idx, drop)]
        sel = torch.from_numpy(idx)
        return wan_loss(pipe, latents[sel.to(dev)], caps, _torch_gen(cfg, 2, step), weights[sel].to(dev)), {}

    ok, done = _run_stage("wan", run, tr, opt, cfg.steps, cfg.lr, cfg.warmup, wan_step, cfg, resume=resume,
                          deadline=deadline, progress=progress, on_step=on_step, save_state=save_state, ema=ema,
                          log_lr=True)
    return ok, done, ema


def _vae_stage(cfg, run, vae, dev, resume, deadline, progress, on_step, save_state) -> tuple[bool, int]:
    """The VAE as an autoencoder on clip windows (the shared stage loop)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def vae_step(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, mse = vae_loss(vae, _vae_batch(cfg, step).to(dev), cfg.kl_weight, cfg.vae_object_weight)
        return loss, {"mse": mse}

    return _run_stage("vae", run, vae, opt, cfg.vae_steps, cfg.vae_lr, 30, vae_step, cfg, resume=resume,
                      deadline=deadline, progress=progress, on_step=on_step, save_state=save_state)


def _save_result(comps: dict[str, Any], tr: torch.nn.Module, cfg: TinyWanTrainConfig, out: Path,
                 seconds: float) -> Path:
    """The finished run's one weight file (the EMA weights), with the recipe and the time in its metadata."""
    tr.eval()
    for name in tiny_wan.COMPONENT_PREFIXES:
        comps[name].to("cpu")
    result = out / RESULT_NAME
    tiny_wan.save_trained(comps, result, metadata={
        "config": json.dumps(_recipe(cfg)), "seconds": f"{seconds:.0f}", "torch": torch.__version__,
        "command": "clear tiny video-train", "format": "clear-tiny-wan-1",
    })
    return result


def _open_run(run: _Run, cfg: TinyWanTrainConfig, resume: str | None, overwrite: bool) -> dict[str, Any] | None:
    """The previous state of the run folder to continue (None: start afresh); refuses what cannot continue."""
    _check_cfg(cfg)
    if resume not in (None, "auto"):
        raise UsageError(f"--resume takes 'auto', got {resume!r}")
    prev = run.state()
    if prev is not None and resume is None:
        if not overwrite:
            raise ClearError(f"{run.out} already holds a training run",
                             "pass --resume auto to continue it, --overwrite to start again, or another --out")
        remove_owned(run.out, OWNED)
        prev = None
    if prev is not None:
        saved, mine = prev.get("config", {}), json.loads(json.dumps(_recipe(cfg)))
        diff = [k for k in mine if k != "threads" and saved.get(k) != mine[k]]
        if diff:
            raise ClearError(f"{run.out} was trained with other settings ({', '.join(diff)})",
                             "resume with the same options, or start a new run with another --out")
    return prev


def train(config: TinyWanTrainConfig | None = None, *, log: Log | None = None, progress: bool = True,
          on_step: Callable[[str, int, float], None] | None = None, **options: Any) -> TrainResult:
    """Train (or resume) the tiny Wan teacher in `out`; returns where it stopped.

    `config` or keyword `options` (TinyWanTrainConfig fields). resume: None (fresh; refuses a folder that holds a
    run unless overwrite) or "auto" (continue from the latest checkpoints). minutes: wall-clock limit for this
    call; at the limit a checkpoint is written and `finished` is False (rerun with resume="auto"). install: copy
    a finished result over the shipped weights. `log`: where it stopped.
    """
    if "batch" in options:  # the name before the CLI port
        options["batch_size"] = options.pop("batch")
    cfg = merge_options(TinyWanTrainConfig, config, options, job="video_train")  # NaN/inf refused there
    if cfg.minutes is not None and cfg.minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {cfg.minutes}")
    small = [f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
             if f.type in (int, "int") and f.name not in ("seed", "warmup") and getattr(cfg, f.name) < 1]
    if small:  # before the VAE stage, not after it; a 0-step run would write an untrained model
        raise UsageError(f"{', '.join(small)}: must be at least 1")
    check_out_dir(cfg.out)
    result = _train(Path(cfg.out), cfg, progress=progress, on_step=on_step)
    say = sayer(log)
    if not result.finished:
        say(f"stopped at the time limit in stage {result.stage}, step {result.step} ({result.seconds / 60:.1f} min "
            f"so far); continue with: clear tiny video-train --out {cfg.out} --resume auto")
        return result
    say(f"done in {result.seconds / 60:.1f} min: {result.weights}")
    if cfg.install and result.weights is not None:
        say(f"installed: {install_weights(result.weights)}")
    return result


def _train(out: Path, cfg: TinyWanTrainConfig, *, progress: bool,
           on_step: Callable[[str, int, float], None] | None) -> TrainResult:
    """The three stages in order, each resumable from its checkpoints; then the result file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from clear_cli.devices import resolve_device

    dev = resolve_device(str(cfg.device))
    minutes, resume = cfg.minutes, cfg.resume
    run = _Run(out)
    prev = _open_run(run, cfg, resume, cfg.overwrite)
    run.ckpt.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    t_start = time.monotonic()
    deadline = t_start + minutes * 60 if minutes else None
    spent = float(prev.get("seconds", 0.0)) if prev else 0.0
    stage = prev["stage"] if prev else "vae"
    run.clock = lambda: spent + time.monotonic() - t_start

    def save_state(stage_now: str, step: int) -> None:
        run.write_state(stage=stage_now, step=step, config=_recipe(cfg), seconds=run.clock())

    if stage == "done":
        result = out / RESULT_NAME
        return TrainResult(out, "done", cfg.steps, True, result if result.is_file() else None, spent)
    comps = tiny_wan.build_components(seed=cfg.seed)
    for name in tiny_wan.COMPONENT_PREFIXES:
        comps[name].to(dev)
    vae = comps["vae"]

    # ---- stage 1: VAE
    vae_final = run.ckpt / "vae_final.safetensors"
    if stage == "vae":
        ok, done = _vae_stage(cfg, run, vae, dev, resume, deadline, progress, on_step, save_state)
        if not ok:
            return TrainResult(out, "vae", done, False, None, run.clock())
        save_safetensors(vae_final, {k: v.contiguous() for k, v in vae.state_dict().items()})
        stage = "cache"
        save_state(stage, 0)
    vae.load_state_dict(load_file(str(vae_final), device=str(dev)))
    vae.eval()

    # ---- stage 2: latent cache, per-channel latent statistics, token weights
    cache_path = run.ckpt / "latents.safetensors"
    if stage == "cache":
        _cache_stage(cfg, run, vae, dev, cache_path, progress)
        stage = "wan"
        save_state(stage, 0)
    with safe_open(str(cache_path), "pt") as f:
        meta = f.metadata()
    cache = load_file(str(cache_path))
    mean, std = json.loads(meta["latents_mean"]), json.loads(meta["latents_std"])
    vae.register_to_config(latents_mean=mean, latents_std=std)
    m = torch.tensor(mean).view(1, 16, 1, 1, 1)
    sd = torch.tensor(std).view(1, 16, 1, 1, 1)
    latents = ((cache["latents"] - m) / sd).to(dev)
    weights = token_weights(cache["cover"], cfg.object_weight)
    captions = [vs.caption(vs.sample_clip(int(s), cfg.frames)) for s in cache["seeds"].tolist()]

    # ---- stage 3: the transformer and the text encoder
    pipe = tiny_wan.pipeline_class()(**comps)
    tr = trained_modules(pipe)
    ok, done, ema = _wan_stage(cfg, run, pipe, tr, latents, weights, captions, dev, resume, deadline, progress,
                               on_step, save_state)
    if not ok:
        return TrainResult(out, "wan", done, False, None, run.clock())
    tr.load_state_dict(ema)
    seconds = run.clock()
    result = _save_result(comps, tr, cfg, out, seconds)
    save_state("done", cfg.steps)
    return TrainResult(out, "done", cfg.steps, True, result, seconds)


def load_checkpoint(components: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """A run's `checkpoints/wan_N.safetensors` (its EMA weights) into `components`, with the run's VAE and
    latent statistics (found beside it), so a run can be checked while it trains."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    state = load_file(str(path))
    ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
    for name in ("transformer", "text_encoder"):
        components[name].load_state_dict({k[len(name) + 1:]: v for k, v in ema.items() if k.startswith(name + ".")})
    components["vae"].load_state_dict(load_file(str(path.parent / "vae_final.safetensors")))
    with safe_open(str(path.parent / "latents.safetensors"), "pt") as f:
        meta = f.metadata()
    components["vae"].register_to_config(latents_mean=json.loads(meta["latents_mean"]),
                                         latents_std=json.loads(meta["latents_std"]))
    return components


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a run's `checkpoints/wan_N.safetensors` (EMA weights, the run's VAE and latent statistics) as a
    tiny_wan.safetensors, e.g. to ship a run stopped at a time limit."""
    comps = load_checkpoint(tiny_wan.build_components(), path)
    out = Path(out)
    tiny_wan.save_trained(comps, out, metadata={"checkpoint": Path(path).name, "command": "clear tiny video-train",
                                                "format": "clear-tiny-wan-1", "torch": torch.__version__})
    return out


def install_weights(path: str | Path) -> Path:
    """Copy a trained result over the shipped tiny Wan weights (atomically) after checking that it loads."""
    src = Path(path)
    try:
        tiny_wan.load_trained(tiny_wan.build_components(seed=0), src)
    except Exception as e:
        raise ClearError(f"{src} is not a tiny Wan weight file ({e})", "pass the tiny_wan.safetensors a run wrote")
    return atomic_copy(src, tiny_wan.TINY_WAN_WEIGHTS)
