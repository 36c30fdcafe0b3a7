"""FLUX.1-dev at its real size on one GPU: the user commands' time and peak memory (flux-dev-random, no hub).

Every command runs in this process through the Python job API (clear_cli.generate / synth / distill / evaluate),
so each stage's time and peak GPU memory is measured around the calls it makes: every transformer step and every
VAE encode/decode is timed (synchronised) with its own peak (torch.cuda.max_memory_allocated, reset before it).
Sections, the headline first, each guarded (a failure is recorded and the next section runs), skipped when the
time budget left is below what the section needs:

  gen8k    `clear gen --res 8k --compare`: the CLEAR cascade 1K -> 2K -> 4K -> 8K and the same cascade with full
           attention from the same base image, one step per refinement stage (the full-attention 8K step alone takes
           ~95 s on an H200); then the CLEAR cascade again (warm: the first run's CLEAR steps include compiling) ->
           seconds per step and per stage, VAE encode/decode, peak memory, the ratio, and both extrapolated to the
           default protocol (28 base steps, 14 per refinement stage)
  gen      `clear gen --res 1k/2k/4k --compare` (one step per refinement stage, two base steps)
  synth    `clear synth --n 2 --res 1k --batch-size 2 --steps 8`: seconds per image and step, peak memory
  distill  `clear distill recipes/flux_dev.yaml` on that data, 3 steps at micro batch 1, with and without gradient
           checkpointing: seconds per step, peak memory, resident weights against the one-copy count (25.5 GiB)
  eval     `clear eval --weights <the distilled file> --n 1 --res 1k --steps 8 --metrics speed,ssim,psnr`
  offload  `clear gen --res 8k --offload` (CLEAR, one step per refinement stage): peak memory and time
  fits     from the measured peaks: the largest resolution that fits 24, 48 and 80 GB, with and without --offload
Figures go to $OUT/commands.json after every measurement; the estimates of clear_cli.models.fit sit beside the
measured peaks. The outputs are noise, which PNG compresses slowly and badly: images are written uncompressed
(`--png-level`, default 0 on CUDA) to a scratch folder outside $OUT.

Usage: bash bench/commands.sh   (BUDGET_S=..., SECTIONS=gen8k,gen,..., PREVIOUS=an earlier commands.json)
       python bench/commands.py --smoke   (CPU, tiny-random, tiny sizes: checks every section, not the speed)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

T0 = time.perf_counter()
SECTIONS = ("gen8k", "gen", "synth", "distill", "eval", "offload", "fits")
# seconds a section needs on an H200 (from the step times of bench/results/gpu_bench_h200.json plus VAE, loading
# and writing); a section starts only with at least this much budget left
NEEDS = {"gen8k_compare": 230, "gen8k_warm": 70, "gen": 40, "synth": 25, "distill": 70, "eval": 25, "offload": 60,
         "fits": 0}
CARDS = {"24GB": 23.99, "48GB": 47.99, "80GB": 79.65}  # GiB the cards report (RTX 4090, RTX 6000 Ada/L40S, H100)
GiB = 1024 ** 3


class Bench:
    def __init__(self, out: Path, scratch: Path, budget_s: float, smoke: bool):
        self.path = out / "commands.json"
        out.mkdir(parents=True, exist_ok=True)
        self.scratch = scratch
        self.budget = budget_s
        self.smoke = smoke
        self.data: dict = {"env": {}, "config": {}, "sections": {}, "skipped": {}, "errors": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - T0)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - T0, 2)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def error(self, where: str, e: BaseException) -> None:
        text = str(e).splitlines()[0][:300] if str(e) else ""
        msg = f"{where}: {type(e).__name__}: {text}"
        print("  FAILED", msg, flush=True)
        self.data["errors"].append(msg)
        if os.environ.get("CLEAR_DEBUG"):
            traceback.print_exc()
        self.save()

    def skip(self, key: str, why: str) -> None:
        print(f"  skipped {key}: {why}", flush=True)
        self.data["skipped"][key] = why
        self.save()

    def can(self, key: str) -> bool:
        need = 0 if self.smoke else NEEDS.get(key, 0)
        if self.left() < need:
            self.skip(key, f"out of budget ({self.left():.0f} s left, needs ~{need} s)")
            return False
        return True

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {})


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if cuda():
        torch.cuda.empty_cache()


def gib(x: float | int | None) -> float | None:
    return None if x is None else round(float(x) / GiB, 3)


# --------------------------------------------------------------------------------------------- measuring

class Recorder:
    """Times every transformer call and VAE encode/decode (synchronised), each with its own peak memory.

    Patches the classes' methods for the duration (so pipelines loaded inside a job, and accelerate's offload hooks,
    which capture the forward at hook time, all go through it) and keeps the running peak over the whole block.
    """

    def __init__(self, progress=None):
        self.progress = progress  # called after every call (writes the figures so far: a killed run keeps them)
        self.calls: list[dict] = []
        self.peak = 0
        self.peak_reserved = 0
        self._saved: list[tuple[type, str, object]] = []

    def _fold(self) -> None:
        if cuda():
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())

    def _wrap(self, cls: type, attr: str, kind: str, size_of) -> None:
        orig = getattr(cls, attr)
        rec = self

        def wrapped(module, *args, **kwargs):
            from clear_cli.attention.linearize import is_linearized

            sync()
            rec._fold()
            if cuda():
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            out = orig(module, *args, **kwargs)
            sync()
            dt = time.perf_counter() - t
            entry = {"kind": kind, "size": size_of(args, kwargs), "s": round(dt, 4)}
            if kind == "transformer":
                entry["attention"] = "clear" if is_linearized(module) else "full"
                entry["grad"] = torch.is_grad_enabled()
            if cuda():
                entry["peak_gib"] = gib(torch.cuda.max_memory_allocated())
                entry["reserved_gib"] = gib(torch.cuda.max_memory_reserved())
            rec.calls.append(entry)
            rec._fold()
            if rec.progress is not None:
                rec.progress(rec)
            return out

        wrapped.__wrapped__ = orig
        self._saved.append((cls, attr, orig))
        setattr(cls, attr, wrapped)

    def __enter__(self) -> "Recorder":
        from diffusers import AutoencoderKL, FluxTransformer2DModel

        def tokens(args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            return f"{x.shape[0]}x{x.shape[1]}" if x is not None else "?"

        def pixels(args, kwargs):
            x = kwargs.get("x", kwargs.get("z", args[0] if args else None))
            if x is None:
                return "?"
            f = 8 if x.shape[1] != 3 else 1  # decode gets latents (x8 per side)
            return f"{x.shape[0]}x{x.shape[-1] * f}x{x.shape[-2] * f}"

        self._wrap(FluxTransformer2DModel, "forward", "transformer", tokens)
        self._wrap(AutoencoderKL, "encode", "vae.encode", pixels)
        self._wrap(AutoencoderKL, "decode", "vae.decode", pixels)
        if cuda():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        sync()
        self._fold()
        for cls, attr, orig in reversed(self._saved):
            setattr(cls, attr, orig)
        self._saved.clear()

    def summary(self) -> dict:
        """Per (kind, size, attention): count, first call, median of the later ones, total, largest peak."""
        groups: dict[str, list[dict]] = {}
        for c in self.calls:
            key = c["kind"] + " " + c["size"] + (f" {c['attention']}" if "attention" in c else "") + (
                " grad" if c.get("grad") else "")
            groups.setdefault(key, []).append(c)
        out = {}
        for key, cs in groups.items():
            ts = [c["s"] for c in cs]
            out[key] = {"n": len(cs), "first_s": ts[0], "median_later_s": statistics.median(ts[1:]) if len(ts) > 1
                        else None, "total_s": round(sum(ts), 3),
                        "peak_gib": max((c.get("peak_gib") or 0) for c in cs) or None}
        return out

    def peaks(self) -> dict:
        return {"peak_allocated_gib": gib(self.peak) if cuda() else None,
                "peak_reserved_gib": gib(self.peak_reserved) if cuda() else None}


@contextmanager
def png_level(level: int | None):
    """Write PNGs at this zlib level (None: untouched). Noise does not compress; real images do, and faster."""
    if level is None:
        yield
        return
    from PIL import Image

    orig = Image.Image.save

    def save(self, fp, format=None, **params):
        if (format or "").upper() == "PNG":
            params.setdefault("compress_level", level)
        return orig(self, fp, format, **params)

    Image.Image.save = save
    try:
        yield
    finally:
        Image.Image.save = orig


# --------------------------------------------------------------------------------------------- sections

class Ctx:
    """What every section needs: sizes for the real run or the smoke run, the shared pipeline."""

    def __init__(self, args, b: Bench):
        self.args, self.b = args, b
        self.smoke = args.smoke
        self.model = "tiny-random" if args.smoke else "flux-dev-random"
        self.device = "cpu" if args.smoke else "cuda"
        self.dtype = "fp32" if args.smoke else "bf16"
        # resolutions: the real ones, or the tiny model's (base 128) on the CPU
        self.res = {"1k": "128", "2k": "256", "4k": "384", "8k": "512"} if args.smoke else \
            {k: k for k in ("1k", "2k", "4k", "8k")}
        self.side = {k: int(v) if v.isdigit() else {"1k": 1024, "2k": 2048, "4k": 4096, "8k": 8192}[k]
                     for k, v in self.res.items()}
        self.pipe = None

    def get_pipe(self):
        if self.pipe is None:
            from clear_cli.models import load_pipeline

            sync()
            t = time.perf_counter()
            self.pipe = load_pipeline(self.model, device=self.device, dtype=self.dtype)
            sync()
            self.b.data["env"]["build_s"] = round(time.perf_counter() - t, 2)
            self.b.data["env"]["resident_after_build_gib"] = gib(torch.cuda.memory_allocated()) if cuda() else None
            print(f"[{time.perf_counter() - T0:.0f}s] built {self.model} in {self.b.data['env']['build_s']} s",
                  flush=True)
            self.b.save()
        return self.pipe

    def drop_pipe(self) -> None:
        self.pipe = None
        free()

    def estimate(self, side: int, offload: bool = False, clear: bool = True) -> float | None:
        from clear_cli.models import fit

        arch = fit.architecture(self.model, self.pipe) if self.pipe is not None else fit.architecture(self.model)
        if arch is None:
            return None
        return gib(fit.gen_need(arch, side, side, offload=offload, cuda=cuda(), clear=clear,
                                dtype_bytes=4 if self.dtype == "fp32" else 2).total)


def run_gen(ctx: Ctx, key: str, res: str, *, compare: bool, steps: int, refine_steps: int, offload: bool = False):
    """One `clear gen` through the job API with its calls recorded; returns the section record."""
    import clear_cli

    b = ctx.b
    out_dir = b.scratch / key
    shutil.rmtree(out_dir, ignore_errors=True)
    log: list[str] = []
    pipe = None if offload else ctx.get_pipe()
    free()
    t = time.perf_counter()

    def progress(r: Recorder) -> None:
        b.data["sections"].setdefault("in_progress", {})[key] = {"calls": r.summary(), **r.peaks(),
                                                                 "elapsed_s": round(time.perf_counter() - t, 1)}
        b.save()

    with Recorder(progress) as rec, png_level(ctx.args.png_level):
        outs = clear_cli.generate("a lighthouse on a cliff at sunset", pipe=pipe, model=ctx.model, res=res,
                                  steps=steps, refine_steps=refine_steps, compare=compare, offload=offload,
                                  out=str(out_dir), overwrite=True, device=ctx.device, dtype=ctx.dtype,
                                  progress=False, log=log.append)
    wall = time.perf_counter() - t
    b.data["sections"].get("in_progress", {}).pop(key, None)
    if not b.data["sections"].get("in_progress", True):
        b.data["sections"].pop("in_progress")
    o = outs[0]
    stages = [{k: s[k] for k in ("kind", "width", "height", "attention", "steps", "seconds", "start_sigma")}
              for s in o.stages]
    rec_d = {"command": f"clear gen --res {res} --steps {steps} --refine-steps {refine_steps}"
                        + (" --compare" if compare else "") + (" --offload" if offload else ""),
             "wall_s": round(wall, 2), "clear_s": round(o.seconds, 2), "stages": stages, "calls": rec.summary(),
             **rec.peaks(), "log": [ln for ln in log if "stage" in ln or "compare" in ln]}
    if o.psnr is not None:
        rec_d["psnr_db"], rec_d["ssim"] = o.psnr, o.ssim
    if compare:  # the refinement stages as run, CLEAR vs full attention at equal steps (VAE calls included)
        import re

        full = [float(m.group(1)) for ln in log if ln.lstrip().startswith("full stage")
                for m in [re.search(r", ([0-9.]+) s, attention", ln)] if m]
        clear = sum(st["seconds"] for st in stages if st["kind"] != "base")
        if full:
            rec_d["refine_equal_steps"] = {"clear_s": round(clear, 2), "full_s": round(sum(full), 2),
                                           "speedup": round(sum(full) / clear, 2) if clear else None}
    shutil.rmtree(out_dir, ignore_errors=True)
    print(f"[{time.perf_counter() - T0:.0f}s] {key}: {rec_d['command']}: {wall:.1f} s, peak "
          f"{rec_d.get('peak_allocated_gib')} GiB", flush=True)
    return rec_d, rec


def _step_times(rec_d: dict) -> dict:
    """tokens -> {clear, full}: the steady seconds per transformer step (median of later calls, else the first)."""
    out: dict[str, dict] = {}
    for key, v in rec_d["calls"].items():
        parts = key.split()
        if parts[0] != "transformer" or "grad" in parts:
            continue
        size, attention = parts[1], parts[2]
        s = v["median_later_s"] if v["median_later_s"] is not None else v["first_s"]
        out.setdefault(size, {})[attention] = s
        out[size][f"{attention}_first_s"] = v["first_s"]
    return out


def _vae_times(rec_d: dict) -> dict:
    return {k: v["first_s"] if v["n"] == 1 else v["median_later_s"] for k, v in rec_d["calls"].items()
            if k.startswith("vae.")}


def protocol_estimate(ctx: Ctx, steps_by_tokens: dict, vae: dict, target_side: int) -> dict | None:
    """The default protocol (28 base steps, 14 per refinement stage, x2 stages) from measured per-step times."""
    from clear_cli.sampling.plan import stage_sizes

    sizes = stage_sizes((target_side, target_side), ctx.side["1k"], 2)
    total = {"clear": 0.0, "full": 0.0}
    for i, (w, h) in enumerate(sizes):
        key = f"1x{(w // 16) * (h // 16)}"
        st = steps_by_tokens.get(key, {})
        n = 28 if i == 0 else 14
        for mode in total:
            s = st.get("full" if i == 0 else mode)
            if s is None:
                return None
            total[mode] += n * s
        if i > 0:
            pw, ph = sizes[i - 1]
            for mode in total:
                total[mode] += vae.get(f"vae.decode 1x{pw}x{ph}", 0) + vae.get(f"vae.encode 1x{w}x{h}", 0)
    last = sizes[-1]
    for mode in total:
        total[mode] += vae.get(f"vae.decode 1x{last[0]}x{last[1]}", 0)
    return {"clear_s": round(total["clear"], 1), "full_s": round(total["full"], 1),
            "speedup": round(total["full"] / total["clear"], 2) if total["clear"] else None,
            "note": "extrapolated: measured seconds per step x the protocol's steps + measured VAE calls"}


def section_gen8k(ctx: Ctx) -> None:
    b = ctx.b
    sec = b.section("gen8k")
    res = ctx.res["8k"]
    if b.can("gen8k_compare"):
        try:
            sec["compare"], _ = run_gen(ctx, "gen8k_compare", res, compare=True, steps=2, refine_steps=2)
            sec["compare"]["estimate_gib"] = {"clear": ctx.estimate(ctx.side["8k"]),
                                              "full": ctx.estimate(ctx.side["8k"], clear=False)}
            b.save()
        except Exception as e:
            b.error("gen8k compare", e)
        free()
    if b.can("gen8k_warm"):
        try:
            sec["warm"], _ = run_gen(ctx, "gen8k_warm", res, compare=False, steps=2, refine_steps=2)
            b.save()
        except Exception as e:
            b.error("gen8k warm", e)
        free()
    steps: dict = {}
    vae: dict = {}
    for part in ("compare", "warm"):  # the warm run's CLEAR steps override the first run's (compiling) ones
        if part in sec:
            for k, v in _step_times(sec[part]).items():
                steps.setdefault(k, {}).update({m: s for m, s in v.items() if not (part == "warm" and m == "full")})
            vae.update(_vae_times(sec[part]))
    if steps:
        sec["seconds_per_step"] = steps
        sec["vae_s"] = vae
        sec["protocol"] = protocol_estimate(ctx, steps, vae, ctx.side["8k"])
        b.save()


def section_gen(ctx: Ctx) -> None:
    b = ctx.b
    sec = b.section("gen")
    for k in ("1k", "2k", "4k"):
        if not b.can("gen"):
            return
        try:
            rec_d, _ = run_gen(ctx, f"gen_{k}", ctx.res[k], compare=True, steps=2, refine_steps=2)
            rec_d["estimate_gib"] = {"clear": ctx.estimate(ctx.side[k]), "offload": ctx.estimate(ctx.side[k], True)}
            rec_d["seconds_per_step"] = _step_times(rec_d)
            sec[k] = rec_d
            b.save()
        except Exception as e:
            b.error(f"gen {k}", e)
        free()


def section_synth(ctx: Ctx) -> None:
    import clear_cli

    b = ctx.b
    if not b.can("synth"):
        return
    out = b.scratch / "synth"
    try:
        shutil.rmtree(out, ignore_errors=True)
        pipe = ctx.get_pipe()
        free()
        steps = 8
        t = time.perf_counter()
        with Recorder() as rec, png_level(ctx.args.png_level):
            r = clear_cli.synth(pipe=pipe, model=ctx.model, n=2, res=ctx.res["1k"], batch_size=2, steps=steps,
                                out=str(out), device=ctx.device, dtype=ctx.dtype, progress=False)
        wall = time.perf_counter() - t
        per_image = r.seconds / max(1, r.new)
        tr = [c["s"] for c in rec.calls if c["kind"] == "transformer"]
        b.section("synth").update({
            "command": f"clear synth --n 2 --res {ctx.res['1k']} --batch-size 2 --steps {steps}", "wall_s": round(wall, 2),
            "s_per_image": round(per_image, 3), "s_per_batch_step": statistics.median(tr[1:]) if len(tr) > 1 else None,
            "s_per_image_at_28_steps": round(per_image + (28 - steps) * statistics.median(tr[1:]) / 2, 3)
            if len(tr) > 1 else None, "calls": rec.summary(), **rec.peaks(),
            "estimate_gib": None if ctx.pipe is None else _synth_estimate(ctx, 2)})
        b.save()
        print(f"[{time.perf_counter() - T0:.0f}s] synth: {per_image:.2f} s/image ({steps} steps)", flush=True)
    except Exception as e:
        b.error("synth", e)
    free()


def _synth_estimate(ctx: Ctx, batch: int) -> float | None:
    from clear_cli.models import fit

    arch = fit.architecture(ctx.model, ctx.pipe)
    s = ctx.side["1k"]
    return gib(fit.gen_need(arch, s, s, cuda=cuda(), clear=False, batch=batch,
                            dtype_bytes=4 if ctx.dtype == "fp32" else 2).total)


def _job(name: str):
    """A job's module, wherever the package keeps it (clear_cli.jobs.NAME or clear_cli.NAME)."""
    import importlib
    import types

    for path in (f"clear_cli.jobs.{name}", f"clear_cli.{name}"):
        try:
            mod = importlib.import_module(path)
        except ImportError:
            continue
        if isinstance(mod, types.ModuleType):
            return mod
    raise ImportError(f"no job module {name}")


