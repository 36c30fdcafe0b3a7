"""GPU benchmark of CLEAR on FLUX-size blocks (random weights, bf16, built directly on the GPU).

Sections, each guarded (a failure is recorded and the next section runs), largest resolution first:
  1. mask building: FlexAttention block mask for 8K from the geometry (cold);
  2. attention kernel alone: full SDPA (flash) vs CLEAR (flex) at 8K, 4K, 2K, 1K, r = 16 (then r = 8 if time);
  3. one double block and one single block (FLUX dims: 3072, 24 heads x 128, T = 512), full vs CLEAR,
     extrapolated to a 57-block step (19 double + 38 single);
  4. a whole FLUX-size transformer step at 4K (random weights), full vs CLEAR, the first CLEAR call (compile,
     permutation and mask building) timed apart.
Figures go to $OUT/gpu_bench.json after every measurement; a short table is printed last.
Usage: bash bench/gpu.sh   (or python bench/gpu_bench.py [--smoke] [--out DIR] [--budget-s 220])
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

T0 = time.perf_counter()
RES = {"8k": 512, "4k": 256, "2k": 128, "1k": 64}


class Bench:
    def __init__(self, out_dir: str, budget_s: float, smoke: bool):
        self.path = os.path.join(out_dir, "gpu_bench.json")
        os.makedirs(out_dir, exist_ok=True)
        self.budget = budget_s
        self.smoke = smoke
        self.data: dict = {"env": {}, "mask_build": {}, "attention": {}, "blocks": {}, "step": {}, "errors": []}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - T0)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - T0, 2)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def error(self, where: str, e: BaseException) -> None:
        msg = f"{where}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print("  FAILED", msg, flush=True)
        self.data["errors"].append(msg)
        if os.environ.get("CLEAR_DEBUG"):
            traceback.print_exc()
        self.save()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 2, warmup: int = 1) -> tuple[float, float]:
    """(first call seconds, median of `repeats` later calls)."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t
    for _ in range(warmup - 1):
        fn()
    ts = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return first, statistics.median(ts)


def section_env(b: Bench, device, dims) -> None:
    e = b.data["env"]
    e["torch"] = torch.__version__
    e["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    e["dims"] = dims
    try:
        import diffusers
        e["diffusers"] = diffusers.__version__
    except Exception as ex:  # blocks fall back to the kernel-only figures
        e["diffusers"] = f"missing ({type(ex).__name__})"
    b.save()


def section_mask(b: Bench, device, res_list, window) -> None:
    from clear_cli.attention import flex as flex_mod
    for res in res_list[:1]:
        g = RES.get(res, 0) or int(res)
        try:
            qt, kt = flex_mod.default_tiles(window, device)
            flex_mod.flex_plan.cache_clear()
            sync()
            t = time.perf_counter()
            flex_mod.flex_plan((g, g), b.data["env"]["dims"]["text_len"], window, 1, qt, kt, device)
            sync()
            b.data["mask_build"][f"{res}_r{window}"] = round(time.perf_counter() - t, 4)
            print(f"mask build {res} r={window}: {b.data['mask_build'][f'{res}_r{window}']:.3f} s", flush=True)
            b.save()
        except Exception as e:
            b.error(f"mask {res}", e)


def section_attention(b: Bench, device, dtype, res_list, windows, dims, backend) -> None:
    from clear_cli.attention import clear_attention, count_pairs
    from clear_cli.attention.counting import full_pairs
    heads, hd, t = dims["heads"], dims["head_dim"], dims["text_len"]
    for window in windows:
        for res in res_list:
            if b.left() < 40:
                b.data["errors"].append(f"attention {res} r={window}: skipped, out of time")
                return
            g = RES.get(res, 0) or int(res)
            key = f"{res}_r{window}"
            rec = b.data["attention"].setdefault(key, {"tokens": t + g * g})
            try:
                q, k, v = (torch.randn(1, heads, t + g * g, hd, device=device, dtype=dtype) for _ in range(3))
                rec["flop_ratio"] = full_pairs((g, g), t) / count_pairs((g, g), t, window)
                with torch.no_grad():
                    if window == windows[0] and "full_s" not in rec:
                        first, med = timed(lambda: F.scaled_dot_product_attention(q, k, v))
                        rec["full_s"] = med
                        # same resolution, other windows reuse the full time
                        for w2 in windows[1:]:
                            b.data["attention"].setdefault(f"{res}_r{w2}", {"tokens": t + g * g})["full_s"] = med
                    first, med = timed(lambda: clear_attention(q, k, v, text_len=t, grid=(g, g), window=window,
                                                               backend=backend), repeats=3)
                    rec["clear_first_s"], rec["clear_s"] = first, med
                full_s = rec.get("full_s") or b.data["attention"].get(key, {}).get("full_s")
                if full_s:
                    rec["speedup"] = full_s / med
                    rec["efficiency"] = rec["speedup"] / rec["flop_ratio"]
                print(f"attention {key}: full {full_s}, clear {med:.4f} s (first {first:.1f} s), "
                      f"speedup {rec.get('speedup', float('nan')):.1f}x", flush=True)
                b.save()
                del q, k, v
            except Exception as e:
                b.error(f"attention {key}", e)


def _flux_config(dims, double: int, single: int) -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                attention_head_dim=dims["head_dim"], num_attention_heads=dims["heads"],
                joint_attention_dim=dims["joint_dim"], pooled_projection_dim=dims["pooled_dim"],
                guidance_embeds=True, axes_dims_rope=dims["rope"])


