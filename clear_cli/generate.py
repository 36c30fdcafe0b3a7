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

The scheduler shift. FLUX's stock dynamic rule makes mu linear in the token count with no cap (mu 3.2 at 2K,
11.5 at 4K, 44.8 at 8K): an SDEdit stage at strength 0.7 would start at sigma 0.98 at 2K and 1.0 (pure noise,
the base image thrown away) at 4K-8K. Refinement stages therefore use the *base* stage's shift (static), so a stage
at strength s runs round(refine_steps * s) steps of the base resolution's schedule from u = s down, starting at
that schedule's sigma for s (0.88 for s = 0.7 with FLUX at 1024^2; the authors' static shift 3 gives 0.875). Every stage's start
sigma is checked before anything runs. Sampling directly above the base resolution (`cascade=False`) clamps mu at
the scheduler's `max_image_seq_len` for the same reason.

The tiny model (`model="tiny"`/`"tiny-random"`) runs the same code with sizes scaled down: it was trained at
`TINY_BASE_RES` px, which is its base (and default) resolution; steps default to 20 (base) and 8 (refinement).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clear_cli._api import callable_module
from clear_cli.resolution import parse_res
from clear_cli.config import doc
from clear_cli.errors import ClearError, UsageError
from clear_cli.logs import Log, warner

FLUX_BASE_RES = 1024
TINY_BASE_RES = 128  # the size the built-in tiny FLUX trains at (clear_cli/models/tiny.py, docs/tiny.md)
TINY_NAMES = ("tiny", "tiny-random")
DEFAULT_NTK = 10.0  # the authors' factor for every high-resolution stage
START_SIGMA_LIMIT = 0.95  # a refinement stage starting above this has (almost) thrown its input away



@dataclass
class GenConfig:
    """Everything `clear gen` takes besides the prompts (CLI options map 1:1)."""

    out: str = doc("outputs", "output folder, or a .png file for a single image")
    res: str | None = doc(None, "target size: 1k|2k|4k|8k, WxH or one number (default: the base resolution)")
    window: int | None = doc(None, "CLEAR window radius in tokens (default: from the weights, else 16)")
    down_factor: int | None = doc(None, "down-sampling factor f (default: from the weights, else 1)")
    weights: str | None = doc(None, "attention weights: file, LoRA, published checkpoint, or REPO:FILE on the hub")
    force: bool = doc(False, "run even when --window/--down-factor clash with the weights")
    model: str = doc("black-forest-labs/FLUX.1-dev", "hub id, local diffusers dir, tiny or tiny-random")
    steps: int | None = doc(None, "denoising steps of the base (or direct) stage (default 28; tiny 20)")
    refine_steps: int | None = doc(None, "schedule length of refinement stages; each runs round(steps*strength) "
                                         "(default 20 as the authors; tiny 8)")
    guidance: float = doc(3.5, "guidance of the base (or direct) stage")
    refine_guidance: float = doc(7.5, "guidance of refinement stages (the authors' 7.5)")
    seed: int = doc(0, "seed of the first image; image k of a prompt uses seed + k")
    num_images: int = doc(1, "images per prompt")
    base_res: str | None = doc(None, "base resolution of the cascade, about its square (default 1k; tiny 128)")
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
    parallel: str = doc("none", "none, patch (one image's token rows split over processes) or data (prompts split); "
                                "needs torchrun / accelerate launch")  # parallel (issue 11)


@dataclass
class Stage:
    """One sampling stage of the plan (computed without running the model)."""

    index: int
    kind: str  # base | refine | direct
    width: int
    height: int
    attention: str  # full | clear
    sigmas: list[float]
    mu: float | None
    start_sigma: float
    steps: int
    guidance: float
    strength: float | None = None
    stock_start_sigma: float | None = None  # what the stock dynamic shift would start at (refine stages)
    ntk_factor: float | None = None
    proportional: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // 16, self.width // 16

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("sigmas")
        return d


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


def is_tiny(model: str) -> bool:
    return str(model) in TINY_NAMES


def model_defaults(model: str) -> dict[str, int]:
    """Per-model defaults: the base (training) resolution, steps of the base stage and of refinement schedules."""
    if is_tiny(model):
        # 20 steps as the tiny model's own checks sample; refinement kept short so CPU runs stay quick
        return {"base_res": TINY_BASE_RES, "steps": 20, "refine_steps": 8}
    return {"base_res": FLUX_BASE_RES, "steps": 28, "refine_steps": 20}


