"""`clear eval`: quality and speed of linearized students against their teacher (thin over clear_cli.evaluate;
options from EvalConfig)."""

from __future__ import annotations

import json
import typer

from clear_cli.cli.options import Extra, config_command, progress_option
from clear_cli.jobs.evaluate import EvalConfig


@config_command(EvalConfig, aliases={"weights": ["--student"]}, metavars={"weights": "FILE"},
                extras=[Extra("as_json", bool, False, ("--json",), "Print the result as JSON instead of the table."),
                        *progress_option()])
def eval_cmd(cfg: EvalConfig, as_json: bool, progress: bool) -> None:
    """Draw teacher and student images (same prompts and seeds, cached and resumable; split over processes under
    `accelerate launch`), then report FID, CLIP, DINO, LPIPS, SSIM, PSNR, seconds per image and attention FLOPs.

    Example: clear eval --weights out/clear_attn.safetensors --model tiny --n 16
    """
    import sys

    from clear_cli.jobs.evaluate import evaluate

    def log(msg: str) -> None:
        if progress:
            print(msg, file=sys.stderr)

    result = evaluate(cfg, log=log, progress=progress)
    if not result.is_main:  # a non-main process under accelerate
        return
    if as_json:
        print(json.dumps(result.data, indent=1))
    else:
        print_table(result.data)
        print(f"report: {result.report}   grid: {result.grid}   json: {result.out / 'eval.json'}")


def print_table(result: dict, console=None) -> None:
    """The summary table in the terminal (metrics down, teacher and students across), then skipped metrics."""
    from rich.console import Console
    from rich.table import Table

    from clear_cli.jobs.report import table_rows

    header, rows = table_rows(result)
    title = (f"clear eval: {result['model']}, {result['width']}x{result['height']}, n={result['n']}, "
             f"{result['steps']} steps, seed {result['seed']}")
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped / captured: do not wrap metric names at 80 columns
            console = Console(width=max(console.width, 40 + 22 * len(header)))
    console.print(table)
    for m, why in result.get("skipped", {}).items():
        console.print(f"skipped {m}: {why}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
