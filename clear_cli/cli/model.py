"""`clear model info|save`: load any supported model once, show what it is, or save it as a diffusers directory."""

from __future__ import annotations

from pathlib import Path

import typer

from clear_cli.errors import UsageError

model_app = typer.Typer(help="Inspect a model or save it (e.g. the built-in tiny FLUX) as a diffusers directory.",
                        no_args_is_help=True)

MODEL_HELP = ("Hub id, local diffusers directory, `tiny` (trained), `tiny-random` or `flux-dev-random` (FLUX.1-dev's "
              "architecture, random weights).")


@model_app.command("info")
def info(
    model: str = typer.Option("tiny", "--model", help=MODEL_HELP),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
) -> None:
    """Load a model and print its components, sizes and text length."""
    import torch

    from clear_cli.models import fit, load_pipeline, text_len
    from clear_cli.flux import RANDOM_MODELS

    if model in RANDOM_MODELS and device == "cpu":
        device = "meta"  # its weights are random: the structure and sizes are all there is to show
    pipe = load_pipeline(model, device=device, dtype=dtype)
    tr = pipe.transformer
    cfg = tr.config
    from clear_cli.attention.adapters import adapter_for
    from clear_cli.attention.linearize import trainable_attention_parameters

    adapter = adapter_for(tr)
    if adapter.family not in ("flux", "chroma"):   # FLUX's component layout below; others: what they share
        n_attn = len(adapter.attention_modules(tr))
        print(f"model            {model} (family {adapter.family}: {type(pipe).__name__})")
        print(f"transformer      {n_attn} attention blocks, {cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
              f"{sum(p.numel() for p in tr.parameters()) / 1e6:.2f}M parameters")
        if adapter.video:   # text reaches the video through cross-attention, which CLEAR leaves stock
            print("text             through cross-attention (stock); CLEAR runs in self-attention (window, "
                  "time_window)")
            return
        print(f"text length      up to {text_len(pipe)} tokens (prompts padded per batch, padding masked)")
        trained = sum(p.numel() for p in trainable_attention_parameters(tr).values())
        print(f"image branch     {trained / 1e6:.2f}M parameters distilled")
        return

    def count(m) -> str:
        n = sum(p.numel() for p in m.parameters())
        return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"

    print(f"model            {model}")
    print(f"device / dtype   {tr.device}{' (structure only, no weights allocated)' if tr.device.type == 'meta' else ''}"
          f" / {str(tr.dtype).replace('torch.', '')}")
    print(f"transformer      {cfg.num_layers} double + {cfg.num_single_layers} single blocks, "
          f"{cfg.num_attention_heads} heads x {cfg.attention_head_dim}, "
          f"{sum(p.numel() for p in tr.parameters()) / 1e6:.2f}M parameters")
    print(f"text encoders    T5 {count(pipe.text_encoder_2)}, CLIP {count(pipe.text_encoder)} parameters")
    print(f"text length      {text_len(pipe)} T5 tokens")
    print(f"vae              {pipe.vae.config.latent_channels} latent channels, "
          f"scale {pipe.vae.config.scaling_factor:.4f}, shift {pipe.vae.config.shift_factor:.4f}, {count(pipe.vae)} "
          "parameters")
    arch = fit.architecture(model, pipe)
    b = torch.empty((), dtype=tr.dtype).element_size()
    print(f"weights          {arch.weights(b) / fit.GiB:.2f} GiB in {str(tr.dtype).replace('torch.', '')}")
    if arch.params.get("transformer", 0) > 1e9:  # the estimates speak of FLUX-sized models at 1K-8K
        print("memory (estimate, one GPU; bench/commands.py measures it):")
        for line in fit.summary(arch, b):
            print(f"  {line}")


# what save_pretrained writes for a FLUX pipeline: all that `model save --overwrite` may replace
DIFFUSERS_ENTRIES = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                     "tokenizer_2", "scheduler", "image_encoder", "feature_extractor")


@model_app.command("save")
def save(
    out: Path = typer.Option(..., "--out", help="Directory to write (must not exist unless --overwrite)."),
    model: str = typer.Option("tiny", "--model", help=MODEL_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
) -> None:
    """Save a model as a normal diffusers directory that stock `FluxPipeline.from_pretrained` loads."""
    from clear_cli.files import atomic_dir, check_out_dir, foreign_entries
    from clear_cli.models import load_pipeline, save_pipeline

    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    check_out_dir(out.parent if str(out.parent) else ".")
    if out.is_dir():  # --overwrite replaces a saved model, never a folder holding anything else
        stray = foreign_entries(out, DIFFUSERS_ENTRIES)
        if stray or not (out / "model_index.json").is_file():
            raise UsageError(f"--out {out} is not a saved model (found {stray[0] if stray else 'no model_index.json'})",
                             "--overwrite replaces only a folder `clear model save` wrote; pick another --out")
    pipe = load_pipeline(model)
    with atomic_dir(out) as tmp:  # a failed save leaves no half directory; the old one stays until it succeeds
        save_pipeline(pipe, tmp)
    print(f"saved {model} to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
