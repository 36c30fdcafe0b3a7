"""`clear distill RECIPE.yaml`: attention-only distillation (thin over `clear_cli.distill`; options from
DistillConfig)."""

from __future__ import annotations

import typer

from clear_cli.cli.options import config_command, progress_option
from clear_cli.jobs.distill import DistillConfig


@config_command(DistillConfig, arguments={"recipe": "RECIPE.yaml"}, required=("recipe",), names={"sets": "--set"},
                metavars={"sets": "KEY=VALUE", "resume": "auto|PATH", "out": "DIR", "compile": "auto|on|off"},
                extras=progress_option())
def distill(cfg: DistillConfig, progress: bool) -> None:
    """Train the attention projections of a CLEAR-linearized model to match the original (teacher) model.

    Runs as is on one device, or on many with `accelerate launch -m clear_cli distill RECIPE.yaml`. Writes
    OUT/clear_attn.safetensors, OUT/recipe.yaml, OUT/log.jsonl, OUT/validation/ and OUT/checkpoints/step_N.
    """
    from clear_cli.jobs.distill import distill as run

    result = run(cfg, progress=progress, log=print)
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
