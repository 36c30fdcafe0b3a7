"""`clear gen` as a Python function: linearized text-to-image up to 8K (DESIGN.md §5).

    import clear_cli
    outs = clear_cli.generate("a blue plane", res="4k", weights="Huage001/CLEAR:clear_local_16.safetensors")

Above the base resolution (default) the image is made by a cascade, the authors' protocol:
1. base: about `base_res`^2 pixels with the target's aspect ratio, the original model (full attention, stock RoPE);
2. refine stages, x`upscale` each, the last landing on the target: decode, resize, encode, noise to the start
   sigma, denoise with the CLEAR model, RoPE NTK (theta x `ntk_factor`, default 10 as the authors), proportional
   attention, VAE tiling above 1024^2.

`compare=True` reruns the refinement stages (from the same base image and the same noise) with the original model:
original weights, full attention, the same NTK RoPE (no proportional scale: stock attention has none), and writes
`<name>_full.png` and `<name>_compare.png` (left CLEAR, right full) with PSNR/SSIM in its text chunks.

The stage plan (sizes, sigma schedules, the scheduler shift that keeps every stage's start sigma near its strength)
is `clear_cli.sampling.plan`; running it on the pipeline is `clear_cli.sampling.runner.StageRunner`.

The tiny model (`model="tiny"`/`"tiny-random"`) runs the same code with sizes scaled down: it was trained at
`flux.TINY_BASE_RES` px, which is its base (and default) resolution; its step defaults are `flux.TINY_DEFAULTS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clear_cli.config import check_finite, doc
from clear_cli.errors import UsageError
from clear_cli.files import OutLock, check_out_dir, save_png
from clear_cli.flux import DEFAULT_MODEL, PIXELS_PER_TOKEN, default_text, model_defaults
from clear_cli.logs import Log, sayer, warner
from clear_cli.resolution import parse_res
from clear_cli.sampling.plan import Stage, check_target, plan_stages
from clear_cli.sampling.runner import StageRunner


@dataclass
class GenConfig:
    """Everything `clear gen` takes besides the prompts (CLI options map 1:1)."""

    out: str = doc("outputs", "output folder, or a .png file for a single image")
    res: str | None = doc(None, "target size: 1k|2k|4k|8k, WxH or one number (default: the base resolution)")
    window: int | None = doc(None, "CLEAR window radius in tokens (default: from the weights, else 16)")
    down_factor: int | None = doc(None, "down-sampling factor f (default: from the weights, else 1)")
    weights: str | None = doc(None, "attention weights: file, LoRA, published checkpoint, or REPO:FILE on the hub")
    force: bool = doc(False, "run even when --window/--down-factor clash with the weights")
    base: str | None = doc(None, "model the weights were trained from when --model is another (a derivative): "
                                 "applied as a delta (weights minus base) onto --model's own projections")
    model: str = doc(DEFAULT_MODEL, "hub id, local diffusers dir, tiny or tiny-random")
    steps: int | None = doc(None, f"denoising steps of the base (or direct) stage (default {default_text('steps')})")
    refine_steps: int | None = doc(None, "schedule length of refinement stages; each runs round(steps*strength) "
                                         f"(default {default_text('refine_steps', flux='20 as the authors')})")
    guidance: float = doc(3.5, "guidance of the base (or direct) stage")
    refine_guidance: float = doc(7.5, "guidance of refinement stages (the authors' 7.5)")
    seed: int = doc(0, "seed of the first image; image k of a prompt uses seed + k")
    num_images: int = doc(1, "images per prompt")
    base_res: str | None = doc(None, "base resolution of the cascade, about its square "
                                     f"(default {default_text('base_res', flux='1k')})")
    upscale: int = doc(2, "upscale factor per refinement stage (the last stage lands on the target)")
    strength: float = doc(0.7, "SDEdit strength of refinement stages (share of the schedule rerun)")
    ntk_factor: float | None = doc(None, "RoPE NTK factor above the base resolution (default 10; 1 = off)")
    cascade: bool = doc(True, "cascade above the base resolution (False: sample directly at the target)")
    compare: bool = doc(False, "also run full attention with the same seed; write both side by side + PSNR/SSIM")
    offload: bool = doc(False, "diffusers' model CPU offload (FLUX on smaller GPUs; needs CUDA)")
    device: str = doc("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = doc("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    overwrite: bool = doc(False, "replace existing output files")
    backend: str = doc("auto", "CLEAR attention backend: auto, reference, tiled, flex or triton")
    compile: str = doc("auto", "torch.compile of the FLUX blocks: auto (CUDA, from 2K up), on or off")
    parallel: str = doc("none", "none, patch (one image's token rows split over processes) or data (prompts split); "
                                "needs torchrun / accelerate launch")  # parallel (issue 11)


@dataclass
class GenOutput:
    """One written image and what made it."""

    path: Path
    prompt: str
    seed: int
    width: int
    height: int
    seconds: float
    stages: list[dict[str, Any]] = field(default_factory=list)
    full_path: Path | None = None
    compare_path: Path | None = None
    full_seconds: float | None = None  # the full-attention run of --compare (its refinement stages)
    psnr: float | None = None
    ssim: float | None = None


# ------------------------------------------------------------------------------------------- parsing

def slug(prompt: str, max_len: int = 48) -> str:
    """A file-name-safe short form of a prompt: `a blue plane!` -> `a-blue-plane`."""
    words = re.findall(r"[a-z0-9]+", prompt.lower())
    out = "-".join(words)[:max_len].strip("-")
    return out or "image"


def read_prompts(prompts: Sequence[str], prompts_file: str | os.PathLike | None = None) -> list[str]:
    """Prompts from arguments and a file (one per line; blank lines and #comments skipped); none may be empty."""
    out = []
    for p in prompts:
        if not str(p).strip():
            raise UsageError("a prompt is empty", 'pass text, e.g. clear gen "a blue plane"')
        out.append(str(p).strip())
    if prompts_file is not None:
        path = Path(prompts_file).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read --prompts {path}: {type(e).__name__}",
                             "pass a UTF-8 text file with one prompt per line") from e
        out += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not out:
            raise UsageError(f"--prompts {path} holds no prompts", "write one prompt per line")
    if not out:
        raise UsageError("no prompt given", 'e.g. clear gen "a blue plane", or --prompts FILE')
    return out


