"""`clear demo`: synth -> distill -> eval -> export -> gen on the tiny FLUX (thin over `clear_cli.demo`)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from clear_cli.jobs.demo import DemoConfig

_D = DemoConfig()  # the CLI's defaults are the API's


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        out: str = typer.Option(_D.out, "--out", help="Output folder; rerun the same command to resume."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete the demo's own outputs in --out and "
                                       "start over."),
        model: str = typer.Option(_D.model, "--model", help="tiny (the built-in FLUX that draws) or tiny-random "
                                  "(plumbing only)."),
        window: int = typer.Option(_D.window, "--window", help="CLEAR window radius in tokens."),
        n: int = typer.Option(_D.n, "--n", "--samples", help="Scenes the teacher draws for distillation."),
        synth_steps: int = typer.Option(_D.synth_steps, "--synth-steps", help="Denoising steps per synth image."),
        distill_steps: int = typer.Option(_D.distill_steps, "--distill-steps", help="Distillation optimizer steps."),
        checkpoint_every: int = typer.Option(_D.checkpoint_every, "--checkpoint-every", help="Distillation "
                                             "checkpoint interval in steps (what an interrupted run resumes from)."),
        eval_n: int = typer.Option(_D.eval_n, "--eval-n", help="Held-out prompts evaluated before and after."),
        eval_steps: int = typer.Option(_D.eval_steps, "--eval-steps", help="Denoising steps per eval image."),
        res: int = typer.Option(_D.res, "--res", help="Size in pixels of data, distillation and eval."),
        gen_res: int = typer.Option(_D.gen_res, "--gen-res", help="Size of the generated image (cascade from --res)."),
        lora_rank: int = typer.Option(_D.lora_rank, "--lora-rank", help="Rank of the exported LoRA."),
        set_: list[str] = typer.Option([], "--set", help="Extra recipe override for distill, e.g. --set "
                                       "train.lr=1e-3 (repeatable)."),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="Distillation recipe. [default: "
                                             "recipes/tiny.yaml]"),
        seed: int = typer.Option(_D.seed, "--seed", help="Seed of the data, eval and the generated image."),
        device: str = typer.Option(_D.device, "--device", help="auto, cpu or cuda."),
        threads: int = typer.Option(_D.threads, "--threads", help="CPU threads for torch (tiny's ops gain nothing from "
                                    "more; spinning threads stall shared cores)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars or stage lines; only the summary."),
    ) -> None:
        """The whole workflow on the built-in tiny FLUX in a few minutes on a CPU, ending with a summary table.

        The teacher draws its data (synth), CLEAR attention is distilled into it (distill, recipes/tiny.yaml),
        the student is compared with the teacher before and after distillation (eval), exported as a LoRA
        (export) and used to generate an image above the training size (gen). Resumable: rerun to continue.
        """
        from clear_cli.jobs.demo import demo as run

        def log(msg: str) -> None:
            if not quiet:
                print(msg, file=sys.stderr, flush=True)

        result = run(out=out, overwrite=overwrite, model=model, window=window, n=n,
                     synth_steps=synth_steps, distill_steps=distill_steps, checkpoint_every=checkpoint_every,
                     eval_n=eval_n, eval_steps=eval_steps, res=res, gen_res=gen_res, lora_rank=lora_rank,
                     sets=list(set_), recipe=recipe, seed=seed, device=device, threads=threads, log=log,
                     progress=not quiet)
        print(result.summary, end="")
        print(f"summary: {result.out / 'summary.md'}")
        print(f"report:  {result.report}")
        print(f"images:  {', '.join(str(p) for p in result.images)}")
