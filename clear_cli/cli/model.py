"""`clear model info|save`: load any supported model once, show what it is, or save it as a diffusers directory."""

from __future__ import annotations

from pathlib import Path

import typer

from clear_cli.errors import UsageError

model_app = typer.Typer(help="Inspect a model or save it (e.g. the built-in tiny FLUX) as a diffusers directory.",
                        no_args_is_help=True)

MODEL_HELP = "Hub id, local diffusers directory, `tiny` (trained) or `tiny-random`."


@model_app.command("info")
def info(
    model: str = typer.Option("tiny", "--model", help=MODEL_HELP),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
) -> None:
    """Load a model and print its components, sizes and text length."""
    from clear_cli.models import load_pipeline, text_len

    pipe = load_pipeline(model, device=device, dtype=dtype)
    tr = pipe.transformer
    cfg = tr.config
    print(f"model            {model}")
    print(f"device / dtype   {tr.device} / {str(tr.dtype).replace('torch.', '')}")
    print(f"transformer      {cfg.num_layers} double + {cfg.num_single_layers} single blocks, "
          f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
          f"{sum(p.numel() for p in tr.parameters()) / 1e6:.2f}M parameters")
    print(f"text length      {text_len(pipe)} T5 tokens")
    print(f"vae              {pipe.vae.config.latent_channels} latent channels, "
          f"scale {pipe.vae.config.scaling_factor:.4f}, shift {pipe.vae.config.shift_factor:.4f}")


@model_app.command("save")
def save(
    out: Path = typer.Option(..., "--out", help="Directory to write (must not exist unless --overwrite)."),
    model: str = typer.Option("tiny", "--model", help=MODEL_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
) -> None:
    """Save a model as a normal diffusers directory that stock `FluxPipeline.from_pretrained` loads."""
    from clear_cli.files import atomic_dir
    from clear_cli.models import load_pipeline, save_pipeline

    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    pipe = load_pipeline(model)
    with atomic_dir(out) as tmp:  # a failed save leaves no half directory; the old one stays until it succeeds
        save_pipeline(pipe, tmp)
    print(f"saved {model} to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
