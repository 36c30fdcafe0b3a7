"""GPU benchmark of 3-D CLEAR at Wan 2.1 sizes (random weights, bf16, built on the GPU), in one run, most important
first; an item expected to end past the budget is skipped and listed:
  1. correctness on the card: the Triton kernel against `reference` in bf16 and fp16, forward and backward, on small
     3-D grids (the interpreter cannot check bf16);
  2. attention alone, one layer, Wan 14B (40 x 128) at 720p and 480p, 81 frames, r = 16 / r_t = 4 and r = 8 / r_t = 2:
     flash SDPA against `triton` (and `flex`), forward, then forward + backward;
  3. whole transformer steps (one forward of WanTransformer3DModel) at Wan 1.3B and 14B, 480p and 720p: stock
     (diffusers' processors) against CLEAR (`clear_cli.linearize(..., window, time_window)`, triton), eager.
Figures go to OUT/wan_gpu.json after every measurement.

    bash bench/wan_gpu.sh                 # on the GPU (carry .whl as for bench/gpu.sh), at most ~8 minutes
    python bench/wan_gpu.py --smoke       # every section on the CPU at tiny sizes (checks the code paths)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from clear_cli.attention.counting import attention_flops
from clear_cli.attention.video_geometry import count_video_pairs, full_video_pairs, reference_video_attention
from clear_cli.attention.video_kernels import clear_video_attention
from clear_cli.attention.video_sizes import SIZES, wan_token_grid

WAN = {  # diffusers WanTransformer3DModel configs of Wan 2.1 T2V
    "1.3b": dict(num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, ffn_dim=13824, num_layers=40),
    "tiny": dict(num_attention_heads=2, ffn_dim=32, num_layers=2),
}
COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
              freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _time(fn, repeats: int, device) -> float:
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def correctness(device, smoke: bool) -> list[dict]:
    rows = []
    dtypes = (torch.float32,) if smoke else (torch.bfloat16, torch.float16)
    for grid, r, rt, g in (((5, 9, 13), 4, 2, 0), ((4, 8, 16), 6, 3, 3), ((3, 7, 10), 3, 0, 0)):
        for dt in dtypes:
            n = g + grid[0] * grid[1] * grid[2]
            gen = torch.Generator(device=device).manual_seed(0)
            x = [torch.randn(1, n, 4, 64, device=device, dtype=dt, generator=gen).transpose(1, 2) for _ in range(4)]
            leaves = [t.detach().requires_grad_(True) for t in x[:3]]
            kw = dict(text_len=g, grid=grid, window=r, time_window=rt)
            out = clear_video_attention(*leaves, backend="triton" if not smoke else "tiled", **kw)
            grads = torch.autograd.grad(out, leaves, x[3])
            ref_l = [t.detach().float().requires_grad_(True) for t in x[:3]]
            ref = reference_video_attention(*ref_l, **kw)
            ref_g = torch.autograd.grad(ref, ref_l, x[3].float())
            err = {nm: float((a.detach().float() - b.detach()).abs().max() / max(1.0, float(b.detach().abs().max())))
                   for nm, a, b in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref, *ref_g])}
            rows.append({"grid": grid, "window": r, "time_window": rt, "global": g, "dtype": str(dt), "rel_err": err})
    return rows


def attention(device, dtype, smoke: bool, repeats: int):
    sizes = [("tiny", (3, 6, 8))] if smoke else [(s, wan_token_grid(81, *SIZES[s])) for s in ("720p", "480p")]
    heads = 2 if smoke else 40
    backends = ["tiled"] if smoke else ["triton", "flex"]
    for size, grid in sizes:
        n = grid[0] * grid[1] * grid[2]
        q, k, v = (torch.randn(1, n, heads, 128, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
        for r, rt in ((16, 4), (8, 2)):
            exact, full = count_video_pairs(grid, 0, r, rt), full_video_pairs(grid, 0)
            row = {"size": size, "grid": grid, "window": r, "time_window": rt, "flop_ratio": full / exact,
                   "full_tflop": attention_flops(full, heads * 128) / 1e12, "fwd_s": {}, "fwd_bwd_s": {}, "errors": {}}
            fns = {"flash": lambda: F.scaled_dot_product_attention(q, k, v)}
            for b in backends:
                fns[b] = (lambda b=b: clear_video_attention(q, k, v, grid=grid, window=r, time_window=rt, backend=b))
            for name, fn in fns.items():
                try:
                    with torch.no_grad():
                        row["fwd_s"][name] = _time(fn, repeats, device)
                    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                    do = torch.randn_like(q)

                    def step(name=name, leaves=leaves, do=do):
                        out = (F.scaled_dot_product_attention(*leaves) if name == "flash" else
                               clear_video_attention(*leaves, grid=grid, window=r, time_window=rt, backend=name))
                        torch.autograd.grad(out, leaves, do)

                    row["fwd_bwd_s"][name] = _time(step, repeats, device)
                except Exception as e:  # a kernel that fails here: recorded, the run goes on
                    row["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            yield row


def steps(device, dtype, smoke: bool, repeats: int):
    from diffusers import WanTransformer3DModel

    import clear_cli

    plan = [("tiny", (9, 64, 96))] if smoke else [("1.3b", (81, 832, 480)), ("1.3b", (81, 1280, 720)),
                                                   ("14b", (81, 1280, 720)), ("14b", (81, 832, 480))]
    for model, (frames, w, h) in plan:
        cfg = dict(COMMON, **WAN[model])
        if smoke:
            cfg.update(attention_head_dim=16, text_dim=32, in_channels=4, out_channels=4)
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                tr = WanTransformer3DModel(**cfg).eval()
        finally:
            torch.set_default_dtype(prev)
        lat = (1, cfg["in_channels"], (frames - 1) // 4 + 1, h // 8, w // 8)
        x = torch.randn(lat, device=device, dtype=dtype)
        ctx = torch.randn(1, 512, cfg["text_dim"], device=device, dtype=dtype)
        ts = torch.tensor([500], device=device)
        row = {"model": model, "frames": frames, "size": f"{w}x{h}", "step_s": {}}
        with torch.no_grad():
            row["step_s"]["stock"] = _time(lambda: tr(x, ts, ctx), repeats, device)
            for r, rt in ((16, 4), (8, 2)):
                clear_cli.linearize(tr, window=r, time_window=rt, backend="tiled" if smoke else "triton")
                row["step_s"][f"clear r{r} rt{rt}"] = _time(lambda: tr(x, ts, ctx), repeats, device)
            clear_cli.unlinearize(tr)
        del tr
        if device.type == "cuda":
            torch.cuda.empty_cache()
        yield row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out/wan_gpu"))
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the code paths only")
    a = ap.parse_args()
    start = time.perf_counter()
    device = torch.device("cpu" if a.smoke else "cuda")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    os.makedirs(a.out, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "skipped": []}

    def save():
        with open(os.path.join(a.out, "wan_gpu.json.tmp"), "w") as f:
            json.dump(res, f, indent=1)
        os.replace(os.path.join(a.out, "wan_gpu.json.tmp"), os.path.join(a.out, "wan_gpu.json"))

    res["correctness"] = correctness(device, a.smoke)
    save()
    print(json.dumps(res["correctness"]), flush=True)
    for section, gen in (("attention", attention(device, dtype, a.smoke, a.repeats)),
                         ("steps", steps(device, dtype, a.smoke, a.repeats))):
        res[section] = []
        for row in gen:
            res[section].append(row)
            save()
            print(json.dumps(row), flush=True)
            if time.perf_counter() - start > a.budget_s:
                res["skipped"].append(f"the rest of {section} and after: budget {a.budget_s:.0f} s spent")
                break
        if res["skipped"]:
            break
    save()


if __name__ == "__main__":
    main()
