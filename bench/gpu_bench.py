"""GPU benchmark of CLEAR at FLUX.1-dev size (random weights, bf16, built directly on the GPU), in one run.

One plan, most important figures first (`--plan` prints it with the time each item is expected to take on an
H200); an item that does not fit the time left is skipped and listed under "skipped", with the reason:
  - attention alone, 8K r = 16 forward: flash (SDPA over all tokens), every FlexAttention layout, `triton` when the
    backend exists; a small correctness check of every CLEAR kernel against `reference`;
  - whole transformer steps (19 double + 38 single blocks), measured directly: 8K, 4K and 1K at r = 16, each as
    CLEAR compiled, CLEAR eager, stock eager and stock compiled (stock = diffusers' own processors, full attention;
    compiled = `clear_cli.models.compile`, regional compilation of the two block classes). A warm-up call on the
    first blocks only compiles (compiled variants) or builds plans and kernels (eager ones) and is recorded as
    `warmup_s` apart from the timed steps;
  - attention 8K r = 8, the Triton sweep (when its module has `sweep`), forward + backward at 8K, then every other
    resolution (8K/4K/2K/1K), window (8/16/32), factor (1/4) and direction, and the 8K step at r = 8.
TFLOP/s are on the work each kernel computes (its own schedule, pads included: `clear_cli.attention.flex
.layout_work`, full N^2 for flash), forward + backward counted as 3.5 x the forward's FLOPs. Figures go to
OUT/gpu_bench.json after every measurement; a table is printed last.

    bash bench/gpu.sh                       # on the GPU (see there), at most 8 minutes
    python bench/gpu_bench.py --plan        # the plan and its H200 estimates, no GPU needed
    python bench/gpu_bench.py --smoke       # every section on the CPU at tiny sizes (checks the code paths)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

T0 = time.perf_counter()
GPU_RES = {"8k": 512, "4k": 256, "2k": 128, "1k": 64}        # token grid side (16 px per token)
SMOKE_RES = {"8k": 32, "4k": 24, "2k": 16, "1k": 8}          # the same names and code paths, tiny sizes
FLUX_DIMS = dict(heads=24, head_dim=128, text_len=512, joint_dim=4096, pooled_dim=768, rope=(16, 56, 56),
                 n_double=19, n_single=38)
SMOKE_DIMS = dict(heads=2, head_dim=16, text_len=8, joint_dim=32, pooled_dim=16, rope=(4, 6, 6), n_double=3,
                  n_single=3)
BWD_FLOP_FACTOR = 3.5     # forward + backward = 3.5 x forward FLOPs (backward: 5 matmuls to the forward's 2)
# where the Triton backend's module may live (its `sweep` and work count are optional; CLEAR_TRITON_MODULE wins)
TRITON_MODULES = ("clear_cli.attention.triton_clear",)
VARIANTS = ("clear_compiled", "clear_eager", "full_eager", "full_compiled")

# H200 estimates (torch 2.11, bf16), from bench/results/gpu_bench_h200.json where measured: whole eager steps
# (s), dense and block-sparse attention rates (FLOP/s), first-call compile times (s). Measured values replace
# them as the run goes.
STEP_S = {("8k", "full"): 95.0, ("4k", "full"): 7.0, ("2k", "full"): 1.0, ("1k", "full"): 0.31,
          ("8k", "clear"): 12.5, ("4k", "clear"): 2.7, ("2k", "clear"): 0.9, ("1k", "clear"): 0.37}
RATE = {"flash": 5.9e14, "flash_bwd": 4.5e14, "clear": 2.4e14, "clear_bwd": 1.5e14}
COMPILE_S = {"step": 60.0, "kernel": 3.0, "kernel_bwd": 10.0}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def now() -> float:
    return time.perf_counter() - T0


@dataclass
class Item:
    name: str
    est: Callable[[], float]
    run: Callable[[], None]


class Bench:
    def __init__(self, args, device: torch.device, dtype: torch.dtype, dims: dict, res: dict):
        self.args, self.device, self.dtype, self.dims, self.res = args, device, dtype, dims, res
        self.smoke = args.smoke
        self.path = os.path.join(args.out, "gpu_bench.json")
        os.makedirs(args.out, exist_ok=True)
        self.budget = args.budget_s
        self.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
        self.data: dict = {"env": {}, "plan": [], "attention": {}, "check": {}, "steps": {}, "sweep": {},
                           "skipped": [], "errors": [], "current": None}
        self.step_s = dict(STEP_S)
        self.compile_s = dict(COMPILE_S) if not self.smoke else {"step": 10.0, "kernel": 1.0, "kernel_bwd": 1.0}
        self._model = None
        self._inputs: dict = {}

    # -- bookkeeping --------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.budget - now()

    def save(self) -> None:
        self.data["elapsed_s"] = round(now(), 2)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def fits(self, what: str, est: float) -> bool:
        if est <= self.left():
            return True
        self.data["skipped"].append(f"{what}: needs ~{est:.0f} s, {max(self.left(), 0):.0f} s left")
        print(f"[{now():5.0f}s] skip {what} (~{est:.0f} s, {max(self.left(), 0):.0f} s left)", flush=True)
        self.save()
        return False

    def error(self, where: str, e: BaseException) -> None:
        msg = f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(f"[{now():5.0f}s] FAILED {msg}", flush=True)
        self.data["errors"].append(msg)
        if os.environ.get("CLEAR_DEBUG"):
            traceback.print_exc()
        self.save()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def say(self, msg: str) -> None:
        print(f"[{now():5.0f}s] {msg}", flush=True)

    # -- model and inputs ---------------------------------------------------------------------------------
    def model(self):
        if self._model is None:
            from diffusers import FluxTransformer2DModel

            d = self.dims
            cfg = dict(patch_size=1, in_channels=64, num_layers=d["n_double"], num_single_layers=d["n_single"],
                       attention_head_dim=d["head_dim"], num_attention_heads=d["heads"],
                       joint_attention_dim=d["joint_dim"], pooled_projection_dim=d["pooled_dim"],
                       guidance_embeds=True, axes_dims_rope=d["rope"])
            t = time.perf_counter()
            prev = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                with torch.device(self.device):
                    model = FluxTransformer2DModel(**cfg)
            finally:
                torch.set_default_dtype(prev)
            self._model = model.eval().requires_grad_(False)
            sync()
            self.data["env"]["model_build_s"] = round(time.perf_counter() - t, 2)
            self.data["env"]["model_params"] = sum(p.numel() for p in model.parameters())
        return self._model

    def inputs(self, res: str) -> dict:
        if res not in self._inputs:
            self._inputs.clear()
            g, d, dev, dt = self.res[res], self.dims, self.device, self.dtype
            t = d["text_len"]
            ids = torch.zeros(g, g, 3, device=dev)
            ids[..., 1] = torch.arange(g, device=dev)[:, None]
            ids[..., 2] = torch.arange(g, device=dev)[None, :]
            self._inputs[res] = dict(
                hidden_states=torch.randn(1, g * g, 64, device=dev, dtype=dt),
                encoder_hidden_states=torch.randn(1, t, d["joint_dim"], device=dev, dtype=dt),
                pooled_projections=torch.randn(1, d["pooled_dim"], device=dev, dtype=dt),
                timestep=torch.tensor([0.5], device=dev, dtype=dt), guidance=torch.tensor([3.5], device=dev, dtype=dt),
                img_ids=ids.reshape(-1, 3).to(dt), txt_ids=torch.zeros(t, 3, device=dev, dtype=dt), return_dict=False)
        return self._inputs[res]


# ------------------------------------------------------------------------------------------------ kernels

def triton_module():
    """The Triton backend's module, or None (before it lands, or where triton does not import)."""
    names = [os.environ["CLEAR_TRITON_MODULE"]] if os.environ.get("CLEAR_TRITON_MODULE") else TRITON_MODULES
    for name in names:
        try:
            return importlib.import_module(name)
        except Exception:  # not there, or triton missing: the sections say "not available"
            continue
    return None


