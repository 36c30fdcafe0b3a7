"""`clear synth`: draw (or import) a training set with cached embeddings and latents; resume; verify/repair.

Options from SynthConfig (clear_cli/cli/options.py)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from clear_cli.cli.options import Extra, config_command, progress_option
from clear_cli.jobs.synth import SynthConfig

_VERIFY = [Extra("verify_dir", Optional[str], None, ("--verify",), "Check every sample of this dataset.",
                 metavar="DIR"),
           Extra("repair", bool, False, ("--repair",), "With --verify: redraw the broken samples' batches.")]


def register(app: typer.Typer) -> None:
    @app.command("synth")
    @config_command(SynthConfig, extras=[*_VERIFY, *progress_option()])
    def synth_cmd(cfg: SynthConfig, verify_dir: str | None, repair: bool, progress: bool) -> None:
        """Draw a training set with the teacher (images + cached T5/CLIP embeddings + VAE latents), resumably.

        Rerun the same command to resume. Many GPUs: `accelerate launch -m clear_cli synth ...`.
        """
        from clear_cli.errors import UsageError
        from clear_cli.jobs.synth import synth, verify

        if repair and verify_dir is None:
            raise UsageError("--repair works with --verify DIR", "e.g. clear synth --verify out/synth --repair")
        if verify_dir is not None:
            report = verify(verify_dir, repair=repair, device=cfg.device, progress=progress)
            if report.is_main:
                print(report.summary())
            if not report.clean:
                raise typer.Exit(1)
            return
        result = synth(cfg, progress=progress, log=lambda m: print(m, file=sys.stderr) if progress else None)
        if result.is_main:
            for note in result.notes:
                print(f"note: {note}")
            print(result.summary())
