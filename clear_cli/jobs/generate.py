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

from clear_cli.config import doc, merge_options
from clear_cli.devices import is_main_process
from clear_cli.errors import UsageError
from clear_cli.files import OutLock, check_out_dir, save_png
from clear_cli.flux import DEFAULT_MODEL, PIXELS_PER_TOKEN, default_text, model_defaults
from clear_cli.logs import Log, sayer, warner
from clear_cli.resolution import parse_res
from clear_cli.sampling.plan import Stage, check_target, plan_stages
from clear_cli.sampling.runner import StageRunner


@dataclass
class GenConfig:
    """Everything `clear gen` takes; each field is the CLI option of the same name (clear_cli/cli/options.py)."""

    prompts: list[str] = doc([], "one or more prompts (quote each)")
    prompts_file: str | None = doc(None, "text file, one prompt per line (after the prompts given directly)")
    out: str = doc("outputs", "output folder, or a .png file for a single image")
    res: str | None = doc(None, "target size: 1k|2k|4k|8k, WxH or one number (default: the base resolution)")
    window: int | None = doc(None, "CLEAR window radius in tokens (default: from the weights, else 16)")
    down_factor: int | None = doc(None, "down-sampling factor f (default: from the weights, else 1)")
    weights: str | None = doc(None, "attention weights: file, LoRA, published checkpoint, or REPO:FILE on the hub")
    force: bool = doc(False, "run even when --window/--down-factor clash with the weights")
    base: str | None = doc(None, "model the weights were trained from when --model is another (a derivative): "
                                 "applied as a delta (weights minus base) onto --model's own projections")
    model: str = doc(DEFAULT_MODEL, "hub id, local diffusers dir, tiny or tiny-random "
                                    "(video: wan-tiny-random, tiny-wan)")
    steps: int | None = doc(None, f"denoising steps of the base (or direct) stage (default {default_text('steps')})")
    refine_steps: int | None = doc(None, "schedule length of refinement stages; each runs round(steps*strength) "
                                         f"(default {default_text('refine_steps', flux='20 as the authors')})")
    guidance: float = doc(3.5, "guidance of the base (or direct) stage")
    refine_guidance: float = doc(7.5, "guidance of refinement stages (the authors' 7.5)")
    seed: int = doc(0, "seed of the first image; image k of a prompt uses seed + k")
    n: int = doc(1, "images per prompt")
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
    image: str | None = doc(None, "input image: the start of img2img (--strength), the picture to inpaint "
                                  "(--mask), or with --kontext a reference image; one direct stage")
    mask: str | None = doc(None, "inpainting mask (white = repaint) for --image; FLUX.1-Fill models use it too")
    control: str | None = doc(None, "ControlNet control image (needs --controlnet)")
    controlnet: str | None = doc(None, "FLUX ControlNet model for --control: hub id or local folder")
    kontext: bool = doc(False, "--image is a Kontext reference (FLUX.1-Kontext models), not an img2img start")
    frames: int | None = doc(None, "video models (Wan): frames per video, 4k + 1 (e.g. 9); writes animated WebP")
    time_window: int | None = doc(None, "video models: CLEAR temporal radius in latent frames (0 = same frame; "
                                        "default 4); needs --frames")


