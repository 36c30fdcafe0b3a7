"""`clear tiny train|check|video-train|video-check`: train the built-in tiny FLUX (images) and tiny Wan (video)
teachers on drawn scenes and clips, and measure what they learned.

Options of train/check from TinyTrainConfig and TinyCheckConfig (clear_cli/cli/options.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_cli.cli.options import config_command, progress_option
from clear_cli.tiny import HELD_OUT_SEED
from clear_cli.tiny.checks import TinyCheckConfig
from clear_cli.tiny.train import TinyTrainConfig

tiny_app = typer.Typer(help="The tiny FLUX teacher: train it on procedural scenes (CPU) and check it.",
                       no_args_is_help=True)


@tiny_app.command("train")
@config_command(TinyTrainConfig, aliases={"batch_size": ["--batch"]}, extras=progress_option())
def train_cmd(cfg: TinyTrainConfig, progress: bool) -> None:
    """Train the tiny VAE, then the tiny FLUX transformer by flow matching; seeded and resumable."""
    from clear_cli.tiny.train import train

    train(cfg, log=print, progress=progress)


@tiny_app.command("check")
@config_command(TinyCheckConfig, extras=progress_option())
def check_cmd(cfg: TinyCheckConfig, progress: bool) -> None:
    """Colour following (vs the random model), attention locality, and CLEAR without distillation."""
    from clear_cli.tiny.checks import check

    check(cfg, log=lambda line: print(line, flush=True), progress=progress)


@tiny_app.command("video-train")
def video_train_cmd(
    out: Path = typer.Option(Path("out/tiny-wan"), "--out", help="Run folder: checkpoints, train_log.jsonl, the result."),
    minutes: Optional[float] = typer.Option(None, "--minutes", help="Stop (with a checkpoint) after this many minutes."),
    resume: Optional[str] = typer.Option(None, "--resume", help="`auto`: continue the run in --out."),
    seed: int = typer.Option(0, "--seed", help="Seed of init, clips, noise and batches."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Transformer steps (default: the recipe's)."),
    vae_steps: Optional[int] = typer.Option(None, "--vae-steps", help="VAE steps (default: the recipe's)."),
    batch: Optional[int] = typer.Option(None, "--batch", help="Transformer batch in clips."),
    cache_size: Optional[int] = typer.Option(None, "--cache-size", help="Clips encoded to latents."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
    device: str = typer.Option("cpu", "--device", help="cpu (the documented recipe), auto, cuda or cuda:N."),
    install: bool = typer.Option(False, "--install", help="Copy the result to the package (the shipped weights)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a previous run in --out and start again."),
) -> None:
    """Train the tiny Wan teacher (VAE, then transformer + UMT5) on clips of moving shapes; seeded, resumable."""
    from clear_cli.errors import UsageError
    from clear_cli.tiny.video_train import config_from_options, install_weights, train

    if minutes is not None and minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {minutes}")
    cfg = config_from_options(seed=seed, steps=steps, vae_steps=vae_steps, batch=batch, cache_size=cache_size,
                              threads=threads)
    result = train(out, cfg, minutes=minutes, resume=resume, overwrite=overwrite, device=device)
    if not result.finished:
        print(f"stopped at the time limit in stage {result.stage}, step {result.step} "
              f"({result.seconds / 60:.1f} min so far); continue with: clear tiny video-train --out {out} --resume auto")
        return
    print(f"done in {result.seconds / 60:.1f} min: {result.weights}")
    if install and result.weights is not None:
        print(f"installed: {install_weights(result.weights)}")


@tiny_app.command("video-check")
def video_check_cmd(
    model: str = typer.Option("tiny-wan", "--model", help="`tiny-wan`, `tiny-wan-random`, a tiny_wan.safetensors, or a run's checkpoints/wan_N.safetensors."),
    n: int = typer.Option(100, "--n", help="Held-out prompts in the colour and motion check."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps."),
    guidance: float = typer.Option(4.0, "--guidance", help="Classifier-free guidance scale."),
    start: int = typer.Option(HELD_OUT_SEED, "--start", help="First held-out clip seed (another set: 2000000000)."),
    locality: bool = typer.Option(True, "--locality/--no-locality", help="Measure attention locality per layer."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the figures as JSON here."),
) -> None:
    """Named colour and direction of motion followed, and attention locality in space and time, per layer."""
    import json

    import torch

    from clear_cli.tiny.video_checks import run_checks

    torch.set_num_threads(threads)
    res = run_checks(model, n=n, steps=steps, guidance=guidance, start=start, locality=locality,
                     log=lambda line: print(line, flush=True))
    if out is not None:
        from clear_cli.files import atomic_write_text

        atomic_write_text(out, json.dumps(res, indent=1))
        print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(tiny_app, name="tiny")