# ------------------------------------------------------------------------------------------- outputs

def plan_outputs(prompts: list[str], cfg: GenConfig) -> list[tuple[str, int, Path]]:
    """(prompt, seed, path) for every image, in order; names are `<slug>_<seed>.png` in the output folder."""
    out = Path(cfg.out).expanduser()
    jobs = [(p, cfg.seed + k) for p in prompts for k in range(cfg.num_images)]
    if out.suffix.lower() == ".png":
        if len(jobs) != 1:
            raise UsageError(f"--out {out} names one file but {len(jobs)} images are asked for",
                             "pass a folder with --out")
        return [(jobs[0][0], jobs[0][1], out)]
    if out.suffix and out.suffix.lower() != ".png" and not out.is_dir():
        raise UsageError(f"--out {out}: images are written as PNG", "pass a folder or a .png file")
    plans, seen = [], {}
    for i, (p, s) in enumerate(jobs):
        name = f"{slug(p)}_{s}"
        if name in seen and seen[name] != p:
            name = f"{name}_{i}"
        seen[name] = p
        plans.append((p, s, out / f"{name}.png"))
    return plans


def _companions(path: Path) -> tuple[Path, Path]:
    return path.with_name(path.stem + "_full.png"), path.with_name(path.stem + "_compare.png")


