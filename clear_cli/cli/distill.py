"""`clear distill RECIPE.yaml`: attention-only distillation (thin over `clear_cli.distill`)."""

from __future__ import annotations

from pathlib import Path

import typer


def distill(
    recipe: Path = typer.Argument(..., metavar="RECIPE.yaml", help="Recipe YAML, e.g. recipes/tiny.yaml or recipes/flux_dev.yaml."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a recipe key: --set train.steps=100 (repeatable)."),
    resume: str = typer.Option(None, "--resume", metavar="auto|PATH", help="auto (latest checkpoint in --out, else start) or a "
                                                      "checkpoint directory OUT/checkpoints/step_N."),
    out: Path = typer.Option(None, "--out", metavar="DIR", help="Output directory (default: the recipe's `out`, else out/distill)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a previous run in --out and start over."),
    device: str = typer.Option("auto", "--device", metavar="auto|cpu", help="auto (accelerate's choice) or cpu."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar (main process only)."),
    compile: str = typer.Option(None, "--compile", metavar="auto|on|off", help="torch.compile of the FLUX blocks: "
                                "auto (CUDA, from 2K up), on or off (default: the recipe's `compile`)."),
) -> None:
    """Train the attention projections of a CLEAR-linearized model to match the original (teacher) model.

    Runs as is on one device, or on many with `accelerate launch -m clear_cli distill RECIPE.yaml`. Writes
    OUT/clear_attn.safetensors, OUT/recipe.yaml, OUT/log.jsonl, OUT/validation/ and OUT/checkpoints/step_N.
    """
    from clear_cli.jobs.distill import distill as run

    result = run(str(recipe), sets=list(set_), out=out, resume=resume, overwrite=overwrite, device=device,
                 compile=compile, progress=progress, log=print)
    if not result.is_main:
        return
    last = result.log[-1] if result.log else None
    ran = result.steps - result.start_step
    print(f"distilled {result.steps} steps ({ran} in this run) in {result.seconds:.1f} s; "
          f"{result.trainable_params / 1e6:.2f}M trained parameters")
    if last is not None:
        print(f"last step: loss {last['loss']:.5f} = fm {last['fm']:.5f}, pred {last['pred']:.5f}, "
              f"attn {last['attn']:.5f}")
    print(f"weights  {result.weights}")
    print(f"log      {result.out / 'log.jsonl'}")


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