def _flux_inputs(dims, g: int, device, dtype) -> dict:
    t = dims["text_len"]
    ids = torch.zeros(g, g, 3, device=device)
    ids[..., 1] = torch.arange(g, device=device)[:, None]
    ids[..., 2] = torch.arange(g, device=device)[None, :]
    return dict(hidden_states=torch.randn(1, g * g, 64, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, t, dims["joint_dim"], device=device, dtype=dtype),
                pooled_projections=torch.randn(1, dims["pooled_dim"], device=device, dtype=dtype),
                timestep=torch.tensor([0.5], device=device, dtype=dtype),
                guidance=torch.tensor([3.5], device=device, dtype=dtype),
                img_ids=ids.reshape(-1, 3).to(dtype), txt_ids=torch.zeros(t, 3, device=device, dtype=dtype),
                return_dict=False)


def _build(dims, double: int, single: int, device, dtype):
    from diffusers import FluxTransformer2DModel
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**_flux_config(dims, double, single))
    finally:
        torch.set_default_dtype(prev)
    return model.eval().requires_grad_(False)


def section_blocks(b: Bench, device, dtype, res_list, window, dims, backend) -> None:
    import clear_cli
    try:
        models = {"double": _build(dims, 1, 0, device, dtype), "single": _build(dims, 0, 1, device, dtype)}
    except Exception as e:
        b.error("blocks: build", e)
        return
    for res in res_list:
        if b.left() < 60:
            b.data["errors"].append(f"blocks {res}: skipped, out of time")
            break
        g = RES.get(res, 0) or int(res)
        rec = b.data["blocks"].setdefault(f"{res}_r{window}", {})
        try:
            inputs = _flux_inputs(dims, g, device, dtype)
            with torch.no_grad():
                for kind, m in models.items():
                    clear_cli.unlinearize(m) if _is_linear(m) else None
                    _, rec[f"{kind}_full_s"] = timed(lambda: m(**inputs), repeats=2)
                    clear_cli.linearize(m, window=window, backend=backend)
                    first, rec[f"{kind}_clear_s"] = timed(lambda: m(**inputs), repeats=2)
                    rec[f"{kind}_clear_first_s"] = first
                    clear_cli.unlinearize(m)
                    b.save()
            n_d, n_s = dims["n_double"], dims["n_single"]
            rec["step_full_s"] = n_d * rec["double_full_s"] + n_s * rec["single_full_s"]
            rec["step_clear_s"] = n_d * rec["double_clear_s"] + n_s * rec["single_clear_s"]
            rec["step_speedup"] = rec["step_full_s"] / rec["step_clear_s"]
            print(f"blocks {res}: double {rec['double_full_s']:.4f} -> {rec['double_clear_s']:.4f} s, single "
                  f"{rec['single_full_s']:.4f} -> {rec['single_clear_s']:.4f} s; 57-block step "
                  f"{rec['step_full_s']:.2f} -> {rec['step_clear_s']:.2f} s ({rec['step_speedup']:.1f}x)", flush=True)
            b.save()
            del inputs
        except Exception as e:
            b.error(f"blocks {res}", e)
    del models
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_linear(m) -> bool:
    from clear_cli.attention.linearize import is_linearized
    return is_linearized(m)