def _distiller_class():
    try:
        return getattr(_job("distill"), "Distiller", None)
    except ImportError:
        return None


def section_distill(ctx: Ctx) -> None:
    import clear_cli

    b = ctx.b
    data = b.scratch / "synth"
    if not (data / "dataset.json").is_file():
        b.skip("distill", "no synth data (the synth section did not run)")
        return
    ctx.drop_pipe()  # distill loads its own model (and changes it)
    cls = _distiller_class()
    from clear_cli.models import fit
    from clear_cli.models.memory import memory_figure

    for ckpt in (True, False):
        key = "checkpointing" if ckpt else "no_checkpointing"
        if not b.can("distill"):
            return
        out = b.scratch / f"distill_{key}"
        resident: dict = {}
        saved = {}
        try:
            if cls is not None:  # measure what stays resident; skip the final optimizer-state checkpoint (~29 GB)
                saved = {n: getattr(cls, n) for n in ("encode_validation", "save_checkpoint")}

                def encode_validation(self, _orig=saved["encode_validation"]):
                    _orig(self)
                    sync()
                    resident["after_load_gib"] = gib(torch.cuda.memory_allocated()) if cuda() else None
                    resident["teacher_copy_gib"] = gib(self.teacher_bytes)
                    fig = memory_figure(self.transformer, 2)
                    resident["one_copy_count_gib"] = gib(fig.one_copy_bytes)
                    resident["two_copies_count_gib"] = gib(fig.two_copies_bytes)

                cls.encode_validation = encode_validation
                cls.save_checkpoint = lambda self, step: None
            free()
            steps = 3
            overrides = [f"model={ctx.model}", f"data={data}", f"train.steps={steps}", "train.batch_size=1",
                         "train.gradient_accumulation=1", f"train.gradient_checkpointing={str(ckpt).lower()}",
                         "validation.prompts=[]", "checkpoint.every=0"]
            if ctx.smoke:
                overrides.append(f"resolution={ctx.side['1k']}")
            t = time.perf_counter()
            with Recorder() as rec:
                r = clear_cli.distill(str(Path(__file__).resolve().parent.parent / "recipes" / "flux_dev.yaml"),
                                      sets=overrides, out=str(out), overwrite=True, device=ctx.device,
                                      progress=False)
            wall = time.perf_counter() - t
            secs = [x["seconds"] for x in r.log]
            arch = fit.architecture(ctx.model)
            est = None
            if arch is not None:
                est = gib(fit.distill_need(arch, ctx.side["1k"], micro_batch=1, checkpointing=ckpt,
                                           optimizer="prodigy", mixed_precision="bf16", cuda=cuda()).total)
            b.section("distill")[key] = {
                "command": "clear distill recipes/flux_dev.yaml --set " + " --set ".join(overrides),
                "wall_s": round(wall, 2), "s_per_step": statistics.median(secs[1:]) if len(secs) > 1 else None,
                "first_step_s": secs[0] if secs else None, "trainable_params": r.trainable_params,
                "teacher_copy_gib": gib(r.teacher_copy_bytes), **resident, **rec.peaks(), "estimate_gib": est,
                "final_checkpoint": "skipped (optimizer state)" if cls is not None else "written"}
            b.save()
            print(f"[{time.perf_counter() - T0:.0f}s] distill {key}: "
                  f"{b.section('distill')[key]['s_per_step']} s/step, peak {rec.peaks()['peak_allocated_gib']} GiB",
                  flush=True)
            if ckpt:
                ctx.student = out / "clear_attn.safetensors"
        except Exception as e:
            b.error(f"distill {key}", e)
        finally:
            for n, f in saved.items():
                setattr(cls, n, f)
            if not ckpt:
                shutil.rmtree(out, ignore_errors=True)
            free()