def kernel_names(b: Bench) -> list[str]:
    from clear_cli.attention import BACKENDS
    from clear_cli.attention.flex import LAYOUTS

    names = ["flash"] + [f"flex:{n}" for n in LAYOUTS]
    if "triton" in BACKENDS:
        from clear_cli.attention.kernels import triton_status

        if triton_status(b.device)[0]:
            names.append("triton")
    if b.smoke:
        names.append("tiled")   # the CPU stand-in, so the backward path runs in the smoke test
    return names


def kernel_fn(name: str, grid, t: int, r: int, f: int) -> Callable:
    from clear_cli.attention import clear_attention
    from clear_cli.attention.flex import flex_attention_clear

    geo = dict(text_len=t, grid=grid, window=r, down_factor=f)
    if name == "flash":
        return lambda q, k, v, dw: F.scaled_dot_product_attention(q, k, v)
    if name.startswith("flex:"):
        layout = name.split(":", 1)[1]
        return lambda q, k, v, dw: flex_attention_clear(q, k, v, down_weight=dw, layout=layout, **geo)
    return lambda q, k, v, dw: clear_attention(q, k, v, down_weight=dw, backend=name, **geo)


def kernel_pairs(name: str, grid, t: int, r: int, f: int, head_dim: int) -> tuple[int, str]:
    """(query-key pairs the kernel computes, how that was counted)."""
    from clear_cli.attention.counting import count_pairs, full_pairs

    if name == "flash":
        return full_pairs(grid, t), "full N^2"
    if name.startswith("flex:"):
        from clear_cli.attention.flex import layout_work
        return layout_work(grid, t, r, f, name.split(":", 1)[1])[0], "flex block schedule"
    if name == "tiled":
        from clear_cli.jobs.bench import schedule_work
        return schedule_work("tiled", grid, t, r, f, head_dim)[0], "tiled schedule"
    mod = triton_module() if name == "triton" else None
    for attr in ("schedule_work", "layout_work", "work"):
        fn = getattr(mod, attr, None)
        if callable(fn):
            try:
                got = fn(grid, t, r, f)
                return int(got[0] if isinstance(got, (tuple, list)) else got), f"{name} {attr}"
            except Exception:
                break
    return count_pairs(grid, t, r, f), "exact (kernel's own count not exposed)"


