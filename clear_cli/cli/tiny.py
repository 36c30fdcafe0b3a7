"""`clear tiny train|check|video-train|video-check`: train the built-in tiny FLUX (images) and tiny Wan (video)
teachers on drawn scenes and clips, and measure what they learned.

Options of train/check/video-train/video-check from TinyTrainConfig, TinyCheckConfig, TinyWanTrainConfig and
TinyWanCheckConfig (clear_cli/cli/options.py)."""

from __future__ import annotations

import typer

from clear_cli.cli.options import config_command, progress_option
from clear_cli.tiny.checks import TinyCheckConfig
from clear_cli.tiny.train import TinyTrainConfig
from clear_cli.tiny.video_checks import TinyWanCheckConfig
from clear_cli.tiny.video_train import TinyWanTrainConfig

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
@config_command(TinyWanTrainConfig, aliases={"batch_size": ["--batch"]}, extras=progress_option())
def video_train_cmd(cfg: TinyWanTrainConfig, progress: bool) -> None:
    """Train the tiny Wan teacher (VAE, then transformer + UMT5) on clips of moving shapes; seeded, resumable."""
    from clear_cli.tiny.video_train import train

    train(cfg, log=print, progress=progress)


@tiny_app.command("video-check")
@config_command(TinyWanCheckConfig, extras=progress_option())
def video_check_cmd(cfg: TinyWanCheckConfig, progress: bool) -> None:
    """Named colour and direction of motion followed, and attention locality in space and time, per layer."""
    from clear_cli.tiny.video_checks import check

    check(cfg, log=lambda line: print(line, flush=True), progress=progress)


def register(app: typer.Typer) -> None:
    app.add_typer(tiny_app, name="tiny")