def section_eval(ctx: Ctx) -> None:
    import clear_cli

    b = ctx.b
    student = getattr(ctx, "student", None)
    if student is None or not Path(student).is_file():
        b.skip("eval", "no distilled student file (the distill section did not run)")
        return
    if not b.can("eval"):
        return
    out = b.scratch / "eval"
    try:
        shutil.rmtree(out, ignore_errors=True)
        steps = 8
        t = time.perf_counter()
        with Recorder() as rec, png_level(ctx.args.png_level):
            r = clear_cli.evaluate([str(student)], model=ctx.model, prompts="builtin", n=1, res=ctx.res["1k"],
                                   steps=steps, metrics="speed,ssim,psnr", out=str(out), overwrite=True,
                                   device=ctx.device, dtype=ctx.dtype, progress=False)
        wall = time.perf_counter() - t
        st = r["students"][0]
        b.section("eval").update({
            "command": f"clear eval --weights {Path(student).name} --n 1 --res {ctx.res['1k']} --steps {steps} "
                       "--metrics speed,ssim,psnr", "wall_s": round(wall, 2),
            "teacher_s_per_image": r["teacher"]["seconds_per_image"], "student_s_per_image": st["seconds_per_image"],
            "speedup": st["speedup"], "calls": rec.summary(), **rec.peaks()})
        b.save()
        print(f"[{time.perf_counter() - T0:.0f}s] eval: teacher {r['teacher']['seconds_per_image']} s/image, "
              f"student {st['seconds_per_image']} s/image", flush=True)
    except Exception as e:
        b.error("eval", e)
    shutil.rmtree(out, ignore_errors=True)
    free()


