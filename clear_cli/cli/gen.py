"""`clear gen`: text-to-image with CLEAR attention up to 8K (thin over `clear_cli.generate`)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from clear_cli.cli.model import MODEL_HELP
from clear_cli.flux import DEFAULT_MODEL, default_text


def register(app: typer.Typer) -> None:
    @app.command("gen")
    def gen(
        prompts: Optional[list[str]] = typer.Argument(None, help="One or more prompts (quote each).",
                                                      show_default=False),
        res: Optional[str] = typer.Option(None, "--res", help="Target size: 1k|2k|4k|8k, WxH or one number; sides "
                                          "multiples of 16. [default: the base resolution]"),
        window: Optional[int] = typer.Option(None, "--window", help="CLEAR window radius in tokens. "
                                             "[default: from the weights, else 16]"),
        down_factor: Optional[int] = typer.Option(None, "--down-factor", help="Down-sampling factor f. "
                                                  "[default: from the weights, else 1]"),
        weights: Optional[str] = typer.Option(None, "--weights", help="Attention weights (ours, LoRA, or published "
                                              "CLEAR): FILE or REPO:FILE, e.g. Huage001/CLEAR:clear_local_16."
                                              "safetensors. Without: zero-shot."),
        force: bool = typer.Option(False, "--force", help="Run even if --window/--down-factor clash with the "
                                   "weights."),
        base: Optional[str] = typer.Option(None, "--base", help="Model the --weights were trained from when "
                                           "--model is a derivative of it (schnell, Krea, a fine-tune): they "
                                           "apply as a delta onto its own projections. Hub id, folder, tiny, or "
                                           "REPO:FILE of its transformer."),
        model: str = typer.Option(DEFAULT_MODEL, "--model", help=MODEL_HELP),
        steps: Optional[int] = typer.Option(None, "--steps", help="Steps of the base (or direct) stage. "
                                            f"[default: {default_text('steps')}]"),
        refine_steps: Optional[int] = typer.Option(None, "--refine-steps", help="Schedule length of refinement "
                                                   "stages; each runs round(steps x strength). "
                                                   f"[default: {default_text('refine_steps')}]"),
        guidance: float = typer.Option(3.5, "--guidance", help="Guidance of the base (or direct) stage."),
        seed: int = typer.Option(0, "--seed", help="Seed of the first image; image k uses seed + k."),
        num_images: int = typer.Option(1, "--num-images", help="Images per prompt."),
        prompts_file: Optional[str] = typer.Option(None, "--prompts", help="Text file, one prompt per line."),
        out: str = typer.Option("outputs", "--out", help="Output folder (<slug>_<seed>.png), or FILE.png for one "
                                "image."),
        base_res: Optional[str] = typer.Option(None, "--base-res", help="Cascade base resolution, about its square "
                                               "with the target's aspect ratio. "
                                               f"[default: {default_text('base_res', flux='1k')}]"),
        upscale: int = typer.Option(2, "--upscale", help="Upscale per refinement stage (2 or 4)."),
        strength: float = typer.Option(0.7, "--strength", help="SDEdit strength of refinement stages."),
        refine_guidance: float = typer.Option(7.5, "--refine-guidance", help="Guidance of refinement stages."),
        ntk_factor: Optional[float] = typer.Option(None, "--ntk-factor", help="RoPE NTK factor above the base "
                                                   "resolution (1 = off). [default: 10, as the authors]"),
        cascade: bool = typer.Option(True, "--cascade/--no-cascade", help="Cascade above the base resolution, or "
                                     "sample directly at the target."),
        compare: bool = typer.Option(False, "--compare", help="Also run full attention (same seed); write both "
                                     "side by side with PSNR/SSIM."),
        offload: bool = typer.Option(False, "--offload", help="Model CPU offload for smaller GPUs (CUDA)."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
        backend: str = typer.Option("auto", "--backend", help="CLEAR attention backend: auto, reference, tiled, "
                                    "flex, triton (CUDA)."),
        compile: str = typer.Option("auto", "--compile", help="torch.compile of the FLUX blocks: auto (CUDA, "
                                    "from 2K up), on or off."),
        parallel: str = typer.Option("none", "--parallel", help="none; patch: split each image's token rows over "
                                     "the processes of torchrun / accelerate launch (exact, halo exchange); data: "
                                     "split the prompts."),
    ) -> None:
        """Generate images with CLEAR local attention; above the base resolution via an SDEdit cascade.

        Examples: clear gen "a blue plane" --res 4k --weights Huage001/CLEAR:clear_local_16.safetensors;
        clear gen "a red circle" --model tiny --res 512 --compare
        """
        from clear_cli.jobs.generate import GenConfig, generate

        cfg = GenConfig(prompts=list(prompts or []), prompts_file=prompts_file, out=out, res=res, window=window, down_factor=down_factor, weights=weights, force=force,
                        base=base, model=model, steps=steps, refine_steps=refine_steps, guidance=guidance,
                        refine_guidance=refine_guidance, seed=seed, num_images=num_images, base_res=base_res,
                        upscale=upscale, strength=strength, ntk_factor=ntk_factor, cascade=cascade, compare=compare,
                        offload=offload, device=device, dtype=dtype, overwrite=overwrite, backend=backend,
                        compile=compile, parallel=parallel)

        def log(msg: str) -> None:
            print(msg, file=sys.stderr if msg.startswith("warning:") else sys.stdout, flush=True)

        outs = generate(cfg, log=log, progress=sys.stderr.isatty())
        total = sum(o.seconds for o in outs)
        if outs.is_main:  # parallel (issue 11): one summary
            print(f"done: {len(outs)} image(s) in {total:.1f} s")
