"""`clear eval` as a Python function: a linearized model (one or more students) against its teacher.

    import clear_cli
    result = clear_cli.evaluate(["out/clear_attn.safetensors"], model="tiny", n=16, res="128", out="eval")

Protocol (DESIGN.md §6): the teacher (the model as loaded, full attention) and each student (the same model
linearized with the student file's window / down_factor and weights) draw one image per prompt with the same
seed (seed + prompt index). Images are cached as PNGs under `out/` (`teacher/00000.png`,
`student_<name>/00000.png`, written atomically), so a rerun reuses them and a failure loses nothing. Under
`accelerate launch` each process draws the indices i with i % world == rank; the main process computes the
metrics after a barrier. `cascade=True` instead compares, per student, the CLEAR SDEdit cascade (DESIGN.md §5)
with the same cascade in full attention from the same base image and seed (`cascade_<name>/`).

Result (returned, and written to `out/eval.json`; keys are stable, values null when a metric was not computed):

    schema            "clear-eval/1"
    model, prompts, n, width, height, steps, guidance, seed, device, dtype, mode ("teacher" | "cascade")
    metrics           metrics computed, in order (subset of fid, clip, lpips, ssim, psnr, dino, speed)
    skipped           {metric: why} for metrics left out (a hub network that could not be loaded)
    small_n           true when n < 2048: FID from so few images is biased and noisy (compare runs of equal n only)
    psnr_cap_db       PSNR of identical images is infinite; means use this cap per image
    teacher           {folder, seconds_per_image, attn_tflops_per_image, attn_pairs_per_layer, clip_score, fid_ref}
    students          list, one per student file, in the order given:
        name, file, sha256, window, down_factor, folder,
        fid (vs the teacher's images), fid_ref (vs --ref-images), clip_score (text alignment, 100*cos),
        clip_image (cosine to the teacher image, CLIP), dino (cosine to the teacher image, DINO CLS),
        lpips, ssim, psnr (dB, capped mean), psnr_identical (images equal to the teacher's),
        seconds_per_image, speedup (teacher seconds / student seconds),
        attn_tflops_per_image (all layers and steps), attn_flops_ratio (student / teacher)
    cascade           null, or {width, height, base_width, base_height, students: [{name, ssim, psnr, lpips,
                      psnr_identical, seconds_per_image, full_seconds_per_image, folder}]}
    report, grid      paths (relative to out/) of the HTML report and the PNG grid
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clear_cli.config import doc, merge_options
from clear_cli.errors import UsageError
from clear_cli.files import OutLock, atomic_write_text, save_png
from clear_cli.flux import DEFAULT_MODEL, default_text, is_tiny, model_defaults
from clear_cli.logs import Log, sayer, warner

SCHEMA = "clear-eval/1"
COCO_DEFAULT = "~/.cache/clear/coco/annotations/captions_val2014.json"
COCO_URL = "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"
COCO_SAMPLE = 5000
TINY_PROMPTS = "tiny"  # --prompts tiny: captions of held-out tiny scenes (clear_cli/tiny/__init__.py)
TEACHER_DIR = "teacher"



@dataclass
class EvalConfig:
    """Everything `clear eval` takes; each field is the CLI option of the same name (clear_cli/cli/options.py)."""

    weights: list[str] = doc([], "student attention weights (.safetensors or REPO:FILE); several are compared side "
                                 "by side (r = 8, 16, 32)")
    model: str = doc(DEFAULT_MODEL, "hub id, local diffusers dir, tiny or tiny-random")
    prompts: str | None = doc(None, "coco (5,000 COCO-2014-val captions), tiny (captions of held-out tiny scenes), "
                                    "builtin, or a .txt/.jsonl/.csv file (default: coco; tiny for the tiny models)")
    n: int = doc(5000, "number of prompts (images per model)")
    res: str | None = doc(None, "image size: 1k|2k|WxH|one number (default: the model's base, "
                                f"{default_text('base_res', flux='1k')})")
    steps: int | None = doc(None, f"denoising steps (default {default_text('steps')})")
    guidance: float = doc(3.5, "guidance of the teacher and the students")
    seed: int = doc(0, "seed of prompt 0; prompt i uses seed + i")
    out: str = doc("eval", "output folder: cached images, eval.json, report.html, grid.png")
    metrics: str | None = doc(None, "comma list of fid,clip,lpips,ssim,psnr,dino,speed (default all; hub networks "
                                    "that cannot be loaded are then skipped with a warning)")
    ref_images: str | None = doc(None, "folder of reference images (e.g. COCO val) for FID against real images")
    inception_weights: str | None = doc(None, "FID Inception weights (.safetensors) instead of the download")
    clip_model: str | None = doc(None, "CLIP hub id or local dir (default openai/clip-vit-large-patch14)")
    dino_model: str | None = doc(None, "DINO hub id or local dir (default facebook/dinov2-base)")
    lpips_weights: str | None = doc(None, "LPIPS network (.safetensors) instead of torchvision's download")
    window: int | None = doc(None, "window radius for students whose file does not say it")
    cascade: bool = doc(False, "compare the CLEAR SDEdit cascade with the full-attention cascade at --res")
    coco_captions: str | None = doc(None, f"COCO captions_val2014.json (default {COCO_DEFAULT})")
    device: str = doc("auto", "auto, cpu, cuda or cuda:N (under accelerate: each process's own device)")
    dtype: str = doc("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    backend: str = doc("auto", "CLEAR attention backend: auto, reference, tiled, flex or triton")
    compile: str = doc("auto", "torch.compile of the FLUX blocks: auto (CUDA, from 2K up), on or off")
    batch_size: int = doc(16, "images per batch when computing metrics")
    overwrite: bool = doc(False, "redraw every image (else cached images are reused)")


# ------------------------------------------------------------------------------------------- prompts

def coco_prompts(path: str | None, n: int) -> list[str]:
    """The first n of 5,000 COCO-2014-val captions sampled deterministically (fixed seed, sorted by caption id)."""
    p = Path(path or os.environ.get("CLEAR_COCO_CAPTIONS") or COCO_DEFAULT).expanduser()
    if not p.is_file():
        raise UsageError(f"COCO captions file {p} not found",
                         f"download {COCO_URL}, unzip annotations/captions_val2014.json to "
                         f"{COCO_DEFAULT} or pass --coco-captions PATH")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        anns = sorted(data["annotations"], key=lambda a: int(a["id"]))
        captions = [" ".join(str(a["caption"]).split()) for a in anns]
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{p} is not a COCO captions file ({type(e).__name__}: {e})",
                         "pass annotations/captions_val2014.json from the COCO 2014 annotations") from e
    rng = random.Random(2014)
    picked = rng.sample(captions, min(COCO_SAMPLE, len(captions)))
    if n > len(picked):
        raise UsageError(f"--n {n} is more than the {len(picked)} COCO captions sampled", f"use --n {len(picked)}")
    return picked[:n]


def default_prompts(model: str) -> str:
    """The prompt set a model is evaluated on by default: COCO for FLUX, the tiny model's own held-out scenes."""
    return TINY_PROMPTS if is_tiny(model) else "coco"