def section_offload(ctx: Ctx) -> None:
    b = ctx.b
    if not cuda():
        b.skip("offload", "--offload needs CUDA")
        return
    if not b.can("offload"):
        return
    ctx.drop_pipe()
    try:
        rec_d, _ = run_gen(ctx, "offload_8k", ctx.res["8k"], compare=False, steps=2, refine_steps=2, offload=True)
        rec_d["estimate_gib"] = ctx.estimate(ctx.side["8k"], offload=True)
        b.section("offload")["8k"] = rec_d
        b.save()
    except Exception as e:
        b.error("offload 8k", e)
    free()


def section_fits(ctx: Ctx) -> None:
    """The largest resolution that fits each card: measured reserved peak + the CUDA context must be below it."""
    b = ctx.b
    secs = b.data["sections"]
    overhead = b.data["env"].get("context_gib") or 0.0
    measured: dict[str, dict[str, float]] = {"gen": {}, "offload": {}}
    for k in ("1k", "2k", "4k"):
        r = secs.get("gen", {}).get(k)
        if r and r.get("peak_reserved_gib"):
            measured["gen"][k] = r["peak_reserved_gib"]
    for part in ("compare", "warm"):
        r = secs.get("gen8k", {}).get(part)
        if r and r.get("peak_reserved_gib"):
            measured["gen"]["8k"] = max(measured["gen"].get("8k", 0), r["peak_reserved_gib"])
    r = secs.get("offload", {}).get("8k")
    if r and r.get("peak_reserved_gib"):
        measured["offload"]["8k"] = r["peak_reserved_gib"]
    est = {"gen": {k: ctx.estimate(ctx.side[k]) for k in ("1k", "2k", "4k", "8k")},
           "offload": {k: ctx.estimate(ctx.side[k], offload=True) for k in ("1k", "2k", "4k", "8k")}}
    fits = {}
    for card, cap in CARDS.items():
        row = {}
        for mode in ("gen", "offload"):
            best_m = best_e = None
            for k in ("1k", "2k", "4k", "8k"):
                m = measured[mode].get(k)
                if m is not None and m + overhead <= cap:
                    best_m = k
                e = est[mode].get(k)
                if e is not None and e <= cap:
                    best_e = k
            row[mode] = {"measured": best_m, "estimate": best_e}
        fits[card] = row
    b.section("fits").update({"measured_reserved_gib": measured, "context_gib": overhead, "estimate_gib": est,
                              "largest_res": fits,
                              "note": "measured: largest res whose measured reserved peak + CUDA context fits the "
                                      "card (only the resolutions run); estimate: clear_cli.models.fit"})
    b.save()


