"""`clear export --weights FILE --format lora|full|comfy`: thin over `clear_cli.export` (options from ExportConfig)."""

from __future__ import annotations

import typer

from clear_cli.cli.options import config_command, progress_option
from clear_cli.jobs.export import ExportConfig


@config_command(ExportConfig, hidden_arguments={"weights": "WEIGHTS"}, metavars={"weights": "FILE"},
                extras=progress_option())
def export_cmd(cfg: ExportConfig, progress: bool) -> None:
    """Export attention weights as a LoRA for diffusers or ComfyUI, or as a full attention file (docs/formats.md).

    Example: clear export --weights out/clear_attn.safetensors --format lora --rank 64
    """
    from clear_cli.jobs.export import export

    result = export(cfg, log=print, progress=progress)
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