# ------------------------------------------------------------------------------------------- schedule

_SCHED_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
                       shift=1.0, use_dynamic_shifting=True, time_shift_type="exponential")


def _cfg(config: Any, key: str) -> Any:
    getter = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    v = getter(key, None)
    return _SCHED_DEFAULTS[key] if v is None else v


def stock_mu(tokens: int, config: Any) -> float:
    """FLUX's dynamic-shift mu: linear in the image token count, no cap (diffusers' calculate_shift)."""
    b0, b1 = _cfg(config, "base_image_seq_len"), _cfg(config, "max_image_seq_len")
    s0, s1 = _cfg(config, "base_shift"), _cfg(config, "max_shift")
    m = (s1 - s0) / (b1 - b0)
    return tokens * m + (s0 - m * b0)


def shift_sigma(u: float, mu: float | None, config: Any) -> float:
    """The scheduler's shift of an unshifted sigma `u`: dynamic with `mu`, or the config's static shift."""
    if u <= 0:
        return 0.0
    if mu is None or not _cfg(config, "use_dynamic_shifting"):
        s = float(_cfg(config, "shift"))
        return s * u / (1 + (s - 1) * u)
    if _cfg(config, "time_shift_type") == "linear":
        return mu / (mu + (1 / u - 1))
    if mu > 700:  # exp overflows; the shifted sigma is 1 for any u > 0 here
        return 1.0
    e = math.exp(mu)
    return e / (e + (1 / u - 1))


def _grid_u(n: int) -> list[float]:
    """The stock unshifted schedule: linspace(1, 1/n, n)."""
    return [1.0] if n == 1 else [1.0 - i * (1.0 - 1.0 / n) / (n - 1) for i in range(n)]


def base_size(target: tuple[int, int], base_res: int) -> tuple[int, int]:
    """About base_res^2 pixels with the target's aspect ratio, sides multiples of 16 (at least 16)."""
    w, h = target
    scale = base_res / math.sqrt(w * h)
    return max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16)


def stage_sizes(target: tuple[int, int], base_res: int, upscale: int, cascade: bool = True,
                align: int = 16) -> list[tuple[int, int]]:
    """Sizes of the stages: [target] when sampled directly, else base, base*upscale, ..., target.

    A cascade is used only when the target has more than 1.5x the base's pixels (a slightly larger image is
    sampled directly). Intermediate sizes are multiples of `align` px (16 x down_factor: pooling needs whole
    f x f token patches).
    """
    w, h = target
    if not cascade or w * h <= 1.5 * base_res * base_res:
        return [target]
    bw, bh = base_size(target, base_res)
    sizes = [(bw, bh)]
    f = 1
    while True:
        f *= upscale
        nw, nh = max(align, round(bw * f / align) * align), max(align, round(bh * f / align) * align)
        if nw * nh * 1.5 >= w * h:  # close enough (or past): the last stage lands on the target
            break
        sizes.append((nw, nh))
    sizes.append(target)
    return sizes


def check_target(target: tuple[int, int], down_factor: int) -> int:
    """With down_factor f the CLEAR stages need whole f x f token patches: sides multiples of 16 f px."""
    align = 16 * int(down_factor)
    if down_factor > 1 and (target[0] % align or target[1] % align):
        raise UsageError(f"--res {target[0]}x{target[1]}: with down_factor {down_factor} the sides must be multiples "
                         f"of {align} px (whole {down_factor}x{down_factor} token patches)",
                         f"use e.g. {round(target[0] / align) * align or align}x"
                         f"{round(target[1] / align) * align or align}")
    return align