def resolve_prompts(source: str, n: int, coco_captions: str | None = None) -> list[str]:
    """n prompts from coco, tiny, builtin or a file (a file with fewer prompts is an error, not a silent cut)."""
    if source == "coco":
        return coco_prompts(coco_captions, n)
    if source == TINY_PROMPTS:
        from clear_cli.tiny.scenes import held_out_prompts

        return held_out_prompts(n)
    from clear_cli.data.prompts import load_prompts

    prompts = load_prompts(source, n=n)
    if len(prompts) < n:
        raise UsageError(f"--prompts {source} holds {len(prompts)} prompts, --n asks for {n}", f"use --n {len(prompts)}")
    return prompts[:n]


# ------------------------------------------------------------------------------------------- caching

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "student"


def image_name(i: int) -> str:
    return f"{i:05d}.png"


def _check_record(path: Path, expected: dict[str, Any], what: str, overwrite: bool) -> None:
    """The settings a cache folder was drawn with must match this run's (else its images are not comparable)."""
    if path.is_file() and not overwrite:
        try:
            have = json.loads(path.read_text())
        except ValueError:
            have = {}
        diff = [k for k in expected if k != "prompts" and have.get(k) != expected[k]]
        if diff:
            k = diff[0]
            raise UsageError(f"{path.parent} holds {what} drawn with {k} {have.get(k)!r}, this run uses "
                             f"{expected[k]!r}", "pass another --out, or --overwrite to redraw")
        old, new = have.get("prompts", []), expected.get("prompts", [])
        m = min(len(old), len(new))
        if old[:m] != new[:m]:
            raise UsageError(f"{path.parent} holds {what} drawn for other prompts",
                             "pass another --out, or --overwrite to redraw")
    record = dict(expected)
    if path.is_file() and not overwrite:
        old = json.loads(path.read_text()).get("prompts", [])
        if len(old) > len(record.get("prompts", [])):
            record["prompts"] = old
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1))


