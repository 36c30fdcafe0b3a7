"""`clear tiny train|check`: train the built-in tiny FLUX teacher on drawn scenes, and measure what it learned.

Options from TinyTrainConfig and TinyCheckConfig (clear_cli/cli/options.py)."""

from __future__ import annotations

import typer

from clear_cli.cli.options import config_command, progress_option
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


def register(app: typer.Typer) -> None:
    app.add_typer(tiny_app, name="tiny")
