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
    from clear_cli.errors import UsageError
    from clear_cli.tiny.train import config_from_options, install_weights, train

    if minutes is not None and minutes <= 0:
        raise UsageError(f"--minutes must be positive, got {minutes}")
    cfg = config_from_options(seed=seed, res=res, steps=steps, vae_steps=vae_steps, batch=batch,
                              cache_size=cache_size, threads=threads)
    result = train(out, cfg, minutes=minutes, resume=resume, overwrite=overwrite, device=device)
    if not result.finished:
        print(f"stopped at the time limit in stage {result.stage}, step {result.step} "
              f"({result.seconds / 60:.1f} min so far); continue with: clear tiny train --out {out} --resume auto")
        return
    print(f"done in {result.seconds / 60:.1f} min: {result.weights}")
    if install and result.weights is not None:
        print(f"installed: {install_weights(result.weights)}")


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
    import json

    from clear_cli.tiny.checks import run_checks

    if out is not None:  # before minutes of checks; never replace a file that is not a figures file
        from clear_cli.errors import UsageError
        from clear_cli.files import check_out_file

        check_out_file(out, ".json", what="figures file")
        if out.exists():
            try:
                ours = isinstance(json.loads(out.read_text(encoding="utf-8")), dict)
            except (OSError, ValueError):
                ours = False
            if not ours:
                raise UsageError(f"--out {out} exists and is not a figures file of `clear tiny check`",
                                 "pick another --out; only an earlier figures file is replaced")
    res = run_checks(model, n=n, steps=steps, locality=locality, clear=clear, device=device, start=start,
                     log=lambda line: print(line, flush=True))
    if out is not None:
        from clear_cli.files import atomic_write_text

        atomic_write_text(out, json.dumps(res, indent=1))
        print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(tiny_app, name="tiny")