def _record_times(folder: Path, rank: int, times: dict[int, float]) -> None:
    if not times:
        return
    path = folder / f"times_rank{rank}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update({str(k): v for k, v in times.items()})
    atomic_write_text(path, json.dumps(old))


def _read_times(folder: Path, n: int) -> list[float]:
    out: dict[int, float] = {}
    for p in sorted(folder.glob("times_rank*.json")):
        try:
            out.update({int(k): float(v) for k, v in json.loads(p.read_text()).items()})
        except (ValueError, TypeError):
            continue
    return [v for k, v in out.items() if k < n]


# ------------------------------------------------------------------------------------------- students

@dataclass
class Student:
    name: str
    file: Path
    weights: Any
    window: int
    down_factor: int

    @property
    def folder(self) -> str:
        return f"student_{self.name}"


def load_students(files: Sequence[str | os.PathLike], pipe, window: int | None, backend: str,
                  model: str, warn: Log) -> list[Student]:
    """Read every student file and check it fits the model before anything is drawn."""
    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.models.weights import load_attention_weights, materialize, resolve_geometry

    if not files:
        raise UsageError("no student given", "pass --weights FILE (e.g. out/clear_attn.safetensors)")
    students: list[Student] = []
    names: set[str] = set()
    for f in files:
        p = Path(f).expanduser()
        if not p.is_file() and ":" not in str(f):
            raise UsageError(f"student file {f} not found", "pass the .safetensors file that clear distill wrote")
        w = load_attention_weights(str(f))
        notes: list[str] = []
        win, down = resolve_geometry(w, window, None, notes=notes)
        for n_ in notes:
            warn(n_)
        if w.base_model and w.base_model != model:
            warn(f"student {w.path.name} was made for {w.base_model}, the model is {model}")
        tr = pipe.transformer
        try:
            linearize(tr, win, down, backend)
        except ValueError as e:
            raise UsageError(f"student {w.path.name}: {e}") from e
        try:
            materialize(tr, w)  # checks every key and shape against this model
        finally:
            unlinearize(tr)
        name = _slug(w.path.stem)
        base, k = name, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.add(name)
        students.append(Student(name, w.path, w, win, down))
    return students


class _Swap:
    """Context: the pipeline's transformer becomes the student (linearized + its weights), then the teacher again."""

    def __init__(self, pipe, student: Student, backend: str, **linearize_kw: Any):
        self.pipe, self.student, self.backend, self.kw = pipe, student, backend, linearize_kw
        self.previous: dict | None = None

    def __enter__(self):
        from clear_cli.attention.linearize import linearize
        from clear_cli.models.weights import load_tensors, materialize

        tr = self.pipe.transformer
        linearize(tr, self.student.window, self.student.down_factor, self.backend, **self.kw)
        self.previous = load_tensors(tr, materialize(tr, self.student.weights))
        return self

    def __exit__(self, *exc):
        from clear_cli.attention.linearize import unlinearize
        from clear_cli.models.weights import load_tensors

        tr = self.pipe.transformer
        if self.previous is not None:
            load_tensors(tr, self.previous)
        unlinearize(tr)
        return False


# ------------------------------------------------------------------------------------------- drawing

