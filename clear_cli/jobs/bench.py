"""`clear bench attention`: work counts and measured speed of full attention against CLEAR, per resolution.

Figures per resolution: tokens, FLOPs of full attention, exact and paper-formula CLEAR FLOPs, each schedule's work /
exact (image-to-image part separately: the dense text rows and columns hide a block layout's waste), then measured
medians of full SDPA and each CLEAR backend (repeats interleaved so drift hits all alike), speedup and efficiency
(= speedup / (full FLOPs / exact FLOPs): 1.0 means CLEAR runs at full attention's FLOP rate), and what `auto` runs
for the row's shape and why (`row["auto"]`; `sdpa` = the exact whole-grid shortcut), updated if a kernel failed for
that shape during the warm-up. `auto` is timed under the name of what it runs.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from clear_cli.attention.counting import attention_flops, count_pairs, full_pairs, image_pairs, paper_pairs
from clear_cli.config import doc, merge_options
from clear_cli.flux import HEAD_DIM, HEADS, PIXELS_PER_TOKEN, TEXT_LEN
from clear_cli.logs import Log, sayer
from clear_cli.resolution import token_grid


@dataclass
class AttentionBenchConfig:
    res: list[str] = doc(["1k", "2k", "4k", "8k"], "Resolutions: 1k, 2k, 4k, 8k, 1024, or WxH in pixels "
                                                   f"({PIXELS_PER_TOKEN} px per token), comma-separated.",
                          cli_split=",")
    window: int = doc(16, "CLEAR window radius in tokens.")
    down_factor: int = doc(1, "Down-sampling factor of the pooled keys (1 = none).")
    heads: int = doc(HEADS, f"Attention heads (FLUX: {HEADS}).")
    head_dim: int = doc(HEAD_DIM, f"Head dimension (FLUX: {HEAD_DIM}).")
    text_len: int = doc(TEXT_LEN, f"Text tokens (FLUX.1-dev: {TEXT_LEN}).")
    batch_size: int = doc(1, "Batch size.")
    device: str = doc("auto", "auto, cpu, cuda, cuda:N.")
    dtype: str = doc("auto", "auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16.")
    backends: list[str] = doc(["auto"], "CLEAR backends to time, comma-separated: auto, tiled, flex, triton, "
                                        "reference.", cli_split=",")
    repeats: int = doc(3, "Timed repeats per kernel (after one warm-up); medians are reported.")
    max_full_tflop: float = doc(0.0, "Skip timing full attention above this many TFLOPs (0: 2 on CPU, 2000 on CUDA).")
    max_tokens_cuda_full: int = doc(300_000, "Skip full attention beyond this many tokens on CUDA.")
    timing: bool = doc(True, "Measure times (off: work counts only).")
    reference_res: str = doc("", "A reference image's resolution (Kontext), same forms as res; its tokens are "
                                 "global like text (the `global` rule, attention/layout.py). Empty: none.")


@dataclass
class BenchResult:
    """One row (a dict, module docstring) per resolution; iterate or index it like the list it used to be."""

    rows: list[dict]
    is_main: bool = True

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def schedule_work(backend: str, grid: tuple[int, int], text_len: int, window: int, down_factor: int = 1,
                  head_dim: int = 128, dtype=None, device=None) -> tuple[int, int] | None:
    """(all pairs computed, image-to-image pairs computed) by a backend's schedule; None if it has no schedule.
    triton: with the launch config a call on `device` in `dtype` would use (bf16 and Hopper-style by default)."""
    h, w = grid
    t, hw = text_len, h * w
    p = (h // down_factor) * (w // down_factor) if down_factor > 1 else 0
    text_rows = t * (t + hw)
    if backend == "tiled":
        from clear_cli.attention.geometry import tile_key_offsets
        from clear_cli.attention.tiled import choose_tile
        a, b = choose_tile(grid, window, head_dim, p, t)
        slots = -(-h // a) * -(-w // b) * a * b
        k_img = len(tile_key_offsets((a, b), window))
        return text_rows + slots * (t + k_img + p), slots * k_img
    if backend == "triton":
        import torch

        from clear_cli.attention.triton_plan import default_config, kernel_work
        cfg = default_config(window, head_dim, dtype or torch.bfloat16, device)
        return kernel_work(grid, text_len, window, down_factor, cfg)
    if backend == "flex":
        from clear_cli.attention.flex import default_tiles, image_block_work
        qt, kt = default_tiles(window)
        kb = kt[0] * kt[1]
        slots = -(-h // qt[0]) * -(-w // qt[1]) * qt[0] * qt[1]
        img = image_block_work(grid, window, qt, kt)
        return text_rows + slots * (-(-t // kb) * kb + -(-p // kb) * kb) + img, img
    return None


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_attention(config: AttentionBenchConfig | None = None, *, log: Log | None = None, progress: bool = True,
                    **options: Any) -> BenchResult:
    """Run the benchmark; one row per resolution (see the module docstring for the fields).

    `config` or keyword `options` (AttentionBenchConfig fields). `log`: one line per measurement."""
    if "batch" in options:  # the name before 0.2
        options["batch_size"] = options.pop("batch")
    cfg = merge_options(AttentionBenchConfig, config, options, job="bench_attention")
    from clear_cli.devices import resolve_device, resolve_dtype

    say = sayer(log)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    rows = []
    for res in cfg.res:
        row = _count_row(cfg, res, device, dtype)
        rows.append(row)
        say(f"{res}: {row['tokens']} tokens, full {row['full_tflop']:.3f} TFLOP, CLEAR exact "
            f"{row['exact_tflop']:.4f} (paper {row['paper_tflop']:.4f})")
        if cfg.timing:
            _time_row(cfg, row, device, dtype)
            if row["times_s"]:
                say("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["times_s"].items()))
    return BenchResult(rows)


def _layout(cfg: AttentionBenchConfig, grid: tuple[int, int]):
    """Text, the target grid, then the reference's tokens (--reference-res), which the kernels count as global."""
    from clear_cli.attention.layout import ImageGrid, TokenLayout

    h, w = grid
    ref = (ImageGrid(1, h * w, *token_grid(cfg.reference_res)),) if cfg.reference_res else ()
    return TokenLayout(cfg.text_len, (ImageGrid(0, 0, h, w), *ref))