def plan_stages(target: tuple[int, int], scheduler_config: Any, *, base_res: int, train_res: int,
                upscale: int = 2, strength: float = 0.7, steps: int = 28, refine_steps: int = 20,
                guidance: float = 3.5, refine_guidance: float = 7.5, cascade: bool = True,
                ntk_factor: float | None = None, down_factor: int = 1) -> list[Stage]:
    """The stages, their sigma schedules and start sigmas, without running anything.

    Refinement stages use the base stage's mu (static), never the stock dynamic rule at their own size.
    Raises ClearError if a refinement stage would start at (almost) pure noise, UsageError if the target's
    token grid is not a multiple of `down_factor`.
    """
    align = check_target(target, down_factor)
    sizes = stage_sizes(target, base_res, upscale, cascade, align)
    ntk = DEFAULT_NTK if ntk_factor is None else float(ntk_factor)
    ntk = None if ntk == 1.0 else ntk
    max_tokens = int(_cfg(scheduler_config, "max_image_seq_len"))
    stages: list[Stage] = []

    def high(w: int, h: int) -> bool:  # above the training resolution: NTK + proportional attention
        return w * h > 1.5 * train_res * train_res

    if len(sizes) == 1:
        w, h = sizes[0]
        mu = stock_mu(min((w // 16) * (h // 16), max_tokens), scheduler_config)
        sig = [shift_sigma(u, mu, scheduler_config) for u in _grid_u(steps)]
        stages.append(Stage(0, "direct", w, h, "clear", sig, mu, sig[0], steps, guidance,
                            ntk_factor=ntk if high(w, h) else None, proportional=high(w, h)))
        return stages
    bw, bh = sizes[0]
    mu_base = stock_mu(min((bw // 16) * (bh // 16), max_tokens), scheduler_config)
    sig = [shift_sigma(u, mu_base, scheduler_config) for u in _grid_u(steps)]
    stages.append(Stage(0, "base", bw, bh, "full", sig, mu_base, sig[0], steps, guidance))
    # The tail of a refine_steps schedule from u = strength: round(refine_steps * strength) evenly spaced steps
    # (the stock grid's own tail when it has a point at the strength; 20 steps at 0.7: u = 0.70, 0.65, ..., 0.05).
    n_run = max(1, min(refine_steps, round(refine_steps * strength)))
    grid = [strength * (n_run - i) / n_run for i in range(n_run)]
    for i, (w, h) in enumerate(sizes[1:], start=1):
        sig = [shift_sigma(u, mu_base, scheduler_config) for u in grid]
        stock = shift_sigma(grid[0], stock_mu((w // 16) * (h // 16), scheduler_config), scheduler_config)
        st = Stage(i, "refine", w, h, "clear", sig, mu_base, sig[0], n_run, refine_guidance, strength=strength,
                   stock_start_sigma=stock, ntk_factor=ntk, proportional=True)
        if st.start_sigma > START_SIGMA_LIMIT and strength < 0.9:
            raise ClearError(f"stage {i} ({w}x{h}) would start at sigma {st.start_sigma:.3f} for strength "
                             f"{strength}: (almost) pure noise, the base image would be lost",
                             "the scheduler config's shift is too large for SDEdit; lower --strength")
        stages.append(st)
    return stages


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


def save_png(image, path: Path, info: dict[str, Any]) -> Path:
    """Write a PNG with `info` in text chunks, atomically (temp name in the same folder, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = PngInfo()
    for k, v in info.items():
        meta.add_text(str(k), v if isinstance(v, str) else json.dumps(v))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
        (cfg.num_images < 1, f"--num-images {cfg.num_images} must be at least 1", None),
        (not 0 < cfg.strength <= 1, f"--strength {cfg.strength} must be in (0, 1]", "the authors use 0.7"),
        (cfg.upscale < 2, f"--upscale {cfg.upscale} must be at least 2", "2 or 4"),
        (cfg.ntk_factor is not None and not cfg.ntk_factor > 0, f"--ntk-factor {cfg.ntk_factor} must be > 0",
         "1 turns NTK scaling off"),
        (cfg.seed < 0, f"--seed {cfg.seed} must be >= 0", None),
    ]
    for bad, msg, hint in checks:
        if bad:
            raise UsageError(msg, hint)
    from clear_cli.attention import BACKENDS

    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")


class _Runner:
    """Holds the pipeline and switches it between the original model and the CLEAR model."""

    def __init__(self, pipe, window: int, down_factor: int, backend: str, weights, train_seq_len: int):
        import torch

        self.pipe = pipe
        self.torch = torch
        self.window, self.down_factor, self.backend = window, down_factor, backend
        self.weights = weights
        self.train_seq_len = train_seq_len
        self.student: dict[str, torch.Tensor] | None = None
        self.original: dict[str, torch.Tensor] | None = None
        self.mode: tuple | None = None
        self.vae_tiling = bool(getattr(pipe.vae, "use_tiling", False))
        self.device = pipe._execution_device
        from clear_cli.models import text_len

        self.text_len = text_len(pipe)
        tr = pipe.transformer
        self.d_model = int(tr.config.num_attention_heads * tr.config.attention_head_dim)
        from clear_cli.attention.linearize import attention_modules

        self.n_layers = len(attention_modules(tr))

    # -- model state ---------------------------------------------------------------------------------------
    def use(self, attention: str, ntk: float | None, proportional: bool) -> None:
        """Full attention with the original weights (+ optional NTK RoPE), or CLEAR with the student weights."""
        from clear_cli import linearize, unlinearize
        from clear_cli.models import rope
        from clear_cli.models.weights import POOL_SUFFIX, load_tensors, materialize

        key = (attention, ntk, proportional)
        if self.mode == key:
            return
        tr = self.pipe.transformer
        if attention == "full":
            unlinearize(tr)
            if self.original is not None:
                load_tensors(tr, self.original)
            if ntk is not None:
                rope.scale_rope(tr, ntk)
            else:
                rope.restore_rope(tr)
        else:
            rope.restore_rope(tr)
            try:
                linearize(tr, self.window, self.down_factor, self.backend, proportional_attention=proportional,
                          train_seq_len=self.train_seq_len, ntk_factor=ntk)
            except ValueError as e:
                raise UsageError(str(e)) from e
            if self.weights is not None:
                if self.student is None:  # first time: the transformer holds the base weights now
                    self.student = materialize(tr, self.weights)
                    previous = load_tensors(tr, self.student)
                    # pooling weights live in the CLEAR processors: the original model has none to restore
                    self.original = {k: v for k, v in previous.items() if not k.endswith(POOL_SUFFIX)}
                else:
                    load_tensors(tr, self.student)
        self.mode = key

    def restore(self) -> None:
        """Leave the pipeline as it came: stock attention and RoPE, the base weights."""
        from clear_cli import unlinearize
        from clear_cli.models import rope
        from clear_cli.models.weights import load_tensors

        tr = self.pipe.transformer
        unlinearize(tr)
        rope.restore_rope(tr)
        if self.original is not None:
            load_tensors(tr, self.original)
        if not self.vae_tiling and getattr(self.pipe.vae, "use_tiling", False):
            self.pipe.vae.disable_tiling()
        self.mode = None

    # -- pieces --------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str):
        return self.pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=self.device, num_images_per_prompt=1,
                                       max_sequence_length=self.text_len)

    def noise(self, w: int, h: int, dtype, generator):
        c = self.pipe.transformer.config.in_channels // 4
        return self.pipe.prepare_latents(1, c, h, w, dtype, self.device, generator)

    def decode(self, latents, w: int, h: int):
        pipe = self.pipe
        lat = pipe._unpack_latents(latents, h, w, pipe.vae_scale_factor)
        lat = lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        with self.torch.no_grad():
            return pipe.vae.decode(lat.to(pipe.vae.dtype), return_dict=False)[0]

    def encode_image(self, image, w: int, h: int, dtype):
        import torch.nn.functional as F

        pipe = self.pipe
        x = F.interpolate(image.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(-1, 1).to(device=self.device, dtype=pipe.vae.dtype)
        with self.torch.no_grad():
            lat = pipe.vae.encode(x).latent_dist.mode()
        lat = (lat - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        b, c, lh, lw = lat.shape
        return pipe._pack_latents(lat.to(dtype), b, c, lh, lw)

    def denoise(self, latents, ids, stage: Stage, embeds, generator_desc: str, progress: bool):
        from tqdm.auto import tqdm

        torch = self.torch
        from diffusers import FlowMatchEulerDiscreteScheduler

        prompt_embeds, pooled, text_ids = embeds
        # A scheduler that applies no shift of its own: the planned sigmas are already shifted.
        sched = FlowMatchEulerDiscreteScheduler.from_config(
            self.pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None,
            use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, invert_sigmas=False,
            stochastic_sampling=False)
        sched.set_timesteps(sigmas=stage.sigmas, device=self.device)
        if abs(float(sched.sigmas[0]) - stage.start_sigma) > 1e-4:
            raise ClearError(f"stage {stage.index}: the scheduler starts at sigma {float(sched.sigmas[0]):.4f}, "
                             f"planned {stage.start_sigma:.4f}")
        sched.set_begin_index(0)
        tr = self.pipe.transformer
        guidance = None
        if tr.config.guidance_embeds:
            guidance = torch.full([latents.shape[0]], stage.guidance, device=self.device, dtype=torch.float32)
        bar = tqdm(total=len(sched.timesteps), desc=generator_desc, disable=not progress, leave=False,
                   unit="step", dynamic_ncols=True)
        with torch.no_grad(), bar:
            for t in sched.timesteps:
                timestep = t.expand(latents.shape[0]).to(latents.dtype)
                v = tr(hidden_states=latents, timestep=timestep / 1000, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
                latents = sched.step(v, t, latents, return_dict=False)[0]
                bar.update()
        return latents

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def flops(self, stage: Stage, attention: str) -> tuple[float, float]:
        """(attention FLOPs of the stage as run, the same with full attention): all layers and steps, one image."""
        from clear_cli.attention import attention_flops, count_pairs
        from clear_cli.attention.counting import full_pairs

        grid = stage.grid
        full = attention_flops(full_pairs(grid, self.text_len), self.d_model)
        if attention == "clear":
            run = attention_flops(count_pairs(grid, self.text_len, self.window, self.down_factor), self.d_model)
        else:
            run = full
        k = self.n_layers * stage.steps
        return run * k, full * k

    # -- one image -------------------------------------------------------------------------------------------
    def run_stages(self, stages: list[Stage], prompt: str, seed: int, embeds, *, attention_override: str | None,
                   start_latents=None, progress: bool, log: Log, tag: str = ""):
        """Run `stages` (from the first, or from `start_latents` = output of stages[0]).

        Returns (final latents, per-stage records, the first stage's output latents).
        """
        torch = self.torch
        dtype = self.pipe.transformer.dtype
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = first = None
        records = []
        prev: Stage | None = None
        for st in stages:
            attention = st.attention if attention_override is None or st.kind == "base" else attention_override
            if st.index == 0 and start_latents is not None:
                # same seed: consume the base stage's noise draw so later draws match the first run's
                self.noise(st.width, st.height, dtype, generator)
                latents, prev, first = start_latents, st, start_latents
                continue
            self.use(attention, st.ntk_factor, st.proportional if attention == "clear" else False)
            self.sync()
            t0 = time.perf_counter()
            noise, ids = self.noise(st.width, st.height, dtype, generator)
            if st.kind == "refine":
                assert prev is not None and latents is not None
                if st.width * st.height > 1024 * 1024:
                    self.pipe.vae.enable_tiling()
                image = self.decode(latents, prev.width, prev.height)
                x0 = self.encode_image(image, st.width, st.height, dtype)
                s = st.start_sigma
                latents = (1.0 - s) * x0 + s * noise  # flow matching: x_t = (1 - s) x0 + s noise
            else:
                latents = noise
            n = len(stages)
            desc = f"{tag}stage {st.index + 1}/{n} {st.width}x{st.height}"
            latents = self.denoise(latents, ids, st, embeds, desc, progress)
            if first is None:
                first = latents
            self.sync()
            dt = time.perf_counter() - t0
            run_f, full_f = self.flops(st, attention)
            saved = 0.0 if full_f == 0 else 100.0 * (1 - run_f / full_f)
            h, w = st.grid
            what = "full attention" if attention == "full" else (
                f"CLEAR r={self.window}" + (f" f={self.down_factor}" if self.down_factor > 1 else ""))
            extra = ""
            if st.kind == "refine":
                extra = (f", strength {st.strength:g} (stock dynamic shift would start at "
                         f"{st.stock_start_sigma:.3f})")
            ntk = f", NTK x{st.ntk_factor:g}" if st.ntk_factor else ""
            prop = ", proportional attention" if attention == "clear" and st.proportional else ""
            log(f"  {tag}stage {st.index + 1}/{n} {st.kind:<6} {st.width}x{st.height} ({w}x{h} tokens) {what}{ntk}"
                f"{prop}: start sigma {st.start_sigma:.3f}{extra}, {st.steps} steps, {dt:.1f} s, attention "
                f"{_tflop(run_f)} vs {_tflop(full_f)} full ({saved:.1f}% saved)")
            records.append({**st.to_dict(), "attention": attention, "seconds": round(dt, 3),
                            "attention_tflop": run_f / 1e12, "full_attention_tflop": full_f / 1e12})
            prev = st
        return latents, records, first

    def to_pil(self, latents, w: int, h: int):
        if w * h > 1024 * 1024:
            self.pipe.vae.enable_tiling()
        image = self.decode(latents, w, h)
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]


def _tflop(x: float) -> str:
    return f"{x / 1e12:.3g} TFLOP" if x >= 1e12 else f"{x / 1e9:.3g} GFLOP"


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
    say: Log = log or (lambda _msg: None)

    warn = warner(log)

    _validate(cfg)
    plist = read_prompts([prompts] if isinstance(prompts, str) else list(prompts), prompts_file)
    defaults = model_defaults(cfg.model)
    base_res = defaults["base_res"] if cfg.base_res is None else parse_res(cfg.base_res, "--base-res")[0]
    target = parse_res(cfg.res, "--res") if cfg.res is not None else (base_res, base_res)
    steps = cfg.steps or defaults["steps"]
    refine_steps = cfg.refine_steps or defaults["refine_steps"]
    plans = plan_outputs(plist, cfg)
    check_outputs(plans, compare=cfg.compare, overwrite=cfg.overwrite)
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
    for n in notes:
        warn(n)
    if weights is None:
        warn("no --weights: CLEAR runs zero-shot; quality needs distilled weights (clear distill, or a published "
             "checkpoint such as --weights Huage001/CLEAR:clear_local_16.safetensors)")
    else:
        say(f"weights: {weights.describe()}")
        if weights.base_model and weights.base_model != cfg.model:
            warn(f"the weights were made for {weights.base_model}, the model is {cfg.model}")

    from clear_cli import __version__
    from clear_cli.models import load_pipeline, text_len

    if pipe is None:
        if cfg.offload:
            pipe = load_pipeline(cfg.model, device=None, dtype=resolve_dtype(cfg.dtype, dev))
            pipe.enable_model_cpu_offload(device=dev)
        else:
            pipe = load_pipeline(cfg.model, device=dev, dtype=cfg.dtype)
    train_res = defaults["base_res"]
    train_seq_len = (train_res // 16) ** 2 + text_len(pipe)
    stages = plan_stages(target, pipe.scheduler.config, base_res=base_res, train_res=train_res, upscale=cfg.upscale,
                         strength=cfg.strength, steps=steps, refine_steps=refine_steps, guidance=cfg.guidance,
                         refine_guidance=cfg.refine_guidance, cascade=cfg.cascade, ntk_factor=cfg.ntk_factor,
                         down_factor=down)
    plan_txt = " -> ".join(f"{s.width}x{s.height}" for s in stages)
    say(f"plan: {plan_txt} ({'cascade' if len(stages) > 1 else 'direct'}), window {window}, down_factor {down}, "
        f"model {cfg.model} on {pipe._execution_device} {str(pipe.transformer.dtype).replace('torch.', '')}")
    if par is None:
        runner = _Runner(pipe, window, down, cfg.backend, weights, train_seq_len)
    else:  # parallel (issue 11)
        from clear_cli.parallel.generation import make_runner

        runner = make_runner(par, pipe, window, down, cfg.backend, weights, train_seq_len)
    w, h = target
    base_info = {
        "model": cfg.model, "window": window, "down_factor": down,
        "weights": weights.source if weights else "none (zero-shot)",
        "weights_sha256": weights.sha256 if weights else "",
        "steps": steps, "refine_steps": refine_steps if len(stages) > 1 else None, "guidance": cfg.guidance,
        "refine_guidance": cfg.refine_guidance if len(stages) > 1 else None,
        "strength": cfg.strength if len(stages) > 1 else None, "size": f"{w}x{h}", "software": f"clear-dit {__version__}",
    }
    try:
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


def _run_all(runner: _Runner, plans, stages: list[Stage], cfg: GenConfig, base_info: dict, target: tuple[int, int],
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
            from clear_cli.metrics_basic import psnr, ssim

            t1 = time.perf_counter()
            full_latents, full_records, _ = runner.run_stages(
                stages, prompt, seed, embeds, attention_override="full", start_latents=base_latents,
                progress=progress, log=say, tag="full ")
            full_image = runner.to_pil(full_latents, w, h)
            full_s = time.perf_counter() - t1
            out.full_path, out.compare_path = _companions(path)
            out.psnr, out.ssim = psnr(image, full_image), ssim(image, full_image)
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



callable_module(__name__, "generate")  # clear_cli.generate(...) works even after `import clear_cli.generate`