@dataclass
class GenResult:
    """What `generate` wrote: one GenOutput per image (iterate it, or index it, like the list it used to be)."""

    images: list[GenOutput]
    seconds: float
    is_main: bool = True

    def __iter__(self):
        return iter(self.images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


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
    jobs = [(p, cfg.seed + k) for p in prompts for k in range(cfg.n)]
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
    checks = [
        (cfg.window is not None and cfg.window < 1, f"--window {cfg.window} must be at least 1 (radius in tokens)",
         "e.g. --window 16"),
        (cfg.down_factor is not None and cfg.down_factor < 1, f"--down-factor {cfg.down_factor} must be at least 1",
         "1 (no pooling) or 4"),
        (cfg.steps is not None and cfg.steps < 1, f"--steps {cfg.steps} must be at least 1", None),
        (cfg.refine_steps is not None and cfg.refine_steps < 1, f"--refine-steps {cfg.refine_steps} must be >= 1",
         None),
        (cfg.n < 1, f"--n {cfg.n} must be at least 1", None),
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
    from clear_cli.sampling import conditioned

    conditioned.check(conditioning(cfg), parallel=cfg.parallel)
    from clear_cli.attention import BACKENDS

    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    from clear_cli.models.compile import check_compile

    check_compile(cfg.compile)


def generate(config: GenConfig | str | Sequence[str] | None = None, *, log: Log | None = None,
             progress: bool = True, pipe=None, **options: Any) -> GenResult:
    """Generate images with CLEAR attention and write them as PNGs; returns what was written.

    `config` or keyword `options` (the GenConfig fields: prompts, res, window, weights, model, steps, out, ...);
    a prompt or list of prompts in place of `config` is `prompts` (`generate("a cat", res="2k")`).
    `pipe`: an already loaded FluxPipeline for `config.model` (skips loading). `log`: receives progress lines
    (stage sizes, start sigmas, times, FLOPs) and warnings; None keeps quiet and sends warnings to `warnings`.

    The steps, in order: check every input before anything loads (`_check`), the attention weights and their
    geometry (`_weights`), the pipeline (`_load`), the stage plan, then each image (`_run_all`).
    """
    t_start = time.perf_counter()
    if "num_images" in options:  # the name before 0.2
        options["n"] = options.pop("num_images")
    cfg = merge_options(GenConfig, config, options, job="generate", primary="prompts")
    # --- parallel (issue 11): join the process group, this process's device, one copy of the log ---
    from clear_cli.parallel.launch import start_parallel

    par = start_parallel(cfg.parallel, cfg.device, compare=cfg.compare)
    if par is not None:
        cfg = dataclasses.replace(cfg, device=par.device)
        log, progress = par.main_only(log), progress and par.is_main
    # --- end parallel ---
    say, warn = sayer(log), warner(log)
    from clear_cli.jobs.gen_video import check_video_options

    check_video_options(cfg)
    if cfg.frames is not None:   # video (Wan): one direct stage per video, animated WebP
        return _generate_video(cfg, t_start, say, pipe)
    c = _check(cfg)
    weights, window, down = _weights(cfg, c, pipe, say, warn)
    pipe = _load(cfg, c.device, pipe)
    from clear_cli.models import text_len

    train_seq_len = (c.defaults.base_res // PIXELS_PER_TOKEN) ** 2 + text_len(pipe)
    if c.cond_images:   # --image / --mask / --control: the stock pipeline for them, one direct stage
        results = generate_conditioned(pipe, conditioning(cfg), c.cond_images, c.plans, cfg, c.target, window, down,
                                       weights, train_seq_len, c.steps, progress, say, warn)
        return GenResult(images=results, seconds=time.perf_counter() - t_start, is_main=is_main_process())
    stages = plan_stages(c.target, pipe.scheduler.config, base_res=c.base_res, train_res=c.defaults.base_res,
                         upscale=cfg.upscale, strength=cfg.strength, steps=c.steps, refine_steps=c.refine_steps,
                         guidance=cfg.guidance, refine_guidance=cfg.refine_guidance, cascade=cfg.cascade,
                         ntk_factor=cfg.ntk_factor, down_factor=down)
    plan_txt = " -> ".join(f"{s.width}x{s.height}" for s in stages)
    say(f"plan: {plan_txt} ({'cascade' if len(stages) > 1 else 'direct'}), window {window}, down_factor {down}, "
        f"model {cfg.model} on {pipe._execution_device} {str(pipe.transformer.dtype).replace('torch.', '')}")
    if par is None:
        from clear_cli.sampling.qwen_runner import runner_class

        runner = runner_class(pipe)(pipe, window, down, cfg.backend, weights, train_seq_len)
    else:  # parallel (issue 11)
        from clear_cli.models.pipeline import require_family
        from clear_cli.parallel.generation import make_runner

        require_family(pipe, ("flux",), "clear gen --parallel")
        runner = make_runner(par, pipe, window, down, cfg.backend, weights, train_seq_len)
    base_info = _base_info(cfg, c, weights, window, down, stages)
    from clear_cli.models.compile import compiled, describe

    try:
        # patch parallelism exchanges halos inside attention: compiled only on request
        mode = "off" if cfg.parallel == "patch" and cfg.compile == "auto" else cfg.compile
        with compiled(pipe, mode, warn=warn) as compile_state, \
                (OutLock(c.plans[0][2].parent, "gen") if par is None or par.is_main else contextlib.nullcontext()):
            if compile_state is not None:
                say(describe(compile_state))
            if par is None:
                results = _run_all(runner, c.plans, stages, cfg, base_info, c.target, progress, say)
            else:  # parallel (issue 11)
                from clear_cli.parallel.generation import run_images

                results = run_images(par, _run_all, runner, c.plans, stages, cfg, base_info, c.target, progress,
                                     say)
    finally:
        runner.restore()
        if hasattr(pipe, "maybe_free_model_hooks"):
            pipe.maybe_free_model_hooks()
    return GenResult(images=results, seconds=time.perf_counter() - t_start, is_main=is_main_process())


def _generate_video(cfg: GenConfig, t_start: float, say: Log, pipe) -> GenResult:
    from clear_cli.jobs.gen_video import generate_video, plan_video_outputs
    from clear_cli.models.pipeline import check_model_family

    _validate(cfg)
    plist = read_prompts(list(cfg.prompts), cfg.prompts_file)
    check_model_family(cfg.model)
    plans = plan_video_outputs(plist, cfg, slug)
    check_outputs(plans, compare=False, overwrite=cfg.overwrite)
    from clear_cli.attention.kernels import check_backend
    from clear_cli.devices import resolve_device, resolve_dtype

    dev = resolve_device(cfg.device)
    resolve_dtype(cfg.dtype, dev)
    try:
        check_backend(cfg.backend, dev)
    except ValueError as e:
        raise UsageError(f"--backend: {e}") from None
    written = generate_video(cfg, plans, say=say, pipe=pipe)
    outs = [GenOutput(path=w["path"], prompt=w["prompt"], seed=w["seed"], width=w["width"], height=w["height"],
                      seconds=w["seconds"]) for w in written]
    return GenResult(images=outs, seconds=time.perf_counter() - t_start)


@dataclass
class _Checked:
    """What `_check` resolved from the config: sizes, step counts, output files, the device."""

    defaults: Any
    base_res: int
    target: tuple[int, int]
    steps: int
    refine_steps: int
    plans: list[tuple[str, int, Path]]
    device: Any
    cond_images: dict = field(default_factory=dict)  # --image / --mask / --control, read


def _check(cfg: GenConfig) -> _Checked:
    """Every input that can be checked without a model (options, prompts, sizes, outputs, device, backend)."""
    _validate(cfg)
    plist = read_prompts(list(cfg.prompts), cfg.prompts_file)
    from clear_cli.models.pipeline import check_model_family

    check_model_family(cfg.model)   # a family without a model adapter: one line, before any work
    defaults = model_defaults(cfg.model)
    base_res = defaults.base_res if cfg.base_res is None else parse_res(cfg.base_res, "--base-res")[0]
    from clear_cli.sampling.conditioned import target_size

    cond_images = read_conditioning(conditioning(cfg))
    from_input = target_size(conditioning(cfg), cond_images)   # default size: the input image's
    target = (parse_res(cfg.res, "--res") if cfg.res is not None else
              from_input if from_input is not None else (base_res, base_res))
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
    return _Checked(defaults, base_res, target, cfg.steps or defaults.steps,
                    cfg.refine_steps or defaults.refine_steps, plans, dev, cond_images)


def _weights(cfg: GenConfig, c: _Checked, pipe, say: Log, warn: Log):
    """(weights or None, window, down_factor): read, checked against the model and the device, rebased."""
    from clear_cli.models.weights import load_attention_weights, resolve_geometry

    weights = load_attention_weights(cfg.weights) if cfg.weights else None
    notes: list[str] = []
    window, down = resolve_geometry(weights, cfg.window, cfg.down_factor, force=cfg.force, notes=notes)
    check_target(c.target, down)
    from clear_cli.models import fit

    fit.check_gen(cfg, c.device, c.target, weights, pipe)  # the weights fit the architecture, the largest stage
    for n in notes:
        warn(n)
    if weights is None:
        warn("no --weights: CLEAR runs zero-shot; quality needs distilled weights (clear distill, or a published "
             "checkpoint such as --weights Huage001/CLEAR:clear_local_16.safetensors)")
    else:
        from clear_cli.models.rebase import for_model

        weights = for_model(weights, cfg.model, cfg.base, warn=warn)  # another base: refused, or a delta (--base)
        say(f"weights: {weights.describe()}")
    return weights, window, down


def _load(cfg: GenConfig, dev, pipe):
    if pipe is not None:
        return pipe
    from clear_cli.devices import resolve_dtype
    from clear_cli.models import load_pipeline

    if cfg.offload:
        pipe = load_pipeline(cfg.model, device=None, dtype=resolve_dtype(cfg.dtype, dev))
        pipe.enable_model_cpu_offload(device=dev)
        return pipe
    return load_pipeline(cfg.model, device=dev, dtype=cfg.dtype)


def _base_info(cfg: GenConfig, c: _Checked, weights, window: int, down: int, stages: list[Stage]) -> dict:
    """What every PNG records in its text chunks besides its own prompt, seed and stages."""
    from clear_cli import __version__

    cascade = len(stages) > 1
    w, h = c.target
    return {
        "model": cfg.model, "window": window, "down_factor": down,
        "weights": weights.source if weights else "none (zero-shot)",
        "weights_sha256": weights.sha256 if weights else "",
        "weights_base": cfg.base,
        "steps": c.steps, "refine_steps": c.refine_steps if cascade else None, "guidance": cfg.guidance,
        "refine_guidance": cfg.refine_guidance if cascade else None,
        "strength": cfg.strength if cascade else None, "size": f"{w}x{h}", "software": f"clear-dit {__version__}",
    }


# ---------------------------------------------------- --image / --mask / --control (clear_cli.sampling.conditioned)

def conditioning(cfg: GenConfig):
    from clear_cli.sampling.conditioned import Conditioning

    return Conditioning(image=cfg.image, mask=cfg.mask, control=cfg.control, controlnet=cfg.controlnet,
                        kontext=cfg.kontext)


def read_conditioning(cond) -> dict:
    from clear_cli.sampling.conditioned import read_image

    images = {}
    for key, path, mode in (("image", cond.image, "RGB"), ("mask", cond.mask, "L"), ("control", cond.control, "RGB")):
        if path:
            images[key] = read_image(path, f"--{key}", mode)
    return images


def generate_conditioned(pipe, cond, images: dict, plans, cfg: GenConfig, target: tuple[int, int], window: int,
                          down: int, weights, train_seq_len: int, steps: int, progress: bool, say: Log,
                          warn) -> list[GenOutput]:
    """`--image / --mask / --control`: the stock pipeline for those inputs, one direct stage, linearized."""
    import torch

    from clear_cli import __version__
    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.flux import TINY_MODELS
    from clear_cli.models import text_len
    from clear_cli.sampling import conditioned

    from clear_cli.models.pipeline import require_family

    require_family(pipe, ("flux",), "clear gen --image/--mask/--control")
    name = conditioned.choose(cond, pipe.transformer)
    cn = None
    if cond.control:
        cn = conditioned.load_controlnet(cond.controlnet, pipe._execution_device, pipe.transformer.dtype)
    variant = conditioned.build(pipe, name, cn)
    variant.set_progress_bar_config(disable=not progress, leave=False)
    w, h = target
    if cfg.res is not None and cfg.cascade and max(w, h) > model_defaults(cfg.model).base_res:
        warn(f"{name} samples directly at {w}x{h} (no cascade with --image/--mask/--control)")
    tiny = cfg.model in TINY_MODELS or cfg.model == "tiny-random"
    kw = conditioned.call_kwargs(name, images, width=w, height=h, strength=cfg.strength, tiny=tiny)
    runner = StageRunner(variant, window, down, cfg.backend, weights, train_seq_len)
    say(f"plan: {name} at {w}x{h} (direct), window {window}, down_factor {down}, model {cfg.model} on "
        f"{pipe._execution_device} {str(pipe.transformer.dtype).replace('torch.', '')}")
    info_base = {"model": cfg.model, "pipeline": name, "window": window, "down_factor": down,
                 "weights": weights.source if weights else "none (zero-shot)",
                 "weights_sha256": weights.sha256 if weights else "", "weights_base": cfg.base,
                 "image": cond.image, "mask": cond.mask, "control": cond.control, "controlnet": cond.controlnet,
                 "steps": steps, "guidance": cfg.guidance, "size": f"{w}x{h}", "software": f"clear-dit {__version__}"}
    info_base = {k: v for k, v in info_base.items() if v is not None}
    if "Img2Img" in name or "Inpaint" in name:
        info_base["strength"] = cfg.strength

    def draw(prompt: str, seed: int, attention: str):
        runner.use(attention, None, False)   # CLEAR + the student weights, or the original model
        if cn is not None:
            if attention == "clear":
                linearize(cn, window, down, cfg.backend)
            else:
                unlinearize(cn)
        out = variant(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg.guidance,
                      max_sequence_length=text_len(variant), generator=torch.Generator("cpu").manual_seed(seed),
                      **kw)
        return out.images[0]

    from clear_cli.models.compile import compiled, describe

    results: list[GenOutput] = []
    try:
        with compiled(pipe, cfg.compile, warn=warn) as compile_state, \
                (OutLock(plans[0][2].parent, "gen") if is_main_process() else contextlib.nullcontext()):
            # the variant shares the transformer
            if compile_state is not None:
                say(describe(compile_state))
            results = _conditioned_images(draw, runner, plans, cfg, name, w, h, steps, info_base, say)
    finally:
        runner.restore()
        if cn is not None:
            unlinearize(cn)
    return results


def _conditioned_images(draw, runner: StageRunner, plans, cfg: GenConfig, name: str, w: int, h: int, steps: int,
                        info_base: dict, say: Log) -> list[GenOutput]:
    results: list[GenOutput] = []
    for i, (prompt, seed, path) in enumerate(plans):
        say(f"[{i + 1}/{len(plans)}] {prompt!r} seed {seed} -> {path}")
        t0 = time.perf_counter()
        image = draw(prompt, seed, "clear")
        runner.sync()
        seconds = time.perf_counter() - t0
        info = {"prompt": prompt, "seed": seed, "attention": "clear", **info_base}
        save_png(image, path, info)
        out = GenOutput(path=path, prompt=prompt, seed=seed, width=image.width, height=image.height,
                        seconds=seconds, stages=[{"kind": "direct", "pipeline": name, "width": w, "height": h,
                                                  "attention": "clear", "steps": steps, "seconds": seconds}])
        say(f"  wrote {path} ({image.width}x{image.height}, {seconds:.1f} s)")
        if cfg.compare:
            from clear_cli.metrics.pixel import image_psnr, image_ssim

            t1 = time.perf_counter()
            full = draw(prompt, seed, "full")
            out.full_seconds = time.perf_counter() - t1
            out.full_path, out.compare_path = _companions(path)
            out.psnr, out.ssim = image_psnr(image, full), image_ssim(image, full)
            save_png(full, out.full_path, {**info, "attention": "full"})
            save_png(side_by_side(image, full), out.compare_path,
                     {**info, "layout": "left: CLEAR, right: full attention", "psnr_db": round(out.psnr, 3),
                      "ssim": round(out.ssim, 5)})
            say(f"  compare: CLEAR vs full attention PSNR {out.psnr:.2f} dB, SSIM {out.ssim:.4f} -> "
                f"{out.compare_path}")
        results.append(out)
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



