"""`clear eval`: quality and speed of linearized students against their teacher (thin over clear_cli.evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from clear_cli.cli.model import MODEL_HELP
from clear_cli.flux import DEFAULT_MODEL, default_text


def eval_cmd(
    student: list[Path] = typer.Option(..., "--student", metavar="FILE", help="Student attention weights (.safetensors); repeat "
                                       "for several (r = 8, 16, 32 side by side)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", help=MODEL_HELP),
    prompts: str = typer.Option(None, "--prompts", help="coco (COCO-2014-val captions), tiny (held-out tiny scene "
                                "captions), builtin, or a FILE. [default: coco; tiny models: tiny]"),
    n: int = typer.Option(5000, "--n", help="Number of prompts (images per model)."),
    res: str = typer.Option(None, "--res", help="1k|2k|WxH|one number (default: the model's base, "
                            f"{default_text('base_res', flux='1k')})."),
    steps: int = typer.Option(None, "--steps", help=f"Denoising steps (default {default_text('steps')})."),
    guidance: float = typer.Option(3.5, "--guidance", help="Guidance of teacher and students."),
    seed: int = typer.Option(0, "--seed", help="Seed of prompt 0; prompt i uses seed + i."),
    out: Path = typer.Option(Path("eval"), "--out", help="Folder for cached images, eval.json, report.html, grid.png."),
    metrics: str = typer.Option(None, "--metrics", help="Comma list of fid,clip,lpips,ssim,psnr,dino,speed "
                                "(default all; hub networks that cannot be loaded are then skipped)."),
    ref_images: Path = typer.Option(None, "--ref-images", help="Folder of real images for FID against them."),
    inception_weights: Path = typer.Option(None, "--inception-weights", help="Local FID Inception .safetensors."),
    clip_model: str = typer.Option(None, "--clip-model", help="CLIP hub id or local dir "
                                   "(default openai/clip-vit-large-patch14)."),
    dino_model: str = typer.Option(None, "--dino-model", help="DINO hub id or local dir (default facebook/dinov2-base)."),
    lpips_weights: Path = typer.Option(None, "--lpips-weights", help="Local LPIPS network .safetensors."),
    window: int = typer.Option(None, "--window", help="Window radius for students whose file does not say it."),
    cascade: bool = typer.Option(False, "--cascade", help="CLEAR SDEdit cascade vs the full-attention cascade at "
                                 "--res (e.g. --res 2k): SSIM/PSNR/LPIPS and time."),
    coco_captions: Path = typer.Option(None, "--coco-captions", help="COCO captions_val2014.json "
                                       "(default ~/.cache/clear/coco/annotations/captions_val2014.json)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    backend: str = typer.Option("auto", "--backend", help="CLEAR attention backend: auto, reference, tiled, flex or "
                                 "triton (CUDA)."),
    compile: str = typer.Option("auto", "--compile", help="torch.compile of the FLUX blocks: auto (CUDA, from 2K "
                                "up), on or off."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per batch when computing metrics."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redraw every image instead of reusing the cache."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of the table."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or log lines."),
) -> None:
    """Draw teacher and student images (same prompts and seeds, cached and resumable; split over processes under
    `accelerate launch`), then report FID, CLIP, DINO, LPIPS, SSIM, PSNR, seconds per image and attention FLOPs."""
    import sys

    from clear_cli.jobs.evaluate import evaluate

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    opt = lambda p: None if p is None else str(p)  # noqa: E731
    result = evaluate(
        [str(s) for s in student], model=model, prompts=prompts, n=n, res=res, steps=steps, guidance=guidance,
        seed=seed, out=str(out), metrics=metrics, ref_images=opt(ref_images), inception_weights=opt(inception_weights),
        clip_model=clip_model, dino_model=dino_model, lpips_weights=opt(lpips_weights), window=window,
        cascade=cascade, coco_captions=opt(coco_captions), device=device, dtype=dtype, backend=backend,
        compile=compile, batch_size=batch_size, overwrite=overwrite, log=log, progress=not quiet,
    )
    if not result.is_main:  # a non-main process under accelerate
        return
    if as_json:
        print(json.dumps(result.data, indent=1))
    else:
        print_table(result.data)
        print(f"report: {result.report}   grid: {result.grid}   json: {result.out / 'eval.json'}")


def print_table(result: dict, console=None) -> None:
    """The summary table in the terminal (metrics down, teacher and students across), then skipped metrics."""
    from rich.console import Console
    from rich.table import Table

    from clear_cli.jobs.report import table_rows

    header, rows = table_rows(result)
    title = (f"clear eval: {result['model']}, {result['width']}x{result['height']}, n={result['n']}, "
             f"{result['steps']} steps, seed {result['seed']}")
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped / captured: do not wrap metric names at 80 columns
            console = Console(width=max(console.width, 40 + 22 * len(header)))
    console.print(table)
    for m, why in result.get("skipped", {}).items():
        console.print(f"skipped {m}: {why}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