def _count_row(cfg: AttentionBenchConfig, res: str, device, dtype) -> dict:
    """One resolution's work counts (full / exact / paper) and each kernel's schedule work, without running."""
    from clear_cli.attention.kernels import choose_backend

    h, w = grid = token_grid(res)
    if (h % cfg.down_factor) or (w % cfg.down_factor):
        raise ValueError(f"down_factor {cfg.down_factor} does not divide the {h}x{w} token grid of {res}")
    layout = _layout(cfg, grid)
    t, d_model = layout.global_len, cfg.heads * cfg.head_dim
    n = layout.seq_len
    exact = count_pairs(grid, t, cfg.window, cfg.down_factor)
    row: dict = {
        "res": res, "grid": [h, w], "reference": list(layout.references[0].shape) if layout.references else None,
        "tokens": n, "window": cfg.window, "down_factor": cfg.down_factor,
        "full_tflop": attention_flops(full_pairs(grid, t), d_model) / 1e12,
        "exact_tflop": attention_flops(exact, d_model) / 1e12,
        "paper_tflop": attention_flops(paper_pairs(grid, t, cfg.window, cfg.down_factor), d_model) / 1e12,
        "flop_ratio": full_pairs(grid, t) / exact,
        "schedules": {},
        "times_s": {}, "speedup": {}, "efficiency": {}, "peak_mb": {}, "notes": [],
    }
    auto, why = choose_backend(device, dtype, _shape(cfg, n), grid, t, cfg.window, cfg.down_factor)
    row["auto"] = {"backend": auto, "why": why}
    img_exact = image_pairs(grid, cfg.window)
    for b in ("tiled", "flex", "triton"):
        on_cuda = device.type == "cuda"   # elsewhere: the bf16 CUDA default, what a GPU run would use
        sw = schedule_work(b, grid, t, cfg.window, cfg.down_factor, cfg.head_dim,
                           dtype if on_cuda else None, device if on_cuda else None)
        if sw:
            row["schedules"][b] = {"work_over_exact": sw[0] / exact, "image_work_over_exact": sw[1] / img_exact}
    return row


def _shape(cfg: AttentionBenchConfig, n: int) -> tuple[int, int, int, int]:
    return (cfg.batch_size, cfg.heads, n, cfg.head_dim)


