"""`clear gen`: text-to-image with CLEAR attention up to 8K (thin over `clear_cli.generate`; options from GenConfig)."""

from __future__ import annotations

import sys

import typer

from clear_cli.cli.options import config_command, progress_option
from clear_cli.jobs.generate import GenConfig


def register(app: typer.Typer) -> None:
    @app.command("gen")
    @config_command(GenConfig, arguments={"prompts": "PROMPT"}, names={"prompts_file": "--prompts"},
                    aliases={"n": ["--num-images"]}, extras=progress_option())
    def gen(cfg: GenConfig, progress: bool) -> None:
        """Generate images with CLEAR local attention; above the base resolution via an SDEdit cascade.

        Examples: clear gen "a blue plane" --res 4k --weights Huage001/CLEAR:clear_local_16.safetensors;
        clear gen "a red circle" --model tiny --res 512 --compare
        """
        from clear_cli.jobs.generate import generate

        def log(msg: str) -> None:
            if msg.startswith("warning:"):
                print(msg, file=sys.stderr, flush=True)
            elif progress:
                print(msg, flush=True)

        outs = generate(cfg, log=log, progress=progress and sys.stderr.isatty())
        if outs.is_main:  # parallel (issue 11): one summary
            print(f"done: {len(outs)} image(s) in {sum(o.seconds for o in outs):.1f} s")
