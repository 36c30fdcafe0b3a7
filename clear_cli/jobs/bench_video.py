"""`clear bench video`: work counts and measured speed of full attention against 3-D CLEAR on video grids.

Per size: the (T, H, W) token grid (Wan 2.1: VAE 4x8x8, patch 1x2x2), full / exact / paper-formula FLOPs of one
self-attention layer, the Triton schedule's video-to-video work / exact (the config a bf16 GPU call would use), the
tiled schedule's, the whole-layer FLOP ratio (linear layers, FFN and cross-attention included: the ceiling for a
whole step) and, unless `timing` is off, medians of full SDPA and each backend (`auto` timed under what it runs).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from clear_cli.attention.counting import attention_flops
from clear_cli.attention.video_geometry import (count_video_pairs, full_video_pairs, paper_video_pairs,
                                                video_image_pairs)
from clear_cli.attention.video_sizes import FRAMES, MODELS, SIZES, layer_linear_flops, wan_token_grid
from clear_cli.config import doc, merge_options
from clear_cli.jobs.bench import BenchResult
from clear_cli.logs import Log, sayer


@dataclass
class VideoBenchConfig:
    res: list[str] = doc(["480p", "720p"], "Video sizes: 480p, 720p (Wan 2.1) or WxH pixels (multiples of 16), "
                                           "comma-separated.", cli_split=",")
    frames: int = doc(FRAMES, "Pixel frames (4k + 1; Wan: 81 -> 21 latent frames).")
    window: int = doc(16, "Spatial window radius in tokens.")
    time_window: int = doc(4, "Temporal window radius in latent frames (0 = the same frame only).")
    wan: str = doc("14b", f"Wan 2.1 shape for the heads and the whole-layer ratio: {', '.join(MODELS)}.")
    heads: int = doc(0, "Attention heads (0: the Wan shape's).")
    head_dim: int = doc(128, "Head dimension.")
    batch_size: int = doc(1, "Batch size.")
    device: str = doc("auto", "auto, cpu, cuda, cuda:N.")
    dtype: str = doc("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")
    backends: list[str] = doc(["auto"], "3-D CLEAR backends to time, comma-separated: auto, tiled, flex, triton, "
                                        "reference.", cli_split=",")
    repeats: int = doc(3, "Timed repeats per kernel (after one warm-up); medians are reported.")
    max_full_tflop: float = doc(0.0, "Skip timing full attention above this many TFLOPs (0: 2 on CPU, 2000 on CUDA).")
    timing: bool = doc(True, "Measure times (off: work counts only).")


def video_grid(size: str, frames: int) -> tuple[int, int, int]:
    """(T, H, W) tokens of a named Wan size or WxH pixels."""
    s = size.strip().lower()
    if s in SIZES:
        w, h = SIZES[s]
    else:
        try:
            w, h = (int(x) for x in s.replace("*", "x").split("x"))
        except ValueError:
            raise ValueError(f"video size {size!r} is not {', '.join(SIZES)} or WxH pixels") from None
    return wan_token_grid(frames, w, h)


def video_schedules(grid: tuple[int, int, int], window: int, time_window: int, head_dim: int = 128) -> dict:
    """{backend: video-to-video pairs computed / exact} for the tiled and (bf16 GPU default) Triton schedules."""
    import torch

    from clear_cli.attention.video_plan import default_video_config, video_kernel_work
    from clear_cli.attention.video_tiled import choose_video_tile, video_tile_key_offsets

    exact = video_image_pairs(grid, window, time_window)
    tile = choose_video_tile(grid, window, time_window, head_dim, 0)
    slots = 1
    for g, s in zip(grid, tile):
        slots *= -(-g // s) * s
    cfg = default_video_config(grid, window, time_window, head_dim, torch.bfloat16)
    halo = len(video_tile_key_offsets(tile, window, time_window, grid))
    return {
        "tiled": {"tile": list(tile), "work_over_exact": slots * halo / exact},
        "triton": {"config": cfg.name, "work_over_exact": video_kernel_work(grid, 0, window, time_window, cfg)[1]
                   / exact},
    }


def bench_video_attention(config: VideoBenchConfig | None = None, *, log: Log | None = None,
                          progress: bool = True, **options: Any) -> BenchResult:
    """Run the benchmark; one row per size. `config` or keyword `options` (VideoBenchConfig fields)."""
    cfg = merge_options(VideoBenchConfig, config, options, job="bench_video_attention")
    from clear_cli.devices import resolve_device, resolve_dtype

    if cfg.wan not in MODELS:
        raise ValueError(f"wan {cfg.wan!r} is not one of {', '.join(MODELS)}")
    say = sayer(log)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    rows = []
    for size in cfg.res:
        row = _count_row(cfg, size)
        rows.append(row)
        say(f"{size}: {'x'.join(map(str, row['grid']))} = {row['tokens']} tokens, full {row['full_tflop']:.2f} "
            f"TFLOP, CLEAR exact {row['exact_tflop']:.3f} ({row['flop_ratio']:.1f}x)")
        if cfg.timing:
            _time_row(cfg, row, device, dtype)
            say("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["times_s"].items()))
    return BenchResult(rows)


def _count_row(cfg: VideoBenchConfig, size: str) -> dict:
    """Counts of one size: tokens, FLOPs (full / exact / paper), schedule work, whole-layer ratio."""
    grid = video_grid(size, cfg.frames)
    n = grid[0] * grid[1] * grid[2]
    r, rt = cfg.window, cfg.time_window
    d_model_w, heads_w, _, ffn = MODELS[cfg.wan]
    d_model = (cfg.heads or heads_w) * cfg.head_dim
    exact, full = count_video_pairs(grid, 0, r, rt), full_video_pairs(grid, 0)
    per_token, per_clip = layer_linear_flops(d_model_w, ffn)
    linear = per_token * n + per_clip
    attn_full, attn_exact = attention_flops(full, d_model_w), attention_flops(exact, d_model_w)
    return {
        "size": size, "frames": cfg.frames, "grid": list(grid), "tokens": n, "window": r, "time_window": rt,
        "wan": cfg.wan, "full_tflop": attention_flops(full, d_model) / 1e12,
        "exact_tflop": attention_flops(exact, d_model) / 1e12,
        "paper_tflop": attention_flops(paper_video_pairs(grid, 0, r, rt), d_model) / 1e12,
        "flop_ratio": full / exact, "volume_share": exact / full,
        "attention_share_full": attn_full / (attn_full + linear),
        "layer_flop_ratio": (linear + attn_full) / (linear + attn_exact),
        "schedules": video_schedules(grid, r, rt, cfg.head_dim),
        "times_s": {}, "speedup": {}, "efficiency": {}, "notes": [],
    }


def _time_row(cfg: VideoBenchConfig, row: dict, device, dtype) -> None:
    """Medians of full SDPA and each backend (`auto` under what it runs), repeats interleaved; speedups."""
    import torch
    import torch.nn.functional as F

    from clear_cli.attention.video_kernels import choose_video_backend, clear_video_attention

    grid, r, rt = tuple(row["grid"]), cfg.window, cfg.time_window
    heads = cfg.heads or MODELS[cfg.wan][1]
    q, k, v = (torch.randn(cfg.batch_size, heads, row["tokens"], cfg.head_dim, device=device, dtype=dtype)
               for _ in range(3))
    auto = row["auto"] = choose_video_backend(q, grid, r, rt)
    max_full = cfg.max_full_tflop or (2.0 if device.type == "cpu" else 2000.0)
    kernels: dict[str, Callable] = {}
    if row["full_tflop"] * cfg.batch_size <= max_full:
        kernels["full"] = lambda: F.scaled_dot_product_attention(q, k, v)
    else:
        row["notes"].append(f"full attention not timed ({row['full_tflop'] * cfg.batch_size:.1f} TFLOP > "
                            f"{max_full:g}; raise --max-full-tflop to force)")
    for b in dict.fromkeys(auto if b == "auto" else b for b in cfg.backends):
        kernels[b] = (lambda b=b: clear_video_attention(q, k, v, grid=grid, window=r, time_window=rt, backend=b))
    times: dict[str, list[float]] = {name: [] for name in kernels}
    with torch.no_grad():
        for name, fn in list(kernels.items()):   # warm-up: compiles, builds plans
            try:
                fn()
                _sync(device)
            except Exception as e:  # out of memory or a kernel that cannot run here: report, go on
                row["notes"].append(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                del kernels[name], times[name]
        for _ in range(cfg.repeats):
            for name, fn in kernels.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        row["times_s"][name] = statistics.median(ts)
    for name in row["times_s"]:
        if name != "full" and "full" in row["times_s"]:
            row["speedup"][name] = sp = row["times_s"]["full"] / row["times_s"][name]
            row["efficiency"][name] = sp / row["flop_ratio"]


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_video_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        t, h, w = r["grid"]
        lines.append(f"{r['size']}, {r['frames']} frames ({t}x{h}x{w} = {r['tokens']} tokens), r={r['window']}, "
                     f"r_t={r['time_window']}, Wan {r['wan']}")
        lines.append(f"  TFLOP/layer: full {r['full_tflop']:.3f}, CLEAR exact {r['exact_tflop']:.4f}, paper "
                     f"{r['paper_tflop']:.4f} (full/exact {r['flop_ratio']:.1f}x; {100 * r['volume_share']:.2f}% of "
                     f"pairs)")
        lines.append(f"  whole layer: attention {100 * r['attention_share_full']:.1f}% of FLOPs at full, "
                     f"full/CLEAR {r['layer_flop_ratio']:.2f}x")
        s = r["schedules"]
        lines.append(f"  schedules: tiled {'x'.join(map(str, s['tiled']['tile']))} work/exact "
                     f"{s['tiled']['work_over_exact']:.2f}; triton {s['triton']['config']} work/exact "
                     f"{s['triton']['work_over_exact']:.2f}")
        if r.get("auto"):
            lines.append(f"  auto -> {r['auto']}")
        for name, sec in r["times_s"].items():
            extra = (f"  speedup {r['speedup'][name]:.2f}x  efficiency {r['efficiency'][name]:.2f}"
                     if name in r["speedup"] else "")
            lines.append(f"  {name:<10} {sec * 1e3:10.2f} ms{extra}")
        for note in r["notes"]:
            lines.append(f"  note: {note}")
    return "\n".join(lines)