def _time_row(cfg: AttentionBenchConfig, row: dict, device, dtype) -> None:
    """Time full attention and the asked backends on random q/k/v: a warm-up, then interleaved repeats (medians)."""
    import torch

    shape = _shape(cfg, row["tokens"])
    try:
        q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    except RuntimeError as e:  # out of memory for the inputs themselves
        row["notes"].append(f"inputs do not fit: {e}".splitlines()[0])
        return
    kernels = _kernels(cfg, row, q, k, v, device)
    with torch.no_grad():
        _warm_up(kernels, row, device)
        _follow_fallback(cfg, row, kernels, device, dtype)
        times: dict[str, list[float]] = {name: [] for name in kernels}
        for _ in range(cfg.repeats):
            for name, fn in kernels.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        row["times_s"][name] = statistics.median(ts)
    if "full" in row["times_s"]:
        for name in row["times_s"]:
            if name != "full":
                sp = row["times_s"]["full"] / row["times_s"][name]
                row["speedup"][name] = sp
                row["efficiency"][name] = sp / row["flop_ratio"]
    del q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _kernels(cfg: AttentionBenchConfig, row: dict, q, k, v, device) -> dict[str, Callable]:
    """What to time: full attention (within --max-full-tflop), the names asked for, `auto` under the name of
    what it runs (once if asked twice)."""
    import torch.nn.functional as F

    from clear_cli.attention import clear_attention

    max_full = cfg.max_full_tflop or (2.0 if device.type == "cpu" else 2000.0)
    kernels: dict[str, Callable] = {}
    if row["full_tflop"] * cfg.batch_size <= max_full and (device.type == "cpu" or
                                                          row["tokens"] <= cfg.max_tokens_cuda_full):
        kernels["full"] = lambda: F.scaled_dot_product_attention(q, k, v)
    else:
        row["notes"].append(f"full attention not timed ({row['full_tflop'] * cfg.batch_size:.1f} TFLOP > "
                            f"{max_full:g} on {device.type}; raise --max-full-tflop to force)")
    from clear_cli.attention.layout import attend

    auto = row["auto"]["backend"]
    grid = tuple(row["grid"])
    layout = _layout(cfg, grid)
    for b in dict.fromkeys(auto if b == "auto" else b for b in cfg.backends):
        ask = "auto" if b == auto and "auto" in cfg.backends else b   # `auto` keeps its shortcut and fallbacks
        if layout.references:   # in the model's order: the permutation to kernel order is part of the cost
            kernels[b] = (lambda ask=ask: attend(q, k, v, layout, window=cfg.window, down_factor=cfg.down_factor,
                                                 backend=ask))
        else:
            kernels[b] = (lambda ask=ask: clear_attention(q, k, v, text_len=cfg.text_len, grid=grid,
                                                          window=cfg.window, down_factor=cfg.down_factor,
                                                          backend=ask))
    return kernels


def _warm_up(kernels: dict[str, Callable], row: dict, device) -> None:
    """Run each kernel once (compiles, builds and caches masks), noting its peak; drop those that fail here."""
    import torch

    for name, fn in list(kernels.items()):
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            fn()
            _sync(device)
            row["peak_mb"][name] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                    else _rss_mb())
        except Exception as e:  # out of memory or a kernel that cannot run here: report, go on
            row["notes"].append(f"{name} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            del kernels[name]
            if device.type == "cuda":
                torch.cuda.empty_cache()


def _follow_fallback(cfg: AttentionBenchConfig, row: dict, kernels: dict[str, Callable], device, dtype) -> None:
    """A kernel failed for this shape during the warm-up: `auto` now runs another; time it under that name."""
    from clear_cli.attention.kernels import choose_backend, fallback_reason

    grid, shape = tuple(row["grid"]), _shape(cfg, row["tokens"])
    t = _layout(cfg, grid).global_len
    fell_back = fallback_reason(device, dtype, shape, grid, t, cfg.window, cfg.down_factor)
    if not (fell_back and "auto" in cfg.backends):
        return
    auto = row["auto"]["backend"]
    now = choose_backend(device, dtype, shape, grid, t, cfg.window, cfg.down_factor)[0]
    row["auto"] = {"backend": now, "why": fell_back}
    row["notes"].append(f"auto fell back: {fell_back}")
    if auto in kernels and now != auto:
        fn, peak = kernels.pop(auto), row["peak_mb"].pop(auto, None)
        if now not in kernels:
            kernels[now] = fn
            if peak is not None:
                row["peak_mb"][now] = peak


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(rows: list[dict], peak_label: str = "peak MB") -> str:
    """Plain-text table of `bench_attention` rows."""
    lines = []
    for r in rows:
        sched = "; ".join(f"{b} work/exact {s['work_over_exact']:.2f} (image {s['image_work_over_exact']:.2f})"
                          for b, s in r["schedules"].items())
        ref = r.get("reference")
        plus = f" + reference {ref[0]}x{ref[1]}" if ref else ""
        lines.append(f"{r['res']} ({r['grid'][0]}x{r['grid'][1]} tokens{plus} + text = {r['tokens']}), "
                     f"r={r['window']}, f={r['down_factor']}")
        lines.append(f"  TFLOP/layer: full {r['full_tflop']:.3f}, CLEAR exact {r['exact_tflop']:.4f}, "
                     f"paper {r['paper_tflop']:.4f} (full/exact {r['flop_ratio']:.1f}x)")
        if sched:
            lines.append(f"  schedules: {sched}")
        if r.get("auto"):
            lines.append(f"  auto -> {r['auto']['backend']}: {r['auto']['why']}")
        for name, t in r["times_s"].items():
            extra = ""
            if name in r["speedup"]:
                extra = f"  speedup {r['speedup'][name]:.2f}x  efficiency {r['efficiency'][name]:.2f}"
            peak = r["peak_mb"].get(name)
            lines.append(f"  {name:<10} {t * 1e3:10.2f} ms{extra}" + (f"  {peak_label} {peak:.0f}" if peak else ""))
        for note in r["notes"]:
            lines.append(f"  note: {note}")
    return "\n".join(lines)
