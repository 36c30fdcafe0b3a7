"""`clear bench attention`: FLOP counts and measured speed of full attention vs CLEAR kernels."""

from __future__ import annotations

import json

import typer

from clear_cli.errors import UsageError
from clear_cli.flux import HEAD_DIM, HEADS, TEXT_LEN


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Benchmarks: attention kernels (more to come).", no_args_is_help=True,
                        rich_markup_mode=None)

    @bench.command("attention")
    def attention(
        res: str = typer.Option("", "--res", help="Comma-separated: 1k,2k,4k,8k, 1024, or WxH pixels "
                                                  "(default 1k,2k,4k,8k; with --video: 480p,720p or WxH)."),
        video: bool = typer.Option(False, "--video", help="3-D CLEAR on Wan 2.1 video token grids (space and time)."),
        frames: int = typer.Option(81, "--frames", help="With --video: pixel frames, 4k + 1 (81 -> 21 latent)."),
        time_window: int = typer.Option(4, "--time-window",
                                        help="With --video: temporal radius in latent frames (0 = same frame)."),
        wan: str = typer.Option("14b", "--wan", help="With --video: Wan 2.1 shape (heads, whole-layer FLOPs): "
                                                     "1.3b or 14b."),
        window: int = typer.Option(16, "--window", help="CLEAR window radius in tokens."),
        down_factor: int = typer.Option(1, "--down-factor", help="Pooled-key factor (1 = none)."),
        heads: int = typer.Option(0, "--heads", help=f"Attention heads (0: the model's; FLUX {HEADS})."),
        head_dim: int = typer.Option(HEAD_DIM, "--head-dim", help=f"Head dimension (FLUX: {HEAD_DIM})."),
        text_len: int = typer.Option(TEXT_LEN, "--text-len", help=f"Text tokens (FLUX.1-dev: {TEXT_LEN})."),
        batch: int = typer.Option(1, "--batch", help="Batch size."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
        backends: str = typer.Option("auto", "--backends",
                                     help="Comma-separated CLEAR backends: auto, tiled, flex, triton."),
        repeats: int = typer.Option(3, "--repeats", help="Timed repeats (interleaved; medians reported)."),
        max_full_tflop: float = typer.Option(0.0, "--max-full-tflop",
                                             help="Time full attention only up to this many TFLOPs (0: 2 on CPU)."),
        no_timing: bool = typer.Option(False, "--no-timing", help="Work counts only, no kernels run."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    ) -> None:
        """Per resolution: tokens, full / exact / paper FLOPs, schedule work / exact, times, speedup, efficiency."""
        if video:
            return _video(res, frames, window, time_window, wan, heads, head_dim, batch, device, dtype, backends,
                          repeats, max_full_tflop, no_timing, json_out)
        res = res or "1k,2k,4k,8k"
        heads = heads or HEADS
        from clear_cli.jobs.bench import AttentionBenchConfig, bench_attention, format_table
        from clear_cli.resolution import token_grid

        names = _split(backends)
        from clear_cli.attention import BACKENDS

        bad = [b for b in names if b not in BACKENDS]
        if bad:
            raise UsageError(f"--backends: unknown backend {bad[0]!r}", f"use {', '.join(BACKENDS)}")
        if window < 1 or down_factor < 1 or repeats < 1 or heads < 1 or head_dim < 1 or text_len < 0 or batch < 1:
            raise UsageError("--window, --down-factor, --repeats, --heads, --head-dim and --batch must be >= 1, "
                             "--text-len >= 0")
        from clear_cli.attention.kernels import check_backend
        from clear_cli.devices import resolve_device

        dev = resolve_device(device)
        for b in names:
            try:
                check_backend(b, dev)   # e.g. triton without CUDA
            except ValueError as e:
                raise UsageError(f"--backends: {e}") from None
        resolutions = _split(res)
        for r in resolutions:
            grid = token_grid(r)
            if grid[0] % down_factor or grid[1] % down_factor:
                raise UsageError(f"--down-factor {down_factor} does not divide the {grid[0]}x{grid[1]} token grid "
                                 f"of --res {r}")
        cfg = AttentionBenchConfig(res=resolutions, window=window, down_factor=down_factor, heads=heads,
                                   head_dim=head_dim, text_len=text_len, batch=batch, device=device, dtype=dtype,
                                   backends=names, repeats=repeats, max_full_tflop=max_full_tflop,
                                   timing=not no_timing)
        log = None if json_out else (lambda s: typer.echo(s, err=True))
        rows = bench_attention(cfg, log=log)
        if json_out:
            print(json.dumps(rows, indent=2))
        else:
            label = "peak MB" if "cuda" in device or device == "auto" else "RSS high-water MB"
            print(format_table(rows, peak_label=label))

    app.add_typer(bench, name="bench")


def _video(res, frames, window, time_window, wan, heads, head_dim, batch, device, dtype, backends, repeats,
           max_full_tflop, no_timing, json_out) -> None:
    """`clear bench attention --video`: the 3-D rule on Wan 2.1 grids (clear_cli/jobs/bench_video.py)."""
    from clear_cli.attention.video_kernels import VIDEO_BACKENDS
    from clear_cli.attention.video_sizes import MODELS
    from clear_cli.jobs.bench_video import VideoBenchConfig, bench_video_attention, format_video_table, video_grid

    names = _split(backends)
    bad = [b for b in names if b not in VIDEO_BACKENDS]
    if bad:
        raise UsageError(f"--backends: {bad[0]!r} is not a video backend", f"use {', '.join(VIDEO_BACKENDS)}")
    if wan not in MODELS:
        raise UsageError(f"--wan {wan!r} is not a Wan 2.1 shape", f"use {' or '.join(MODELS)}")
    if window < 1 or time_window < 0 or repeats < 1 or heads < 0 or head_dim < 1 or batch < 1:
        raise UsageError("--window, --repeats, --head-dim and --batch must be >= 1, --time-window and --heads >= 0")
    sizes = _split(res or "480p,720p")
    for s in sizes:
        try:
            video_grid(s, frames)
        except ValueError as e:
            raise UsageError(f"--res/--frames: {e}", "use 480p, 720p or WxH pixels and 4k + 1 frames") from None
    cfg = VideoBenchConfig(sizes=sizes, frames=frames, window=window, time_window=time_window, model=wan,
                           heads=heads, head_dim=head_dim, batch=batch, device=device, dtype=dtype, backends=names,
                           repeats=repeats, max_full_tflop=max_full_tflop, timing=not no_timing)
    log = None if json_out else (lambda s: typer.echo(s, err=True))
    try:
        rows = bench_video_attention(cfg, log=log)
    except ValueError as e:   # e.g. a backend this device cannot run
        raise UsageError(str(e)) from None
    print(json.dumps(rows, indent=2) if json_out else format_video_table(rows))
