"""`clear bench attention`: FLOP counts and measured speed of full attention vs CLEAR kernels."""

from __future__ import annotations

import json

import typer

from clear_cli.cli.options import Extra, config_command, progress_option
from clear_cli.errors import UsageError
from clear_cli.jobs.bench import AttentionBenchConfig
from clear_cli.jobs.bench_video import VideoBenchConfig


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Benchmarks: attention kernels (more to come).", no_args_is_help=True,
                        rich_markup_mode=None)

    @bench.command("attention")
    @config_command(AttentionBenchConfig, aliases={"batch_size": ["--batch"]},
                    extras=[Extra("json_out", bool, False, ("--json",), "Print JSON instead of a table."),
                            *progress_option()])
    def attention(cfg: AttentionBenchConfig, json_out: bool, progress: bool) -> None:
        """Per resolution: tokens, full / exact / paper FLOPs, schedule work / exact, times, speedup, efficiency."""
        from clear_cli.jobs.bench import bench_attention, format_table
        from clear_cli.resolution import token_grid

        from clear_cli.attention import BACKENDS

        bad = [b for b in cfg.backends if b not in BACKENDS]
        if bad:
            raise UsageError(f"--backends: unknown backend {bad[0]!r}", f"use {', '.join(BACKENDS)}")
        if min(cfg.window, cfg.down_factor, cfg.repeats, cfg.heads, cfg.head_dim, cfg.batch_size) < 1 or \
                cfg.text_len < 0:
            raise UsageError("--window, --down-factor, --repeats, --heads, --head-dim and --batch-size must be >= 1, "
                             "--text-len >= 0")
        from clear_cli.attention.kernels import check_backend
        from clear_cli.devices import resolve_device

        dev = resolve_device(cfg.device)
        for b in cfg.backends:
            try:
                check_backend(b, dev)   # e.g. triton without CUDA
            except ValueError as e:
                raise UsageError(f"--backends: {e}") from None
        for r in cfg.res:
            grid = token_grid(r)
            if grid[0] % cfg.down_factor or grid[1] % cfg.down_factor:
                raise UsageError(f"--down-factor {cfg.down_factor} does not divide the {grid[0]}x{grid[1]} token "
                                 f"grid of --res {r}")
        if cfg.reference_res:
            token_grid(cfg.reference_res)   # a bad size is a one-line error before any work
        log = None if json_out or not progress else (lambda s: typer.echo(s, err=True))
        rows = bench_attention(cfg, log=log).rows
        if json_out:
            print(json.dumps(rows, indent=2))
        else:
            label = "peak MB" if "cuda" in cfg.device or cfg.device == "auto" else "RSS high-water MB"
            print(format_table(rows, peak_label=label))

    @bench.command("video")
    @config_command(VideoBenchConfig,
                    extras=[Extra("json_out", bool, False, ("--json",), "Print JSON instead of a table."),
                            *progress_option()])
    def video(cfg: VideoBenchConfig, json_out: bool, progress: bool) -> None:
        """3-D CLEAR (space and time) on Wan 2.1 video grids: tokens, FLOPs, schedule work, whole-layer ratio, times."""
        from clear_cli.attention.video_kernels import VIDEO_BACKENDS
        from clear_cli.attention.video_sizes import MODELS
        from clear_cli.jobs.bench_video import bench_video_attention, format_video_table, video_grid

        bad = [b for b in cfg.backends if b not in VIDEO_BACKENDS]
        if bad:
            raise UsageError(f"--backends: {bad[0]!r} is not a video backend", f"use {', '.join(VIDEO_BACKENDS)}")
        if cfg.wan not in MODELS:
            raise UsageError(f"--wan {cfg.wan!r} is not a Wan 2.1 shape", f"use {' or '.join(MODELS)}")
        if min(cfg.window, cfg.repeats, cfg.head_dim, cfg.batch_size) < 1 or min(cfg.time_window, cfg.heads) < 0:
            raise UsageError("--window, --repeats, --head-dim and --batch-size must be >= 1, "
                             "--time-window and --heads >= 0")
        for s in cfg.res:
            try:
                video_grid(s, cfg.frames)
            except ValueError as e:
                raise UsageError(f"--res/--frames: {e}", "use 480p, 720p or WxH pixels and 4k + 1 frames") from None
        log = None if json_out or not progress else (lambda s: typer.echo(s, err=True))
        try:
            rows = bench_video_attention(cfg, log=log).rows
        except ValueError as e:   # e.g. a backend this device cannot run
            raise UsageError(str(e)) from None
        print(json.dumps(rows, indent=2) if json_out else format_video_table(rows))

    app.add_typer(bench, name="bench")
