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
        res: str = typer.Option("1k,2k,4k,8k", "--res", help="Comma-separated: 1k,2k,4k,8k, 1024, or WxH pixels."),
        window: int = typer.Option(16, "--window", help="CLEAR window radius in tokens."),
        down_factor: int = typer.Option(1, "--down-factor", help="Pooled-key factor (1 = none)."),
        heads: int = typer.Option(HEADS, "--heads", help=f"Attention heads (FLUX: {HEADS})."),
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
        rows = bench_attention(cfg, log=log).rows
        if json_out:
            print(json.dumps(rows, indent=2))
        else:
            label = "peak MB" if "cuda" in device or device == "auto" else "RSS high-water MB"
            print(format_table(rows, peak_label=label))

    app.add_typer(bench, name="bench")