def section_step(b: Bench, device, dtype, res, window, dims, backend) -> None:
    import clear_cli
    if b.left() < 75:
        b.data["errors"].append(f"step {res}: skipped, out of time")
        return
    g = RES.get(res, 0) or int(res)
    rec = b.data["step"].setdefault(f"{res}_r{window}", {})
    try:
        t = time.perf_counter()
        model = _build(dims, dims["n_double"], dims["n_single"], device, dtype)
        sync()
        rec["build_s"] = time.perf_counter() - t
        inputs = _flux_inputs(dims, g, device, dtype)
        with torch.no_grad():
            _, rec["full_s"] = timed(lambda: model(**inputs), repeats=1)
            b.save()
            clear_cli.linearize(model, window=window, backend=backend)
            from clear_cli.attention import flex as flex_mod
            flex_mod.flex_plan.cache_clear()      # the first call builds the masks (and compiles)
            rec["clear_first_s"], rec["clear_s"] = timed(lambda: model(**inputs), repeats=2)
        rec["speedup"] = rec["full_s"] / rec["clear_s"]
        print(f"step {res}: full {rec['full_s']:.2f} s, CLEAR {rec['clear_s']:.2f} s ({rec['speedup']:.1f}x), "
              f"first CLEAR call {rec['clear_first_s']:.1f} s", flush=True)
        b.save()
    except Exception as e:
        b.error(f"step {res}", e)


def table(b: Bench) -> str:
    lines = [f"device: {b.data['env'].get('device')}, torch {b.data['env'].get('torch')}"]
    for k, v in b.data["attention"].items():
        if "clear_s" in v:
            lines.append(f"attention {k:<8} full {v.get('full_s', float('nan')):8.4f} s  CLEAR {v['clear_s']:8.4f} s"
                         f"  {v.get('speedup', float('nan')):6.1f}x  eff {v.get('efficiency', float('nan')):.2f}")
    for k, v in b.data["blocks"].items():
        if "step_speedup" in v:
            lines.append(f"57-block step {k:<8} full {v['step_full_s']:8.2f} s  CLEAR {v['step_clear_s']:8.2f} s"
                         f"  {v['step_speedup']:6.1f}x")
    for k, v in b.data["step"].items():
        if "speedup" in v:
            lines.append(f"whole step {k:<8} full {v['full_s']:8.2f} s  CLEAR {v['clear_s']:8.2f} s  "
                         f"{v['speedup']:6.1f}x  (first CLEAR call {v['clear_first_s']:.1f} s)")
    for k, v in b.data["mask_build"].items():
        lines.append(f"mask build {k}: {v:.3f} s")
    for e in b.data["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (checks the script, not the speed)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out/gpu_bench"))
    ap.add_argument("--budget-s", type=float, default=220.0, help="stop starting new work after this many seconds")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    b = Bench(args.out, args.budget_s, args.smoke)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        dims = dict(heads=2, head_dim=16, text_len=8, joint_dim=32, pooled_dim=16, rope=(4, 6, 6),
                    n_double=19, n_single=38)
        res_list, windows, step_res = ["48", "32", "16"], [4, 2], "16"
        RES.update({"48": 48, "32": 32, "16": 16})
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --smoke for a CPU check", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        dims = dict(heads=24, head_dim=128, text_len=512, joint_dim=4096, pooled_dim=768, rope=(16, 56, 56),
                    n_double=19, n_single=38)
        res_list, windows, step_res = ["8k", "4k", "2k", "1k"], [16, 8], "4k"
    section_env(b, device, dims)
    print(f"[{time.perf_counter() - T0:.0f}s] {b.data['env']}", flush=True)
    if device.type == "cuda":
        section_mask(b, device, res_list, windows[0])
    section_attention(b, device, dtype, res_list, windows[:1], dims, args.backend)
    if "missing" not in str(b.data["env"].get("diffusers")):
        section_blocks(b, device, dtype, res_list, windows[0], dims, args.backend)
        section_step(b, device, dtype, step_res, windows[0], dims, args.backend)
    section_attention(b, device, dtype, res_list[:2], windows[1:], dims, args.backend)
    b.save()
    print("\n" + table(b), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