def check_outputs(plans: list[tuple[str, int, Path]], *, compare: bool, overwrite: bool) -> None:
    """Refuse before any work when an output exists (unless overwrite) or two images would share a name."""
    paths: list[Path] = []
    for _, _, p in plans:
        paths.append(p)
        if compare:
            paths.extend(_companions(p))
    if len(set(paths)) != len(paths):
        raise UsageError("two images would be written to the same file", "pass different prompts or a folder")
    if overwrite:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        more = f" (+{len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"{existing[0]} already exists{more}", "pass --overwrite to replace it, or another --out")


def side_by_side(left, right):
    from PIL import Image

    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


# ------------------------------------------------------------------------------------------- running

def _validate(cfg: GenConfig) -> None:
    check_finite(cfg)
    checks = [
        (cfg.window is not None and cfg.window < 1, f"--window {cfg.window} must be at least 1 (radius in tokens)",
         "e.g. --window 16"),
        (cfg.down_factor is not None and cfg.down_factor < 1, f"--down-factor {cfg.down_factor} must be at least 1",
         "1 (no pooling) or 4"),
        (cfg.steps is not None and cfg.steps < 1, f"--steps {cfg.steps} must be at least 1", None),
        (cfg.refine_steps is not None and cfg.refine_steps < 1, f"--refine-steps {cfg.refine_steps} must be >= 1",
         None),
        (cfg.num_images < 1, f"--num-images {cfg.num_images} must be at least 1", None),
        (not 0 < cfg.strength <= 1, f"--strength {cfg.strength} must be in (0, 1]", "the authors use 0.7"),
        (cfg.upscale < 2, f"--upscale {cfg.upscale} must be at least 2", "2 or 4"),
        (cfg.ntk_factor is not None and not cfg.ntk_factor > 0, f"--ntk-factor {cfg.ntk_factor} must be > 0",
         "1 turns NTK scaling off"),
        (cfg.seed < 0, f"--seed {cfg.seed} must be >= 0", None),
        (cfg.base is not None and not cfg.weights, "--base names the model the --weights were trained from",
         "pass --weights too, or drop --base"),
    ]
    for bad, msg, hint in checks:
        if bad:
            raise UsageError(msg, hint)
    from clear_cli.attention import BACKENDS

    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    from clear_cli.models.compile import check_compile

    check_compile(cfg.compile)