def _time(fn: Callable, repeats: int) -> tuple[float, float]:
    """(first call seconds, median of `repeats` more)."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times) if times else first


def _measured_flash(b: Bench, g: int, direction: str) -> dict | None:
    for other in b.data["attention"].values():
        k = other["kernels"].get("flash")
        if other["grid"] == [g, g] and other["direction"] == direction and k and "s" in k and not k.get("reused"):
            return k
    return None


def attention_case(b: Bench, res: str, r: int, f: int, direction: str) -> None:
    from clear_cli.attention.counting import attention_flops, count_pairs, full_pairs

    d = b.dims
    g, t, heads, hd = b.res[res], d["text_len"], d["heads"], d["head_dim"]
    grid, n, d_model = (g, g), d["text_len"] + g * g, heads * hd
    bwd = direction == "fwdbwd"
    key = f"{res}_r{r}_f{f}_{direction}"
    exact = count_pairs(grid, t, r, f)
    rec = b.data["attention"].setdefault(key, {
        "tokens": n, "grid": [g, g], "window": r, "down_factor": f, "direction": direction,
        "flop_ratio": full_pairs(grid, t) / exact, "exact_tflop": attention_flops(exact, d_model) / 1e12,
        "full_tflop": attention_flops(full_pairs(grid, t), d_model) / 1e12, "kernels": {}})
    factor = BWD_FLOP_FACTOR if bwd else 1.0
    try:
        q, k, v = (torch.randn(1, heads, n, hd, device=b.device, dtype=b.dtype, requires_grad=bwd) for _ in range(3))
        dw = torch.full((f, f), 1.0 / (f * f), device=b.device, dtype=b.dtype, requires_grad=bwd) if f > 1 else None
        gout = torch.randn_like(q) if bwd else None
    except Exception as e:
        b.error(f"attention {key}: inputs", e)
        return
    for name in kernel_names(b):
        if name in rec["kernels"]:
            continue
        if name == "flash":   # full attention is the same for every window and factor: measured once per size
            known = _measured_flash(b, g, direction)
            if known is not None:
                rec["kernels"]["flash"] = {**known, "reused": True}
                continue
        if bwd and name.startswith("flex:") and b.device.type != "cuda":
            rec["kernels"][name] = {"skipped": "FlexAttention has no backward on CPU"}
            continue
        pairs, basis = kernel_pairs(name, grid, t, r, f, hd)
        flops = attention_flops(pairs, d_model) * factor
        rate = RATE["flash_bwd" if bwd else "flash"] if name == "flash" else RATE["clear_bwd" if bwd else "clear"]
        run_s = flops / rate if b.device.type == "cuda" else 0.05
        repeats = 3 if run_s < 0.5 else 1
        compile_s = 0.0 if name == "flash" else b.compile_s["kernel_bwd" if bwd else "kernel"]
        if not b.fits(f"attention {key} {name}", compile_s + (1 + repeats) * run_s):
            continue
        fn = kernel_fn(name, grid, t, r, f)

        def call(fn=fn):
            if bwd:
                for x in (q, k, v, dw):
                    if x is not None:
                        x.grad = None   # fresh gradients each call: no accumulation pass in the timing
                fn(q, k, v, dw).backward(gout)
            else:
                with torch.no_grad():
                    fn(q, k, v, dw)

        b.data["current"] = f"attention {key} {name}"
        try:
            if b.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            first, med = _time(call, repeats)
            kr = {"s": med, "first_s": first, "repeats": repeats, "work_tflop": flops / 1e12, "work_basis": basis,
                  "tflops": flops / med / 1e12, "tflops_on_exact": attention_flops(exact, d_model) * factor / med / 1e12}
            if b.device.type == "cuda":
                kr["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            rec["kernels"][name] = kr
            if name != "flash":
                b.compile_s["kernel_bwd" if bwd else "kernel"] = max(min(first, 60.0), 1.0)
        except Exception as e:
            rec["kernels"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            b.error(f"attention {key} {name}", e)
            continue
        fl = rec["kernels"].get("flash", {}).get("s")
        if fl and name != "flash":
            kr["speedup"] = fl / med
            kr["efficiency"] = kr["speedup"] / rec["flop_ratio"]
        b.say(f"attention {key} {name}: {med * 1e3:.2f} ms (first {first:.1f} s), {kr['tflops']:.3g} TFLOP/s"
              + (f", {kr['speedup']:.1f}x flash" if "speedup" in kr else ""))
        b.save()
    del q, k, v
    if b.device.type == "cuda":
        torch.cuda.empty_cache()


def check_kernels(b: Bench, backward: bool) -> None:
    """Every CLEAR kernel against `reference` on a small ragged geometry (grid 24x40, T = 13, r = 5, f = 2: pooled
    keys, ragged 8x16 tiles), in the benchmark's dtype: max |error| of the output (and of the q/k/v gradients with
    `backward`); `reference` runs in fp32 on the same inputs."""
    from clear_cli.attention import clear_attention

    key = "fwdbwd" if backward else "fwd"
    heads, hd = (4, 64) if not b.smoke else (2, 16)
    h, w, t, r = 24, 40, 13, 5
    gen = torch.Generator(device="cpu").manual_seed(0)
    for f in (2,):
        base = [torch.randn(2, heads, t + h * w, hd, generator=gen).to(b.device, b.dtype) for _ in range(3)]
        dw = torch.rand(f, f, generator=gen).to(b.device, b.dtype) if f > 1 else None
        ref_in = [x.float().requires_grad_(backward) for x in base]
        ref = clear_attention(*ref_in, text_len=t, grid=(h, w), window=r, down_factor=f,
                              down_weight=None if dw is None else dw.float(), backend="reference")
        gout = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, ref_in, gout) if backward else None
        for name in kernel_names(b):
            if name == "flash":
                continue
            slot = b.data["check"].setdefault(name, {})
            label = f"{key}_f{f}"
            if label in slot:
                continue
            if backward and name.startswith("flex:") and b.device.type != "cuda":
                slot[label] = "skipped: FlexAttention has no backward on CPU"
                continue
            if not b.fits(f"check {name} {label}", b.compile_s["kernel_bwd" if backward else "kernel"] + 1):
                continue
            b.data["current"] = f"check {name} {label}"
            try:
                xs = [x.clone().requires_grad_(backward) for x in base]
                ctx = contextlib.nullcontext() if backward else torch.no_grad()
                with ctx:
                    out = kernel_fn(name, (h, w), t, r, f)(*xs, dw)
                err = {"out": float((out.float() - ref).abs().max())}
                if backward:
                    grads = torch.autograd.grad(out, xs, gout.to(out.dtype))
                    err["grad"] = max(float((a.float() - bb).abs().max()) for a, bb in zip(grads, ref_grads))
                slot[label] = err
                b.say(f"check {name} {label}: max |error| " + ", ".join(f"{k} {v:.2e}" for k, v in err.items()))
            except Exception as e:
                slot[label] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                b.error(f"check {name} {label}", e)
            b.save()


# ------------------------------------------------------------------------------------------------ steps

@contextlib.contextmanager
def truncated(model, n_double: int, n_single: int):
    """The first blocks only (a warm-up that compiles every graph variant of both block classes)."""
    from torch import nn

    d, s = model.transformer_blocks, model.single_transformer_blocks
    model.transformer_blocks = nn.ModuleList(list(d)[:n_double])
    model.single_transformer_blocks = nn.ModuleList(list(s)[:n_single])
    try:
        yield
    finally:
        model.transformer_blocks, model.single_transformer_blocks = d, s


def set_variant(b: Bench, model, variant: str, window: int) -> None:
    import clear_cli
    from clear_cli.models.compile import compile_transformer

    attention, mode = variant.split("_")
    if attention == "clear":
        clear_cli.linearize(model, window=window, backend=b.args.backend)
    else:
        clear_cli.unlinearize(model)
    compile_transformer(model, "on" if mode == "compiled" else "off", backend=b.compile_backend)


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def step_estimate(b: Bench, res: str, variant: str) -> float:
    attention, mode = variant.split("_")
    step = b.step_s[(res, attention)] if not b.smoke else 0.5
    blocks = b.dims["n_double"] + b.dims["n_single"]
    repeats = step_repeats(b, res)
    warm = 4 / blocks * step + (b.compile_s["step"] if mode == "compiled" else
                                (b.compile_s["kernel"] if attention == "clear" else 0.0))
    return warm + repeats * step


def step_repeats(b: Bench, res: str) -> int:
    return 3 if b.smoke or res in ("1k", "2k") else 1


def step_case(b: Bench, res: str, window: int, variants: tuple[str, ...]) -> None:
    key = f"{res}_r{window}"
    rec = b.data["steps"].setdefault(key, {"tokens": b.dims["text_len"] + b.res[res] ** 2, "window": window})
    for variant in variants:
        if variant in rec:
            continue
        if not b.fits(f"step {key} {variant}", step_estimate(b, res, variant)):
            continue
        b.data["current"] = f"step {key} {variant}"
        try:
            model = b.model()
            inputs = b.inputs(res)
            set_variant(b, model, variant, window)
            compiled = variant.endswith("compiled")
            warm_blocks = 2 if compiled else 1   # 2 + 2: every graph variant (a block's first input is laid out apart)
            with torch.no_grad():
                t = time.perf_counter()
                with truncated(model, warm_blocks, warm_blocks):
                    model(**inputs)
                sync()
                warm = time.perf_counter() - t
                graphs = _graphs()
                times = []
                for _ in range(step_repeats(b, res)):
                    sync()
                    t = time.perf_counter()
                    model(**inputs)
                    sync()
                    times.append(time.perf_counter() - t)
            s = statistics.median(times)
            vr = {"s": s, "runs": times, "warmup_s": warm, "warmup_blocks": 2 * warm_blocks}
            if _graphs() != graphs:
                vr["note"] = "compiled during the timed steps (the warm-up missed a graph)"
            if variant.startswith("clear"):
                vr["auto_kernel"] = auto_kernel(b, rec["tokens"], window)
            rec[variant] = vr
            attention = variant.split("_")[0]
            if not compiled:
                b.step_s[(res, attention)] = s
            else:
                b.compile_s["step"] = max(warm, 1.0)
            full = rec.get("full_eager", {}).get("s")
            for name in VARIANTS:
                if name in rec and isinstance(rec[name], dict) and "s" in rec[name] and full:
                    rec[name]["speedup_vs_full_eager"] = full / rec[name]["s"]
            fc, cc = rec.get("full_compiled", {}).get("s"), rec.get("clear_compiled", {}).get("s")
            if fc and cc:
                rec["clear_compiled_vs_full_compiled"] = fc / cc
            b.say(f"step {key} {variant}: {s:.3f} s (warm-up {warm:.1f} s)"
                  + (f", {vr['speedup_vs_full_eager']:.2f}x stock eager" if "speedup_vs_full_eager" in vr else ""))
            b.save()
        except Exception as e:
            rec[variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            b.error(f"step {key} {variant}", e)
            try:   # leave the model eager for what follows
                from clear_cli.models.compile import compile_transformer
                compile_transformer(b.model(), "off")
            except Exception:
                pass


def auto_kernel(b: Bench, tokens: int | None = None, window: int = 16) -> str:
    """Which kernel `auto` runs for a FLUX-size call of `tokens` on this device (the dispatcher's choice)."""
    try:
        from clear_cli.attention.kernels import choose_backend

        side = b.res["8k"] if tokens is None else int(round((tokens - b.dims["text_len"]) ** 0.5))
        shape = (1, b.dims["heads"], b.dims["text_len"] + side * side, b.dims["head_dim"])
        name, _why = choose_backend(b.device, b.dtype, shape, (side, side), b.dims["text_len"], window)
        if name == "flex":
            from clear_cli.attention.flex import choose_layout
            name += f":{choose_layout(window, b.device).name}"
        return name
    except Exception as e:  # the dispatcher's signature may change; the figure stays
        return f"unknown ({type(e).__name__})"


# ------------------------------------------------------------------------------------------------ sweep

def sweep_case(b: Bench, res: str, r: int, backward: bool) -> None:
    mod = triton_module()
    fn = getattr(mod, "sweep", None) if mod is not None else None
    key = f"{res}_r{r}_{'fwdbwd' if backward else 'fwd'}"
    if fn is not None and b.device.type != "cuda":
        fn, mod = None, None   # the sweep times Triton kernels on a GPU; the CPU smoke run records that
    if fn is None:
        b.data["sweep"] = {"status": "not available" + ("" if mod is None else f" ({mod.__name__} has no sweep)")
                           + ("" if b.device.type == "cuda" else " (needs CUDA)")}
        b.save()
        return
    budget = min(90.0, b.left() - 5)
    if not b.fits(f"sweep {key}", min(60.0, budget)):
        return
    d = b.dims
    offered = dict(grid=(b.res[res],) * 2, text_len=d["text_len"], window=r, down_factor=1, heads=d["heads"],
                   head_dim=d["head_dim"], dtype=b.dtype, device=b.device, backward=backward, budget_s=budget,
                   log=b.say)
    try:
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in offered.items() if k in params}
        b.data["current"] = f"sweep {key}"
        t = time.perf_counter()
        result = fn(**kwargs)
        b.data["sweep"][key] = {"result": result, "s": time.perf_counter() - t}
        for attr in ("CANDIDATES", "CONFIGS", "CANDIDATE_CONFIGS", "candidate_configs"):
            if hasattr(mod, attr):
                cand = getattr(mod, attr)
                cand = cand() if callable(cand) else cand
                b.data["sweep"]["candidates"] = [getattr(c, "name", None) or str(c) for c in cand]
                break
        b.say(f"sweep {key}: {str(result)[:200]}")
    except Exception as e:
        b.data["sweep"][key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        b.error(f"sweep {key}", e)
    b.save()


# ------------------------------------------------------------------------------------------------ plan

def attention_estimate(b: Bench, res: str, r: int, f: int, direction: str) -> float:
    from clear_cli.attention.counting import attention_flops, full_pairs

    g = b.res[res]
    d_model = b.dims["heads"] * b.dims["head_dim"]
    bwd = direction == "fwdbwd"
    if b.smoke:
        return 0.5 * len(kernel_names(b))
    total = 0.0
    for name in kernel_names(b):
        if name == "flash":
            flops = attention_flops(full_pairs((g, g), b.dims["text_len"]), d_model) * (BWD_FLOP_FACTOR if bwd else 1)
            run = flops / RATE["flash_bwd" if bwd else "flash"]
            total += 2 * run
            continue
        pairs, _ = kernel_pairs(name, (g, g), b.dims["text_len"], r, f, b.dims["head_dim"])
        run = attention_flops(pairs, d_model) * (BWD_FLOP_FACTOR if bwd else 1) / RATE["clear_bwd" if bwd else "clear"]
        total += b.compile_s["kernel_bwd" if bwd else "kernel"] + (4 if run < 0.5 else 2) * run
    return total


def build_plan(b: Bench) -> list[Item]:
    items: list[Item] = []

    def attn(res, r, f, direction):
        items.append(Item(f"attention {res} r={r} f={f} {direction}",
                          lambda: attention_estimate(b, res, r, f, direction),
                          lambda: attention_case(b, res, r, f, direction)))

    def step(res, r, variants):
        items.append(Item(f"step {res} r={r} {'+'.join(variants)}",
                          lambda: sum(step_estimate(b, res, v) for v in variants),
                          lambda: step_case(b, res, r, variants)))

    def check(backward):
        items.append(Item(f"check kernels {'fwd+bwd' if backward else 'fwd'}",
                          lambda: (len(kernel_names(b)) - 1) * (b.compile_s["kernel_bwd" if backward else "kernel"] + 1),
                          lambda: check_kernels(b, backward)))

    def sweep(res, r, backward):
        items.append(Item(f"sweep {res} r={r} {'fwd+bwd' if backward else 'fwd'}", lambda: 60.0,
                          lambda: sweep_case(b, res, r, backward)))

    attn("8k", 16, 1, "fwd")
    step("8k", 16, ("clear_compiled", "full_eager", "clear_eager"))
    step("4k", 16, ("clear_compiled", "full_eager", "clear_eager"))
    step("1k", 16, ("full_eager", "clear_eager"))
    check(False)
    attn("8k", 8, 1, "fwd")
    step("8k", 16, ("full_compiled",))
    step("4k", 16, ("full_compiled",))
    step("1k", 16, ("clear_compiled", "full_compiled"))
    sweep("8k", 16, False)
    attn("8k", 16, 1, "fwdbwd")
    check(True)
    for res in ("4k", "2k", "1k"):
        for r in (16, 8):
            attn(res, r, 1, "fwd")
    step("8k", 8, ("clear_compiled", "clear_eager"))
    sweep("8k", 8, False)
    sweep("8k", 16, True)
    done = {(i.name) for i in items}
    for direction in ("fwd", "fwdbwd"):
        for res in ("8k", "4k", "2k", "1k"):
            for f in (1, 4):
                for r in (8, 16, 32):
                    name = f"attention {res} r={r} f={f} {direction}"
                    if name not in done:
                        attn(res, r, f, direction)
    return items


def env_section(b: Bench) -> None:
    e = b.data["env"]
    e["torch"] = torch.__version__
    e["device"] = torch.cuda.get_device_name() if b.device.type == "cuda" else "cpu"
    if b.device.type == "cuda":
        e["capability"] = list(torch.cuda.get_device_capability())
    e["dtype"] = str(b.dtype).replace("torch.", "")
    e["dims"] = b.dims
    e["budget_s"] = b.budget
    e["compile_backend"] = b.compile_backend
    e["smoke"] = b.smoke
    for mod in ("diffusers", "triton"):
        try:
            e[mod] = importlib.import_module(mod).__version__
        except Exception as ex:
            e[mod] = f"missing ({type(ex).__name__})"
    import clear_cli
    from clear_cli.attention import BACKENDS
    from clear_cli.attention.flex import LAYOUT_TABLE, LAYOUTS

    e["clear_cli"] = clear_cli.__version__
    e["backends"] = list(BACKENDS)
    e["flex_layouts"] = {k: {"q_tile": v.q_tile, "kv_tile": v.kv_tile, "text_queries": v.text_queries}
                         for k, v in LAYOUTS.items()}
    e["flex_layout_table"] = {f"{k[0]}/{k[1]}": list(v) for k, v in LAYOUT_TABLE.items()}
    e["auto_kernel"] = auto_kernel(b)
    mod = triton_module()
    e["triton_module"] = mod.__name__ if mod is not None else "not available"
    b.save()


def table(b: Bench) -> str:
    lines = [f"device: {b.data['env'].get('device')}, torch {b.data['env'].get('torch')}, "
             f"{b.data['elapsed_s']:.0f} s"]
    for key, rec in b.data["attention"].items():
        cells = []
        for name, k in rec["kernels"].items():
            if "s" in k:
                cells.append(f"{name} {k['s'] * 1e3:.2f} ms {k['tflops']:.3g} TF/s"
                             + (f" {k['speedup']:.1f}x" if "speedup" in k else ""))
        if cells:
            lines.append(f"attention {key} (FLOP ratio {rec['flop_ratio']:.0f}x): " + "; ".join(cells))
    for key, rec in b.data["steps"].items():
        cells = [f"{v} {rec[v]['s']:.3f} s" + (f" ({rec[v]['speedup_vs_full_eager']:.2f}x)"
                                               if "speedup_vs_full_eager" in rec[v] else "")
                 for v in VARIANTS if isinstance(rec.get(v), dict) and "s" in rec[v]]
        if cells:
            lines.append(f"step {key}: " + "; ".join(cells))
    for name, c in b.data["check"].items():
        lines.append(f"check {name}: {c}")
    if b.data["sweep"]:
        lines.append(f"sweep: {str(b.data['sweep'])[:300]}")
    lines += [f"skipped: {s}" for s in b.data["skipped"]]
    lines += [f"error: {e}" for e in b.data["errors"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the code paths, not speed)")
    ap.add_argument("--plan", action="store_true", help="print the plan with H200 estimates and exit")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu_bench"))
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("BUDGET_S", 430)),
                    help="start no measurement expected to end after this many seconds")
    ap.add_argument("--only", default="", help="comma list: run only plan items whose name contains one of these")
    ap.add_argument("--skip", default="", help="comma list: leave out plan items whose name contains one of these")
    ap.add_argument("--backend", default="auto", help="CLEAR backend of the whole steps")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; smoke: aot_eager)")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype, dims, res = torch.device("cpu"), torch.float32, SMOKE_DIMS, SMOKE_RES
    elif args.plan or torch.cuda.is_available():
        device, dtype, dims, res = torch.device("cuda"), torch.bfloat16, FLUX_DIMS, GPU_RES
    else:
        print("no CUDA device: run with --smoke for a CPU check, or --plan for the plan", file=sys.stderr)
        return 2
    b = Bench(args, device, dtype, dims, res)
    import torch._dynamo as dynamo
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dynamo.config, name):   # many shapes and layouts in one process
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 4096))
    items = build_plan(b)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    items = [i for i in items if (not only or any(s in i.name for s in only)) and not any(s in i.name for s in skip)]
    if args.plan:
        total = 0.0
        for i in items:
            est = i.est()
            total += est
            print(f"{total:7.0f} s  (+{est:6.1f})  {i.name}")
        print(f"budget {args.budget_s:.0f} s: items past it are skipped (estimates adapt to measured times)")
        return 0

    def on_term(signum, frame):   # `timeout` sends TERM first: say what was running, keep the figures
        b.data["errors"].append(f"stopped by signal {signum} during {b.data.get('current')}")
        b.save()
        sys.exit(124)

    signal.signal(signal.SIGTERM, on_term)
    env_section(b)
    b.say(f"{b.data['env']}")
    b.data["plan"] = [i.name for i in items]
    for item in items:
        if b.left() <= 0:
            b.data["skipped"].append(f"{item.name}: out of time")
            continue
        try:
            item.run()
        except Exception as e:
            b.error(item.name, e)
    b.data["current"] = None
    b.save()
    print("\n" + table(b), flush=True)
    print(f"figures: {b.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
