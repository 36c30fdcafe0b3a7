"""`clear tiny train|check`: train the built-in tiny FLUX teacher on drawn scenes, and measure what it learned."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_cli.tiny import HELD_OUT_SEED

tiny_app = typer.Typer(help="The tiny FLUX teacher: train it on procedural scenes (CPU) and check it.",
                       no_args_is_help=True)


@tiny_app.command("train")
def train_cmd(
    out: Path = typer.Option(Path("out/tiny"), "--out", help="Run folder: checkpoints, train_log.jsonl, the result."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Stop (with a checkpoint) after this many minutes."),
    resume: Optional[str] = typer.Option(None, "--resume", help="`auto`: continue the run in --out."),
    seed: int = typer.Option(0, "--seed", help="Seed of init, scenes, noise and batches."),
    res: int = typer.Option(128, "--res", help="Training resolution in pixels (multiple of 16)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Transformer steps (default 6000; more with --resume auto extends a run)."),
    vae_steps: Optional[int] = typer.Option(None, "--vae-steps", help="VAE steps (default 3000)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Transformer batch (default 64)."),
    cache_size: Optional[int] = typer.Option(None, "--cache-size", help="Scenes encoded to latents (default 8192)."),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="cpu (the documented recipe), auto, cuda or cuda:N."),
    install: bool = typer.Option(False, "--install", help="Copy the result to the package (the shipped weights)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a previous run in --out and start again."),
) -> None:
    """Train the tiny VAE, then the tiny FLUX transformer by flow matching; seeded and resumable."""
    from clear_cli.tiny.train import config_from_options, train

    cfg = config_from_options(seed=seed, res=res, steps=steps, vae_steps=vae_steps, batch=batch,
                              cache_size=cache_size, threads=threads)
    train(cfg, out=str(out), minutes=minutes, resume=resume, overwrite=overwrite, device=device, install=install,
          log=print)


@tiny_app.command("check")
def check_cmd(
    model: str = typer.Option("tiny", "--model", help="`tiny` (shipped weights), `tiny-random`, a weight file, or a run's checkpoints/flux_N.safetensors."),
    n: int = typer.Option(100, "--n", help="Prompts in the colour check."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps."),
    start: int = typer.Option(HELD_OUT_SEED, "--start", help="First held-out scene seed (another set: 2000000000)."),
    locality: bool = typer.Option(True, "--locality/--no-locality", help="Measure attention locality at 256 px."),
    clear: bool = typer.Option(True, "--clear/--no-clear", help="CLEAR r=2-4 vs full attention at 256 px."),
    device: str = typer.Option("cpu", "--device", help="cpu, auto, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the figures as JSON here."),
) -> None:
    """Colour following (vs the random model), attention locality, and CLEAR without distillation."""
    from clear_cli.tiny.checks import check

    check(model=model, n=n, steps=steps, locality=locality, clear=clear, device=device, start=start,
          out=None if out is None else str(out), log=lambda line: print(line, flush=True))


def register(app: typer.Typer) -> None:
    app.add_typer(tiny_app, name="tiny")
