"""`clear export WEIGHTS --format lora|full|comfy`: thin over `clear_cli.export.export`."""

from __future__ import annotations

from pathlib import Path

import typer

from clear_cli.flux import DEFAULT_MODEL


def export_cmd(
    weights: str = typer.Argument(..., help="Attention weights: our distill output, a published CLEAR checkpoint "
                                            "(path or REPO:FILE, e.g. Huage001/CLEAR:clear_local_16.safetensors), "
                                            "or our LoRA."),
    format: str = typer.Option("lora", "--format", help="lora (stock diffusers load_lora_weights), full "
                                                        "(attention-only file, published layout) or comfy "
                                                        "(ComfyUI's FLUX LoRA layout)."),
    rank: int | None = typer.Option(None, "--rank", help="Fixed LoRA rank per layer (default 64; clamped to the "
                                                         "layer's size)."),
    energy: float | None = typer.Option(None, "--energy", help="Instead of --rank: per layer, the smallest rank "
                                                               "keeping this share of squared singular values "
                                                               "(0-1]; 1 = exact."),
    model: str | None = typer.Option(None, "--model", help="Model the export is for (default: the one the weights "
                                                           f"were trained from: their base_model, {DEFAULT_MODEL} "
                                                           "for published files)."),
    base: str | None = typer.Option(None, "--base", help="Model the weights were trained from when --model is a "
                                                         "derivative of it: the delta is taken against it (a LoRA "
                                                         "then stacks on the derivative)."),
    out: Path | None = typer.Option(None, "--out", help="Output file (default clear_lora.safetensors; "
                                                        "clear_attn_full.safetensors for full, "
                                                        "clear_lora_comfy.safetensors for comfy)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    window: int | None = typer.Option(None, "--window", help="Window to record when the weights do not say it."),
    down_factor: int | None = typer.Option(None, "--down-factor", help="Down factor to record when the weights do "
                                                                       "not say it."),
    device: str = typer.Option("auto", "--device", help="Where the SVDs run: auto, cpu, cuda or cuda:N."),
) -> None:
    """Export attention weights as a LoRA for diffusers or ComfyUI, or as a full attention file (docs/formats.md)."""
    from clear_cli.jobs.export import export

    result = export(weights, format=format.lower(), rank=rank, energy=energy, model=model, base=base, out=out,
                    overwrite=overwrite, window=window, down_factor=down_factor, device=device)
    for line in result.summary_lines():
        print(line)
    geometry = f"--window {result.window} --down-factor {result.down_factor}"
    if result.format == "comfy":
        print("ComfyUI: put it in models/loras, apply it with LoraLoaderModelOnly, then the CLEAR Attention node "
              f"with this file and apply_weights off ({geometry} from the file; docs/comfyui.md)")
    else:
        on = ""
        if result.model and result.model != result.base_model:
            on = f" --model {result.model}" + (f" --base {result.base_model}" if result.format == "lora" else "")
        print(f"use: clear gen PROMPT --weights {result.path}{on} (diffusers: docs/formats.md)")


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