def generate(prompts: str | Sequence[str], config: GenConfig | None = None, *, prompts_file: str | None = None,
             pipe=None, log: Log | None = None, progress: bool = True, **options: Any) -> list[GenOutput]:
    """Generate images with CLEAR attention and write them as PNGs; returns what was written.

    `config` or keyword `options` (the GenConfig fields: res, window, weights, model, steps, out, ...).
    `pipe`: an already loaded FluxPipeline for `config.model` (skips loading). `log`: receives progress lines
    (stage sizes, start sigmas, times, FLOPs) and warnings; None keeps quiet and sends warnings to `warnings`.
    """
    try:
        cfg = dataclasses.replace(config or GenConfig(), **options)
    except TypeError as e:
        raise UsageError(f"generate(): {e}") from None
    # --- parallel (issue 11): join the process group, this process's device, one copy of the log ---
    from clear_cli.parallel.launch import start_parallel

    par = start_parallel(cfg.parallel, cfg.device, compare=cfg.compare)
    if par is not None:
        cfg = dataclasses.replace(cfg, device=par.device)
        log, progress = par.main_only(log), progress and par.is_main
    # --- end parallel ---
    say = sayer(log)

    warn = warner(log)

    _validate(cfg)
    plist = read_prompts([prompts] if isinstance(prompts, str) else list(prompts), prompts_file)
    defaults = model_defaults(cfg.model)
    base_res = defaults.base_res if cfg.base_res is None else parse_res(cfg.base_res, "--base-res")[0]
    target = parse_res(cfg.res, "--res") if cfg.res is not None else (base_res, base_res)
    steps = cfg.steps or defaults.steps
    refine_steps = cfg.refine_steps or defaults.refine_steps
    plans = plan_outputs(plist, cfg)
    check_outputs(plans, compare=cfg.compare, overwrite=cfg.overwrite)
    check_out_dir(plans[0][2].parent)  # a file in the way, a read-only disk: before the model loads
    from clear_cli.devices import resolve_device, resolve_dtype

    dev = resolve_device(cfg.device)  # bad --device/--dtype/--offload fail here, before any work
    resolve_dtype(cfg.dtype, dev)
    if cfg.offload and dev.type != "cuda":
        raise UsageError("--offload needs a CUDA device", "drop --offload on CPU")
    from clear_cli.attention.kernels import check_backend

    try:
        check_backend(cfg.backend, dev)   # e.g. triton without CUDA
    except ValueError as e:
        raise UsageError(f"--backend: {e}") from None

    from clear_cli.models.weights import load_attention_weights, resolve_geometry

    weights = load_attention_weights(cfg.weights) if cfg.weights else None
    notes: list[str] = []
    window, down = resolve_geometry(weights, cfg.window, cfg.down_factor, force=cfg.force, notes=notes)
    check_target(target, down)
    from clear_cli.models import fit

    fit.check_gen(cfg, dev, target, weights, pipe)  # the weights fit the architecture, the largest stage the device
    for n in notes:
        warn(n)
    if weights is None:
        warn("no --weights: CLEAR runs zero-shot; quality needs distilled weights (clear distill, or a published "
             "checkpoint such as --weights Huage001/CLEAR:clear_local_16.safetensors)")
    else:
        from clear_cli.models.rebase import for_model

        weights = for_model(weights, cfg.model, cfg.base, warn=warn)  # another base: refused, or a delta (--base)
        say(f"weights: {weights.describe()}")

    from clear_cli import __version__
    from clear_cli.models import load_pipeline, text_len

    if pipe is None:
        if cfg.offload:
            pipe = load_pipeline(cfg.model, device=None, dtype=resolve_dtype(cfg.dtype, dev))
            pipe.enable_model_cpu_offload(device=dev)
        else:
            pipe = load_pipeline(cfg.model, device=dev, dtype=cfg.dtype)
    train_res = defaults.base_res
    train_seq_len = (train_res // PIXELS_PER_TOKEN) ** 2 + text_len(pipe)
    stages = plan_stages(target, pipe.scheduler.config, base_res=base_res, train_res=train_res, upscale=cfg.upscale,
                         strength=cfg.strength, steps=steps, refine_steps=refine_steps, guidance=cfg.guidance,
                         refine_guidance=cfg.refine_guidance, cascade=cfg.cascade, ntk_factor=cfg.ntk_factor,
                         down_factor=down)
    plan_txt = " -> ".join(f"{s.width}x{s.height}" for s in stages)
    say(f"plan: {plan_txt} ({'cascade' if len(stages) > 1 else 'direct'}), window {window}, down_factor {down}, "
        f"model {cfg.model} on {pipe._execution_device} {str(pipe.transformer.dtype).replace('torch.', '')}")
    if par is None:
        runner = StageRunner(pipe, window, down, cfg.backend, weights, train_seq_len)
    else:  # parallel (issue 11)
        from clear_cli.parallel.generation import make_runner

        runner = make_runner(par, pipe, window, down, cfg.backend, weights, train_seq_len)
    w, h = target
    base_info = {
        "model": cfg.model, "window": window, "down_factor": down,
        "weights": weights.source if weights else "none (zero-shot)",
        "weights_sha256": weights.sha256 if weights else "",
        "weights_base": cfg.base,
        "steps": steps, "refine_steps": refine_steps if len(stages) > 1 else None, "guidance": cfg.guidance,
        "refine_guidance": cfg.refine_guidance if len(stages) > 1 else None,
        "strength": cfg.strength if len(stages) > 1 else None, "size": f"{w}x{h}", "software": f"clear-dit {__version__}",
    }
    from clear_cli.models.compile import compiled, describe

    try:
        # patch parallelism exchanges halos inside attention: compiled only on request
        mode = "off" if cfg.parallel == "patch" and cfg.compile == "auto" else cfg.compile
        with compiled(pipe, mode, warn=warn) as compile_state, \
                (OutLock(plans[0][2].parent, "gen") if par is None or par.is_main else contextlib.nullcontext()):
            if compile_state is not None:
                say(describe(compile_state))
            if par is None:
                results = _run_all(runner, plans, stages, cfg, base_info, target, progress, say)
            else:  # parallel (issue 11)
                from clear_cli.parallel.generation import run_images

                results = run_images(par, _run_all, runner, plans, stages, cfg, base_info, target, progress, say)
    finally:
        runner.restore()
        if hasattr(pipe, "maybe_free_model_hooks"):
            pipe.maybe_free_model_hooks()
    return results


def _run_all(runner: StageRunner, plans, stages: list[Stage], cfg: GenConfig, base_info: dict, target: tuple[int, int],
             progress: bool, say: Log) -> list[GenOutput]:
    w, h = target
    results: list[GenOutput] = []
    embeds_cache: dict[str, Any] = {}
    for i, (prompt, seed, path) in enumerate(plans):
        say(f"[{i + 1}/{len(plans)}] {prompt!r} seed {seed} -> {path}")
        if prompt not in embeds_cache:
            embeds_cache = {prompt: runner.encode_prompt(prompt)}  # one prompt's embeddings at a time
        embeds = embeds_cache[prompt]
        t0 = time.perf_counter()
        latents, records, first = runner.run_stages(stages, prompt, seed, embeds, attention_override=None,
                                                    progress=progress, log=say)
        # The cascade's base stage is full attention already: the comparison run starts from its output.
        base_latents = first if cfg.compare and len(stages) > 1 else None
        image = runner.to_pil(latents, w, h)
        runner.sync()
        seconds = time.perf_counter() - t0
        info = {"prompt": prompt, "seed": seed, "attention": "clear", **base_info,
                "stages": [{k: r[k] for k in ("kind", "width", "height", "attention", "start_sigma", "steps",
                                              "seconds")} for r in records]}
        info = {k: v for k, v in info.items() if v is not None}
        out = GenOutput(path=path, prompt=prompt, seed=seed, width=w, height=h, seconds=seconds, stages=records)
        save_png(image, path, info)
        say(f"  wrote {path} ({w}x{h}, {seconds:.1f} s)")
        if cfg.compare:
            from clear_cli.metrics.pixel import image_psnr, image_ssim

            t1 = time.perf_counter()
            full_latents, full_records, _ = runner.run_stages(
                stages, prompt, seed, embeds, attention_override="full", start_latents=base_latents,
                progress=progress, log=say, tag="full ")
            full_image = runner.to_pil(full_latents, w, h)
            runner.sync()
            full_s = out.full_seconds = time.perf_counter() - t1
            out.full_path, out.compare_path = _companions(path)
            out.psnr, out.ssim = image_psnr(image, full_image), image_ssim(image, full_image)
            finfo = {**info, "attention": "full", "stages": [{k: r[k] for k in ("kind", "width", "height",
                     "attention", "start_sigma", "steps", "seconds")} for r in full_records]}
            save_png(full_image, out.full_path, finfo)
            save_png(side_by_side(image, full_image), out.compare_path,
                     {**info, "layout": "left: CLEAR, right: full attention", "psnr_db": round(out.psnr, 3),
                      "ssim": round(out.ssim, 5)})
            say(f"  compare: CLEAR vs full attention PSNR {out.psnr:.2f} dB, SSIM {out.ssim:.4f} "
                f"(full attention run {full_s:.1f} s) -> {out.compare_path}")
        results.append(out)
    return results