# --------------------------------------------------------------------------------------------- main

def table(b: Bench) -> str:
    d = b.data
    lines = [f"device: {d['env'].get('device')}, torch {d['env'].get('torch')}, elapsed {d.get('elapsed_s')} s"]
    g8 = d["sections"].get("gen8k", {})
    if g8.get("protocol"):
        p = g8["protocol"]
        lines.append(f"gen 8k, default protocol (extrapolated): CLEAR {p['clear_s']} s, full {p['full_s']} s, "
                     f"{p['speedup']}x")
    for size, v in g8.get("seconds_per_step", {}).items():
        lines.append(f"  step {size:>12}: CLEAR {v.get('clear')} s, full {v.get('full')} s")
    for part in ("compare", "warm"):
        r = g8.get(part)
        if r:
            lines.append(f"  {r['command']}: {r['wall_s']} s, peak {r.get('peak_allocated_gib')} GiB allocated")
    for k, r in d["sections"].get("gen", {}).items():
        lines.append(f"gen {k}: {r['wall_s']} s, peak {r.get('peak_allocated_gib')} GiB (estimate "
                     f"{r.get('estimate_gib')})")
    s = d["sections"].get("synth")
    if s:
        lines.append(f"synth: {s['s_per_image']} s/image, peak {s.get('peak_allocated_gib')} GiB")
    for k, r in d["sections"].get("distill", {}).items():
        lines.append(f"distill {k}: {r['s_per_step']} s/step, peak {r.get('peak_allocated_gib')} GiB (estimate "
                     f"{r.get('estimate_gib')}), resident {r.get('after_load_gib')} GiB vs one-copy count "
                     f"{r.get('one_copy_count_gib')}")
    e = d["sections"].get("eval")
    if e:
        lines.append(f"eval: teacher {e['teacher_s_per_image']} s/image, student {e['student_s_per_image']} s/image")
    o = d["sections"].get("offload", {}).get("8k")
    if o:
        lines.append(f"offload 8k: {o['wall_s']} s, peak {o.get('peak_allocated_gib')} GiB")
    f = d["sections"].get("fits", {}).get("largest_res")
    if f:
        for card, row in f.items():
            lines.append(f"fits {card}: gen {row['gen']}, --offload {row['offload']}")
    for k, why in d["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    for err in d["errors"]:
        lines.append(f"error: {err}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-random, tiny sizes (checks every section)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/commands"), help="where commands.json goes")
    ap.add_argument("--scratch", default=None, help="images, datasets, weights (default: a temp folder)")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 270)),
                    help="start no section after this many seconds minus what it needs")
    ap.add_argument("--sections", default=os.environ.get("SECTIONS", ",".join(SECTIONS)),
                    help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--png-level", type=int, default=None, help="zlib level for the PNGs (default: 0 on CUDA)")
    ap.add_argument("--previous", default=os.environ.get("PREVIOUS"),
                    help="commands.json of an earlier call: its sections are kept (e.g. gen8k for `fits`)")
    args = ap.parse_args(argv)
    if args.png_level is None and not args.smoke:
        args.png_level = 0
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SECTIONS]
    if bad:
        print(f"unknown sections {bad}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    if not args.smoke and not cuda():
        print("no CUDA device: run with --smoke for a CPU check", file=sys.stderr)
        return 2
    import tempfile

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="clear_commands_"))
    scratch.mkdir(parents=True, exist_ok=True)
    b = Bench(Path(args.out), scratch, args.budget_s, args.smoke)
    env = b.data["env"]
    env["torch"] = torch.__version__
    try:
        import diffusers
        import transformers

        env["diffusers"], env["transformers"] = diffusers.__version__, transformers.__version__
    except Exception as e:
        env["diffusers"] = f"missing ({type(e).__name__}: {e})"
    if cuda():
        props = torch.cuda.get_device_properties(0)
        free_b, total_b = torch.cuda.mem_get_info()
        env.update(device=props.name, total_gib=gib(total_b), context_gib=gib(total_b - free_b))
    else:
        env["device"] = "cpu"
    b.data["config"] = {"sections": wanted, "budget_s": args.budget_s, "smoke": args.smoke,
                        "png_level": args.png_level}
    if args.previous:  # an earlier call's figures (another process): kept unless this call reruns the section
        prev = json.loads(Path(args.previous).read_text())
        for name, sec in prev.get("sections", {}).items():
            if name not in wanted and name != "in_progress":
                b.data["sections"][name] = sec
        b.data["previous"] = {"file": str(args.previous), "env": prev.get("env"), "errors": prev.get("errors"),
                              "skipped": prev.get("skipped"), "sections": sorted(prev.get("sections", {}))}
    b.save()
    print(f"[{time.perf_counter() - T0:.0f}s] {env}", flush=True)
    ctx = Ctx(args, b)
    ctx.student = None
    runners = {"gen8k": section_gen8k, "gen": section_gen, "synth": section_synth, "distill": section_distill,
               "eval": section_eval, "offload": section_offload, "fits": section_fits}
    for name in SECTIONS:
        if name in wanted:
            print(f"[{time.perf_counter() - T0:.0f}s] section {name} ({b.left():.0f} s of budget left)", flush=True)
            try:
                runners[name](ctx)
            except Exception as e:  # a section's own guard failed: record, go on
                b.error(name, e)
    b.save()
    if not args.scratch:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + table(b), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
