"""`clear gen --frames N` on a video model (Wan): text-to-video with 3-D CLEAR, one animated WebP per video.

One direct stage at the target size (no SDEdit cascade, no attention weights yet: CLEAR runs zero-shot on Wan);
`--window` is the spatial radius in tokens, `--time-window` the temporal radius in latent frames (0 = the same
frame only). Frames are written as a lossless animated WebP (PIL, offline) under a temporary name, then renamed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clear_cli.errors import UsageError
from clear_cli.files import atomic_path
from clear_cli.flux import VIDEO_MODELS, model_defaults
from clear_cli.logs import Log
from clear_cli.resolution import parse_res

VIDEO_SUFFIX = ".webp"
DEFAULT_WINDOW = 16
DEFAULT_TIME_WINDOW = 4
VIDEO_FPS = 16        # Wan 2.1's frame rate
WAN_SIZE = (832, 480)  # Wan 2.1's 480p (width x height) for models without a built-in default


def is_video_model_name(model: str) -> bool:
    return str(model) in VIDEO_MODELS


def check_video_options(cfg) -> None:
    """Bad combinations of the video options, before any work (UsageError: one line, exit 2)."""
    from clear_cli.flux import BUILTIN_MODELS

    if cfg.time_window is not None and cfg.frames is None:
        raise UsageError("--time-window is the temporal radius of a video: it needs --frames",
                         "pass --frames N (e.g. 9) with a video model such as --model wan-tiny-random")
    if cfg.frames is None:
        if is_video_model_name(cfg.model):
            raise UsageError(f"--model {cfg.model} is a video model: pass --frames N (4k + 1, e.g. 9)", None)
        return
    if str(cfg.model) in BUILTIN_MODELS and not is_video_model_name(cfg.model):
        raise UsageError(f"--frames is for video models; --model {cfg.model} makes images",
                         f"drop --frames, or pass a video model ({', '.join(VIDEO_MODELS)})")
    if cfg.frames < 1 or (cfg.frames - 1) % 4:
        near = max(1, (cfg.frames - 1) // 4 * 4 + 1) if cfg.frames >= 1 else 1
        raise UsageError(f"--frames {cfg.frames} must be 4k + 1 (Wan's VAE keeps frame 1 and groups the rest by 4)",
                         f"e.g. --frames {near} or {near + 4}")
    if cfg.time_window is not None and cfg.time_window < 0:
        raise UsageError(f"--time-window {cfg.time_window} must be >= 0 (0 = the same frame only)", None)
    unsupported = [name for name, on in (
        ("--weights", cfg.weights), ("--down-factor", cfg.down_factor not in (None, 1)), ("--compare", cfg.compare),
        ("--image", cfg.image), ("--mask", cfg.mask), ("--control", cfg.control), ("--kontext", cfg.kontext),
        ("--base", cfg.base), ("--parallel", cfg.parallel != "none"), ("--offload", cfg.offload)) if on]
    if unsupported:
        raise UsageError(f"not with --frames (video) yet: {', '.join(unsupported)}",
                         "video runs zero-shot 3-D CLEAR: --window, --time-window, --res, --steps, --guidance")


def plan_video_outputs(prompts: list[str], cfg, slug: Callable[[str], str]) -> list[tuple[str, int, Path]]:
    """(prompt, seed, path) per video: `<slug>_<seed>.webp` in the --out folder, or --out itself (one .webp)."""
    out = Path(cfg.out).expanduser()
    jobs = [(p, cfg.seed + k) for p in prompts for k in range(cfg.n)]
    if out.suffix.lower() == VIDEO_SUFFIX:
        if len(jobs) != 1:
            raise UsageError(f"--out {out} names one file but {len(jobs)} videos are asked for",
                             "pass a folder with --out")
        return [(jobs[0][0], jobs[0][1], out)]
    if out.suffix and not out.is_dir():
        raise UsageError(f"--out {out}: videos are written as animated WebP", "pass a folder or a .webp file")
    plans = [(p, s, out / f"{slug(p)}_{s}{VIDEO_SUFFIX}") for p, s in jobs]
    if len({p for _, _, p in plans}) != len(plans):
        raise UsageError("two videos would be written to the same file", "pass different prompts or a folder")
    return plans


def sample_video(pipe, prompt: str, *, seed: int, frames: int, width: int, height: int, steps: int,
                 guidance: float) -> np.ndarray:
    """[frames, height, width, 3] floats in [0, 1] from the pipeline as it is (linearized or not)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = pipe(prompt, num_frames=frames, height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance, generator=gen, output_type="np")
    return np.asarray(out.frames[0])


def save_webp(frames: np.ndarray, path: Path, fps: int = VIDEO_FPS) -> Path:
    """A lossless animated WebP of [F, H, W, 3] floats in [0, 1], written atomically."""
    from PIL import Image

    images = [Image.fromarray((np.clip(f, 0, 1) * 255).round().astype(np.uint8)) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="WEBP", save_all=True, append_images=images[1:], lossless=True,
                       duration=round(1000 / fps), loop=0)
    return path


def generate_video(cfg, plans: list[tuple[str, int, Path]], *, say: Log, pipe=None) -> list[dict[str, Any]]:
    """Every video of `cfg` (a GenConfig with `frames`) to its planned (checked) path, sampled with 3-D CLEAR."""
    if cfg.res is not None:
        width, height = parse_res(cfg.res, "--res")
    elif is_video_model_name(cfg.model):
        width = height = model_defaults(cfg.model).base_res
    else:
        width, height = WAN_SIZE
    steps = cfg.steps or model_defaults(cfg.model).steps
    window = DEFAULT_WINDOW if cfg.window is None else cfg.window
    time_window = DEFAULT_TIME_WINDOW if cfg.time_window is None else cfg.time_window
    if pipe is None:
        from clear_cli.models import load_pipeline

        pipe = load_pipeline(cfg.model, device=cfg.device, dtype=cfg.dtype)
    import clear_cli
    from clear_cli.attention.adapters import adapter_for

    adapter = adapter_for(pipe.transformer)
    if adapter is None or not adapter.video:
        raise UsageError(f"--frames is for video models; --model {cfg.model} is a "
                         f"{getattr(adapter, 'family', type(pipe.transformer).__name__)} image model",
                         "drop --frames, or pass a video model")
    say(f"plan: {len(plans)} video(s), {cfg.frames} frames at {width}x{height}, window {window}, time_window "
        f"{time_window}, {steps} steps, model {cfg.model}")
    clear_cli.linearize(pipe, window=window, time_window=time_window, backend=cfg.backend)
    written = []
    try:
        for prompt, seed, path in plans:
            t0 = time.perf_counter()
            frames = sample_video(pipe, prompt, seed=seed, frames=cfg.frames, width=width, height=height,
                                  steps=steps, guidance=cfg.guidance)
            save_webp(frames, path)
            secs = time.perf_counter() - t0
            say(f"wrote {path} ({len(frames)} frames, {secs:.1f} s)")
            written.append(dict(path=path, prompt=prompt, seed=seed, width=width, height=height, seconds=secs,
                                frames=len(frames)))
    finally:
        clear_cli.unlinearize(pipe)
    return written
