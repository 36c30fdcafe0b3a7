"""`clear synth`: draw (or import) a training set with cached embeddings and latents; resume; verify/repair."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from clear_cli.flux import DEFAULT_MODEL


def register(app: typer.Typer) -> None:
    @app.command("synth")
    def synth_cmd(
        n: Optional[int] = typer.Option(None, "--n", help="Samples to draw (built-in prompts need it; a prompt "
                                        "file or image folder defaults to all of it)."),
        model: str = typer.Option(DEFAULT_MODEL, "--model",
                                  help="Teacher: hub id, local diffusers dir, tiny, tiny-random or flux-dev-random."),
        prompts: str = typer.Option("builtin", "--prompts",
                                    help="builtin, or a .txt (a prompt a line), .jsonl or .csv file."),
        prompt_column: str = typer.Option("prompt", "--prompt-column",
                                          help="Field (.jsonl) or column (.csv) holding the prompt."),
        res: str = typer.Option("1k", "--res", help="1k, 2k, a size like 768 (multiple of 16) or WxH."),
        steps: int = typer.Option(28, "--steps", help="Denoising steps per image."),
        guidance: float = typer.Option(3.5, "--guidance", help="Guidance (FLUX.1-dev's guidance embedding)."),
        seed: int = typer.Option(0, "--seed", help="Base seed; sample i uses a seed derived from (seed, i)."),
        out: Path = typer.Option(Path("out/synth"), "--out", help="Dataset directory (rerun to resume)."),
        batch_size: int = typer.Option(4, "--batch-size", help="Images per batch; the unit of resume."),
        cache_embeddings: bool = typer.Option(True, "--cache-embeddings/--no-cache-embeddings",
                                              help="Store T5 and pooled CLIP embeddings."),
        cache_latents: bool = typer.Option(True, "--cache-latents/--no-cache-latents",
                                           help="Store each image's VAE latent mean/std."),
        image_format: str = typer.Option("png", "--image-format", help="png or webp (lossless)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete the dataset in --out and start over."),
        from_images: Optional[Path] = typer.Option(None, "--from-images", help="Import a folder of captioned "
                                                   "images (NAME.txt/.json beside each, or a metadata.jsonl)."),
        compile: str = typer.Option("auto", "--compile", help="torch.compile of the FLUX blocks: auto (CUDA, "
                                    "from 2K up), on or off."),
        verify_dir: Optional[Path] = typer.Option(None, "--verify", help="Check every sample of this dataset."),
        repair: bool = typer.Option(False, "--repair", help="With --verify: redraw the broken samples' batches."),
    ) -> None:
        """Draw a training set with the teacher (images + cached T5/CLIP embeddings + VAE latents), resumably.

        Rerun the same command to resume. Many GPUs: `accelerate launch -m clear_cli synth ...`.
        """
        from clear_cli.errors import UsageError
        from clear_cli.jobs.synth import synth, verify

        if repair and verify_dir is None:
            raise UsageError("--repair works with --verify DIR", "e.g. clear synth --verify out/synth --repair")
        if verify_dir is not None:
            report = verify(verify_dir, repair=repair, device=device)
            if report.is_main:
                print(report.summary())
            if not report.clean:
                raise typer.Exit(1)
            return
        result = synth(n=n, model=model, prompts=prompts, prompt_column=prompt_column, res=res, steps=steps,
                       guidance=guidance, seed=seed, out=str(out), batch_size=batch_size,
                       cache_embeddings=cache_embeddings, cache_latents=cache_latents, image_format=image_format,
                       device=device, dtype=dtype, overwrite=overwrite,
                       from_images=str(from_images) if from_images is not None else None, compile=compile)
        if result.is_main:
            for note in result.notes:
                print(f"note: {note}")
            print(result.summary())