def _draw(pipe, prompts: list[str], indices: list[int], folder: Path, *, width: int, height: int, steps: int,
          guidance: float, seed: int, progress: bool, label: str, overwrite: bool) -> dict[int, float]:
    """Draw the missing images of `indices` into `folder`; returns {index: seconds} of timed draws."""
    import torch
    from clear_cli.logs import progress_bar as tqdm

    from clear_cli.sampling.seeds import draw

    todo = [i for i in indices if overwrite or not (folder / image_name(i)).is_file()]
    times: dict[int, float] = {}
    if not todo:
        return times
    dev = pipe._execution_device
    folder.mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(tqdm(todo, desc=label, disable=not progress, unit="img", dynamic_ncols=True)):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        image = draw(pipe, [i], seed, prompts=prompts, height=height, width=width, num_inference_steps=steps,
                     guidance_scale=guidance)[0]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        if j > 0 or len(todo) == 1:  # the first draw warms up kernels and caches: not a fair time
            times[i] = dt
        save_png(image, folder / image_name(i))
    return times


def _attention_cost(pipe, width: int, height: int, steps: int, window: int | None, down_factor: int = 1
                    ) -> tuple[int, float]:
    """(pairs per layer, attention FLOPs per image over all layers and steps); window None = full attention."""
    from clear_cli.attention import attention_flops, count_pairs
    from clear_cli.attention.counting import full_pairs
    from clear_cli.attention.linearize import attention_modules
    from clear_cli.models import text_len

    tr = pipe.transformer
    patch = int(getattr(pipe, "vae_scale_factor", 8)) * 2
    grid = (height // patch, width // patch)
    t = text_len(pipe)
    d_model = int(tr.config.num_attention_heads * tr.config.attention_head_dim)
    try:
        pairs = full_pairs(grid, t) if window is None else count_pairs(grid, t, window, down_factor)
    except ValueError as e:
        raise UsageError(f"{width}x{height}: {e}") from e
    return pairs, attention_flops(pairs, d_model) * len(attention_modules(tr)) * steps


# ------------------------------------------------------------------------------------------- metrics

def _mean(t) -> float | None:
    return None if t is None or len(t) == 0 else float(t.double().mean())


def _compute(out: Path, n: int, prompts: list[str], students: list[Student], metrics: list[str], nets,
             cfg: EvalConfig, size: tuple[int, int], say: Log, progress: bool) -> tuple[dict, list[dict]]:
    from clear_cli.logs import progress_bar as tqdm

    from clear_cli.metrics import fid_from_features, image_features, mean_psnr, pair_metrics
    from clear_cli.metrics.clip import cosine, text_score

    teacher_paths = [out / TEACHER_DIR / image_name(i) for i in range(n)]
    need_feats = nets.inception is not None or nets.clip is not None or nets.dino is not None
    total = n * (1 + 2 * len(students)) if need_feats else n * len(students)
    bar = tqdm(total=total, desc="metrics", disable=not progress, unit="img", dynamic_ncols=True)
    upd = bar.update
    t_feats = image_features(teacher_paths, nets, cfg.batch_size, upd) if need_feats else {}
    text = nets.clip.text_embeds(prompts) if nets.clip is not None else None
    ref = None
    if cfg.ref_images and nets.inception is not None:
        rdir = Path(cfg.ref_images).expanduser()
        rpaths = sorted(p for p in rdir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        say(f"reference images: {len(rpaths)} from {rdir}")
        ref = image_features(rpaths, nets, cfg.batch_size, size=size)["inception"]
    teacher: dict[str, Any] = {"folder": TEACHER_DIR, "clip_score": None, "fid_ref": None}
    if text is not None:
        teacher["clip_score"] = _mean(text_score(t_feats["clip"], text))
    if ref is not None:
        teacher["fid_ref"] = fid_from_features(t_feats["inception"], ref)
    rows: list[dict] = []
    for st in students:
        paths = [out / st.folder / image_name(i) for i in range(n)]
        row: dict[str, Any] = {k: None for k in ("fid", "fid_ref", "clip_score", "clip_image", "dino", "lpips",
                                                  "ssim", "psnr", "psnr_identical")}
        s_feats = image_features(paths, nets, cfg.batch_size, upd) if need_feats else {}
        pairs = pair_metrics(teacher_paths, paths, metrics, nets, cfg.batch_size, upd)
        if "inception" in s_feats:
            row["fid"] = fid_from_features(t_feats["inception"], s_feats["inception"])
            if ref is not None:
                row["fid_ref"] = fid_from_features(s_feats["inception"], ref)
        if "clip" in s_feats:
            row["clip_score"] = _mean(text_score(s_feats["clip"], text))
            row["clip_image"] = _mean(cosine(t_feats["clip"], s_feats["clip"]))
        if "dino" in s_feats:
            row["dino"] = _mean(cosine(t_feats["dino"], s_feats["dino"]))
        row["lpips"] = _mean(pairs.get("lpips"))
        row["ssim"] = _mean(pairs.get("ssim"))
        if "psnr" in pairs:
            row["psnr"], row["psnr_identical"] = mean_psnr(pairs["psnr"])
        rows.append(row)
    bar.close()
    return teacher, rows


# ------------------------------------------------------------------------------------------- main

def _validate(cfg: EvalConfig) -> None:
    if isinstance(cfg.n, bool) or int(cfg.n) != cfg.n or cfg.n < 1:
        raise UsageError(f"--n {cfg.n} must be at least 1", "e.g. --n 5000 (the authors' protocol) or --n 16")
    if cfg.steps is not None and cfg.steps < 1:
        raise UsageError(f"--steps {cfg.steps} must be at least 1")
    if cfg.seed < 0:
        raise UsageError(f"--seed {cfg.seed} must be >= 0")
    if cfg.batch_size < 1:
        raise UsageError(f"--batch-size {cfg.batch_size} must be at least 1")
    if cfg.window is not None and cfg.window < 1:
        raise UsageError(f"--window {cfg.window} must be at least 1 (radius in tokens)")
    if cfg.ref_images is not None and not Path(cfg.ref_images).expanduser().is_dir():
        raise UsageError(f"--ref-images {cfg.ref_images}: no such folder", "pass a folder of reference images")
    from clear_cli.attention import BACKENDS

    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend {cfg.backend!r} is not one of {', '.join(BACKENDS)}")
    from clear_cli.models.compile import check_compile

    check_compile(cfg.compile)


@dataclass
class EvalResult:
    """What `evaluate` measured: `data` is the eval.json record (module docstring); `result["students"]` etc.
    read it as before. Under `accelerate launch` every process gets one; only the main one has `data`."""

    out: Path
    data: dict = field(default_factory=dict)
    is_main: bool = True

    @property
    def report(self) -> Path | None:
        return self.out / self.data["report"] if "report" in self.data else None

    @property
    def grid(self) -> Path | None:
        return self.out / self.data["grid"] if "grid" in self.data else None

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)


def evaluate(config: EvalConfig | str | Sequence[str | os.PathLike] | None = None, *, log: Log | None = None,
             progress: bool = True, pipe=None, **options: Any) -> EvalResult:
    """Evaluate student attention files against their teacher; returns an EvalResult (module docstring).

    `config` or keyword `options` (EvalConfig fields: weights, model, prompts, n, res, steps, out, metrics, ...);
    a file or list of files in place of `config` is `weights`. `pipe`: an already loaded pipeline for `model`.
    `log`: receives progress lines. Under `accelerate launch` every process draws its share; the main one computes
    the metrics (`is_main`).
    """
    if "students" in options:  # the keyword of the first argument before 0.2
        options["weights"] = options.pop("students")
    cfg = merge_options(EvalConfig, config, options, job="evaluate", primary="weights")
    out = Path(cfg.out).expanduser()
    from accelerate import PartialState

    with OutLock(out, "eval") if PartialState().is_main_process else contextlib.nullcontext():
        data = _evaluate(cfg, pipe, log, progress)
    return EvalResult(out=out, data=data or {}, is_main=data is not None)


def _evaluate(cfg: EvalConfig, pipe, log: Log | None, progress: bool) -> dict | None:
    """The eval.json record (None on processes other than the main one)."""
    run = _Evaluation(cfg, log, progress)
    run.check()
    run.setup(pipe)
    if run.cfg.cascade:
        return _evaluate_cascade(run.cfg, run.pipe, run.studs, run.prompts, run.metrics, run.nets, run.state,
                                 run.out, (run.width, run.height), run.say, run.warn, progress)
    run.draw()
    if not run.state.is_main_process:
        return None
    return run.measure()


class _Evaluation:
    """One `clear eval` in teacher mode; the steps read top to bottom:

    check    every option, the student files, the size, the prompts (`--prompts`, `--n`), before loading anything
    setup    the process state (`accelerate launch`), the memory check, `--backend`, the metric networks
             (`--metrics`, `--inception-weights`, `--clip-model`, `--dino-model`, `--lpips-weights`), the pipeline
             (`--model`, `--dtype`, `--compile`) and the students (`--weights`, `--window`)
    draw     teacher and student images, this process's share, cached and reused (`--overwrite` redraws)
    measure  metrics, seconds per image (`speed`), attention FLOPs; eval.json, report.html, grid.png
    """

    def __init__(self, cfg: EvalConfig, log: Log | None, progress: bool):
        self.cfg, self.progress = cfg, progress
        self.say, self.warn = sayer(log), warner(log)

    def check(self) -> None:
        cfg = self.cfg
        if cfg.prompts is None:
            cfg = self.cfg = dataclasses.replace(cfg, prompts=default_prompts(cfg.model))
        _validate(cfg)
        from clear_cli.metrics import parse_metrics

        self.metrics, self.explicit = parse_metrics(cfg.metrics)
        self.files = list(cfg.weights)
        if not self.files:
            raise UsageError("no student weights given", "pass the file clear distill wrote: --weights "
                             "out/clear_attn.safetensors (repeat --weights for several)")
        for f in self.files:  # before loading anything heavy
            if ":" not in str(f) and not Path(f).expanduser().is_file():
                raise UsageError(f"student file {f} not found", "pass the .safetensors file that clear distill wrote")
        from clear_cli.resolution import parse_res

        defaults = model_defaults(cfg.model)
        self.width, self.height = parse_res(cfg.res, "--res") if cfg.res is not None else (defaults.base_res,) * 2
        self.steps = cfg.steps or defaults.steps
        self.prompts = resolve_prompts(cfg.prompts, cfg.n, cfg.coco_captions)
        self.out = Path(cfg.out).expanduser()

    def setup(self, pipe) -> None:
        from accelerate import PartialState

        from clear_cli.devices import resolve_device
        from clear_cli.models import fit, load_pipeline

        cfg = self.cfg
        state = self.state = PartialState()
        device = self.device = state.device if state.num_processes > 1 else resolve_device(cfg.device)
        fit.check_eval(cfg, device, self.width, self.height, self.metrics)  # all fits, before any drawing
        from clear_cli.attention.kernels import check_backend

        try:
            check_backend(cfg.backend, device)   # e.g. triton without CUDA
        except ValueError as e:
            raise UsageError(f"--backend: {e}") from None
        # Metric networks first: a bad local path should fail before minutes of drawing.
        self.nets = None
        if state.is_main_process:
            from transformers.utils import logging as tlog

            tlog.disable_progress_bar()
            from clear_cli.metrics import load_networks

            self.nets = load_networks([m for m in self.metrics if m != "fid" or not cfg.cascade],
                                      explicit=self.explicit, device=device, inception_weights=cfg.inception_weights,
                                      clip_model=cfg.clip_model, dino_model=cfg.dino_model,
                                      lpips_weights=cfg.lpips_weights, warn=self.warn)
        if pipe is None:
            pipe = load_pipeline(cfg.model, device=str(device), dtype=cfg.dtype)
        from clear_cli.models.compile import compile_transformer
        from clear_cli.models.pipeline import require_family

        require_family(pipe, ("flux", "qwen-image"), "clear eval")

        compile_transformer(pipe, cfg.compile, warn=self.warn)  # stays on the pipeline (gen's cascade keeps it)
        self.pipe = pipe
        self.studs = load_students(self.files, pipe, cfg.window, cfg.backend, cfg.model, self.warn)

    def draw(self) -> None:
        cfg, state, out, pipe = self.cfg, self.state, self.out, self.pipe
        self.dtype = str(pipe.transformer.dtype).replace("torch.", "")
        settings = {"model": cfg.model, "width": self.width, "height": self.height, "steps": self.steps,
                    "guidance": cfg.guidance, "seed": cfg.seed, "dtype": self.dtype, "prompts": self.prompts}
        if state.is_main_process:
            _check_record(out / TEACHER_DIR / "settings.json", settings, "teacher images", cfg.overwrite)
            for st in self.studs:
                _check_record(out / st.folder / "settings.json",
                              {**settings, "student_sha256": st.weights.sha256, "window": st.window,
                               "down_factor": st.down_factor}, f"images of student {st.name}", cfg.overwrite)
        state.wait_for_everyone()
        mine = list(range(state.process_index, cfg.n, state.num_processes))
        kw = dict(width=self.width, height=self.height, steps=self.steps, guidance=cfg.guidance, seed=cfg.seed,
                  progress=self.progress and state.is_local_main_process, overwrite=cfg.overwrite)
        self.say(f"drawing {len(mine)} of {cfg.n} images per model at {self.width}x{self.height}, {self.steps} steps "
                 f"({state.num_processes} process(es)); cached in {out}")
        _record_times(out / TEACHER_DIR, state.process_index,
                      _draw(pipe, self.prompts, mine, out / TEACHER_DIR, label="teacher", **kw))
        for st in self.studs:
            with _Swap(pipe, st, cfg.backend):
                t = _draw(pipe, self.prompts, mine, out / st.folder, label=f"student {st.name}", **kw)
            _record_times(out / st.folder, state.process_index, t)
        state.wait_for_everyone()

    def measure(self) -> dict:
        from clear_cli.metrics import FID_SMALL_N, PSNR_CAP_DB

        cfg, out, metrics, nets = self.cfg, self.out, self.metrics, self.nets
        size = (self.width, self.height)
        teacher, rows = _compute(out, cfg.n, self.prompts, self.studs, metrics, nets, cfg, size, self.say,
                                 self.progress)
        t_pairs, t_flops = _attention_cost(self.pipe, *size, self.steps, None)
        t_times = _read_times(out / TEACHER_DIR, cfg.n)
        t_spi = sum(t_times) / len(t_times) if t_times and "speed" in metrics else None
        teacher.update(seconds_per_image=t_spi, attn_tflops_per_image=t_flops / 1e12, attn_pairs_per_layer=t_pairs)
        student_rows = []
        for st, row in zip(self.studs, rows):
            pairs, flops = _attention_cost(self.pipe, *size, self.steps, st.window, st.down_factor)
            times = _read_times(out / st.folder, cfg.n)
            spi = sum(times) / len(times) if times and "speed" in metrics else None
            student_rows.append({
                "name": st.name, "file": str(st.file), "sha256": st.weights.sha256, "window": st.window,
                "down_factor": st.down_factor, "folder": st.folder, **row,
                "seconds_per_image": spi, "speedup": (t_spi / spi) if spi and t_spi else None,
                "attn_tflops_per_image": flops / 1e12, "attn_flops_ratio": flops / t_flops,
                "attn_pairs_per_layer": pairs,
            })
        result = {
            "schema": SCHEMA, "mode": "teacher", "model": cfg.model, "prompts": cfg.prompts, "n": cfg.n,
            "width": self.width, "height": self.height, "steps": self.steps, "guidance": cfg.guidance,
            "seed": cfg.seed, "device": str(self.device), "dtype": self.dtype,
            "metrics": [m for m in metrics if m not in nets.skipped], "skipped": dict(nets.skipped),
            "small_n": cfg.n < FID_SMALL_N, "psnr_cap_db": PSNR_CAP_DB,
            "teacher": teacher, "students": student_rows, "cascade": None,
        }
        if result["small_n"] and "fid" in result["metrics"]:
            self.warn(f"FID from {cfg.n} images per set is biased and noisy (the protocol uses 5,000): compare only "
                      "runs with the same n")
        return _finish(result, out, self.prompts, self.say)


def _finish(result: dict, out: Path, prompts: list[str], say: Log) -> dict:
    from clear_cli.jobs import report

    result["report"], result["grid"] = "report.html", "grid.png"
    report.write_grid(result, out, out / "grid.png")
    report.write_html(result, out, prompts, out / "report.html")
    atomic_write_text(out / "eval.json", json.dumps(result, indent=1))
    say(f"wrote {out / 'eval.json'}, {out / 'report.html'}, {out / 'grid.png'}")
    return result


# ------------------------------------------------------------------------------------------- cascade

def _evaluate_cascade(cfg: EvalConfig, pipe, studs: list[Student], prompts: list[str], metrics: list[str], nets,
                      state, out: Path, size: tuple[int, int], say: Log, warn: Log, progress: bool) -> dict | None:
    """Per student: the CLEAR cascade vs the same cascade with full attention (same base image and seed)."""
    from clear_cli.jobs.generate import generate
    from clear_cli.metrics import PSNR_CAP_DB, mean_psnr, pair_metrics

    width, height = size
    mine = list(range(state.process_index, cfg.n, state.num_processes))
    res = f"{width}x{height}"
    for st in studs:
        folder = out / f"cascade_{st.name}"
        if state.is_main_process:
            _check_record(folder / "settings.json",
                          {"model": cfg.model, "width": width, "height": height, "steps": cfg.steps, "seed": cfg.seed,
                           "student_sha256": st.weights.sha256, "window": st.window, "prompts": prompts},
                          f"cascade images of student {st.name}", cfg.overwrite)
    state.wait_for_everyone()
    base = None
    for st in studs:
        folder = out / f"cascade_{st.name}"
        times: dict[int, float] = {}
        full_times: dict[int, float] = {}
        for i in mine:
            target = folder / image_name(i)
            full = folder / f"{i:05d}_full.png"
            if target.is_file() and full.is_file() and not cfg.overwrite:
                continue
            outs = generate(prompts[i], pipe=pipe, model=cfg.model, res=res, weights=str(st.file), window=st.window,
                            steps=cfg.steps, seed=cfg.seed + i, out=str(target), compare=True, overwrite=True,
                            backend=cfg.backend, compile=cfg.compile, progress=False, log=None, device=cfg.device,
                            dtype=cfg.dtype)
            o = outs[0]
            times[i] = o.seconds
            if o.full_seconds is not None:
                full_times[i] = o.full_seconds
            if base is None and o.stages:
                base = (o.stages[0]["width"], o.stages[0]["height"])
        _record_times(folder, state.process_index, times)
        if full_times:
            path = folder / f"full_times_rank{state.process_index}.json"
            atomic_write_text(path, json.dumps({str(k): v for k, v in full_times.items()}))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows = []
    for st in studs:
        folder = out / f"cascade_{st.name}"
        a = [folder / f"{i:05d}_full.png" for i in range(cfg.n)]
        b = [folder / image_name(i) for i in range(cfg.n)]
        pm = pair_metrics(a, b, [m for m in metrics if m in ("ssim", "psnr", "lpips")], nets, cfg.batch_size)
        times = _read_times(folder, cfg.n)
        full_t: list[float] = []
        for p in folder.glob("full_times_rank*.json"):
            full_t += [float(v) for k, v in json.loads(p.read_text()).items() if int(k) < cfg.n]
        psnr_mean, ident = mean_psnr(pm["psnr"]) if "psnr" in pm else (None, None)
        rows.append({"name": st.name, "file": str(st.file), "sha256": st.weights.sha256, "window": st.window,
                     "down_factor": st.down_factor, "folder": folder.name, "ssim": _mean(pm.get("ssim")),
                     "psnr": psnr_mean, "psnr_identical": ident, "lpips": _mean(pm.get("lpips")),
                     "seconds_per_image": sum(times) / len(times) if times else None,
                     "full_seconds_per_image": sum(full_t) / len(full_t) if full_t else None})
    result = {
        "schema": SCHEMA, "mode": "cascade", "model": cfg.model, "prompts": cfg.prompts, "n": cfg.n,
        "width": width, "height": height, "steps": cfg.steps or model_defaults(cfg.model).steps, "guidance": cfg.guidance, "seed": cfg.seed,
        "device": str(pipe._execution_device), "dtype": str(pipe.transformer.dtype).replace("torch.", ""),
        "metrics": [m for m in metrics if m in ("ssim", "psnr", "lpips", "speed") and m not in nets.skipped],
        "skipped": dict(nets.skipped), "small_n": False, "psnr_cap_db": PSNR_CAP_DB,
        "teacher": None, "students": [],
        "cascade": {"width": width, "height": height, "base_width": base[0] if base else None,
                    "base_height": base[1] if base else None, "students": rows},
    }
    return _finish(result, out, prompts, say)


