"""`clear demo`: synth -> distill -> eval -> export -> gen on the tiny FLUX (thin over `clear_cli.demo`; options
from DemoConfig)."""

from __future__ import annotations

import sys

import typer

from clear_cli.cli.options import config_command, progress_option
from clear_cli.jobs.demo import DemoConfig


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @config_command(DemoConfig, names={"sets": "--set"}, aliases={"n": ["--samples"]},
                    metavars={"sets": "KEY=VALUE"}, extras=progress_option())
    def demo(cfg: DemoConfig, progress: bool) -> None:
        """The whole workflow on the built-in tiny FLUX in a few minutes on a CPU, ending with a summary table.

        The teacher draws its data (synth), CLEAR attention is distilled into it (distill, recipes/tiny.yaml),
        the student is compared with the teacher before and after distillation (eval), exported as a LoRA
        (export) and used to generate an image above the training size (gen). Resumable: rerun to continue.
        """
        from clear_cli.jobs.demo import demo as run

        def log(msg: str) -> None:
            if progress:
                print(msg, file=sys.stderr, flush=True)

        result = run(cfg, log=log, progress=progress)
        print(result.summary, end="")
        print(f"summary: {result.out / 'summary.md'}")
        print(f"report:  {result.report}")
        print(f"images:  {', '.join(str(p) for p in result.images)}")
