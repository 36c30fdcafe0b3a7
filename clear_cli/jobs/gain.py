"""Does distillation help? The student's error against the teacher, next to the un-distilled linearized model's.

For held-out prompts and fixed seeds, three images each: the teacher (original model, full attention), the
zero-shot CLEAR model (same weights, CLEAR attention) and the distilled student (CLEAR + trained weights).
Errors are MSE against the teacher in pixels ([0, 1]) and in the final latents; the gain is
1 - error(student) / error(zero-shot).

    python -m clear_cli.jobs.gain --weights out/distill-tiny/clear_attn.safetensors
    python -m clear_cli.jobs.gain --bench --out out/gain-tiny     # synth + distill + measure, from scratch
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

def _draw(pipe, embeds, res: int, steps: int, guidance: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N,3,H,W] in [0,1], packed final latents) for every prompt, prompt i with seed + i."""
    from clear_cli.sampling.seeds import draw

    imgs, lats = [], []
    for i in range(embeds[0].shape[0]):
        kw = dict(embeds=embeds, width=res, height=res, num_inference_steps=steps, guidance_scale=guidance)
        lat = draw(pipe, [i], seed, output_type="latent", **kw)
        img = draw(pipe, [i], seed, output_type="pt", **kw)
        lats.append(lat.float().cpu())
        imgs.append(img.float().clamp(0, 1).cpu())
    return torch.cat(imgs), torch.cat(lats)


def _errors(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    from clear_cli.metrics.pixel import mean_psnr, psnr

    mse = ((x - ref) ** 2).flatten(1).mean(1)
    return {"mse": float(mse.mean()), "psnr_db": mean_psnr(psnr(x, ref))[0]}


def distill_gain(weights: str | Path, *, model: str | None = None, prompts: list[str] | None = None, n: int = 16,
                 res: int | None = None, steps: int = 12, guidance: float = 3.5, seed: int = 0,
                 window: int | None = None, backend: str = "auto") -> dict:
    """Teacher vs zero-shot CLEAR vs distilled CLEAR on held-out prompts; returns the figures as a dict."""
    from clear_cli.attention.linearize import linearize
    from clear_cli.models import load_pipeline, text_len
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights

    w = load_attention_weights(weights)
    model = model or w.base_model
    if model is None:
        raise ValueError(f"{weights} names no base model: pass model=")
    r = int(window or w.window)
    f = int(w.down_factor or 1)
    res = int(res or json.loads(w.metadata.get("resolution", "null") or "null") or 128)
    if prompts is None:
        from clear_cli.tiny.scenes import held_out_prompts

        prompts = held_out_prompts(n)
    prompts = list(prompts)
    pipe = load_pipeline(model)
    with torch.no_grad():
        t5, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.device,
                                           max_sequence_length=text_len(pipe))
    embeds = (t5, pooled)
    t0 = time.perf_counter()
    teacher_img, teacher_lat = _draw(pipe, embeds, res, steps, guidance, seed)
    linearize(pipe, window=r, down_factor=f, backend=backend)
    zero_img, zero_lat = _draw(pipe, embeds, res, steps, guidance, seed)
    apply_attention_weights(pipe.transformer, w)
    student_img, student_lat = _draw(pipe, embeds, res, steps, guidance, seed)
    zero, student = _errors(zero_img, teacher_img), _errors(student_img, teacher_img)
    zero_l = float(((zero_lat - teacher_lat) ** 2).mean())
    student_l = float(((student_lat - teacher_lat) ** 2).mean())
    return {
        "weights": str(weights), "model": model, "window": r, "down_factor": f, "resolution": res,
        "prompts": len(prompts), "steps": steps, "guidance": guidance, "seed": seed,
        "trained_steps": json.loads(w.metadata.get("steps", "null") or "null"),
        "zero_shot": {**zero, "latent_mse": zero_l}, "distilled": {**student, "latent_mse": student_l},
        "gain_pixel_mse": 1 - student["mse"] / zero["mse"] if zero["mse"] > 0 else 0.0,
        "gain_latent_mse": 1 - student_l / zero_l if zero_l > 0 else 0.0,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def describe(g: dict) -> str:
    z, s = g["zero_shot"], g["distilled"]
    return (f"{g['model']} r={g['window']} f={g['down_factor']} {g['resolution']}px, {g['prompts']} held-out prompts, "
            f"{g['steps']} sampling steps, student trained {g['trained_steps']} steps\n"
            f"  error vs teacher     pixel MSE   PSNR dB   latent MSE\n"
            f"  zero-shot CLEAR      {z['mse']:.5f}    {z['psnr_db']:6.2f}    {z['latent_mse']:.5f}\n"
            f"  distilled CLEAR      {s['mse']:.5f}    {s['psnr_db']:6.2f}    {s['latent_mse']:.5f}\n"
            f"  gain: pixel MSE {100 * g['gain_pixel_mse']:.1f}% lower, latent MSE {100 * g['gain_latent_mse']:.1f}% "
            "lower")


def bench(out: Path, *, model: str = "tiny", n_data: int = 256, sets: list[str] | None = None,
          n_eval: int = 16) -> dict:
    """From scratch: the teacher draws the tiny recipe's data, recipes/tiny.yaml is distilled, then the gain.

    Through the Python API of `clear synth` and `clear distill` (the same calls as the commands in `g["commands"]`).
    """
    from clear_cli.jobs.distill import distill
    from clear_cli.jobs.synth import synth

    root = Path(__file__).resolve().parents[2]
    data, run_dir = out / "synth", out / "distill"
    recipe = root / "recipes" / "tiny.yaml"
    overrides = [f"data={data}", f"model={model}", *(sets or [])]
    synth_opts = dict(model=model, prompts=str(root / "recipes" / "tiny_prompts.txt"), n=n_data, res="128", steps=12,
                      out=str(data), device="cpu")
    times = {}
    t = time.perf_counter()
    synth(**synth_opts)
    times["synth"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    distill(str(recipe), sets=overrides, out=str(run_dir), overwrite=True, device="cpu")
    times["distill"] = round(time.perf_counter() - t, 1)
    g = distill_gain(run_dir / "clear_attn.safetensors", n=n_eval)
    g["commands"] = [
        "clear synth " + shlex.join(a for k, v in synth_opts.items() for a in (f"--{k.replace('_', '-')}", str(v))),
        "clear distill " + shlex.join([str(recipe), *(a for o in overrides for a in ("--set", o)), "--out",
                                       str(run_dir), "--overwrite", "--device", "cpu"]),
    ]
    g["wall_seconds"] = times
    return g


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m clear_cli.jobs.gain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", help="a clear_attn.safetensors from `clear distill`")
    ap.add_argument("--bench", action="store_true", help="synth + distill (recipes/tiny.yaml) + measure")
    ap.add_argument("--out", default="out/gain-tiny", help="--bench: working directory")
    ap.add_argument("--model", default=None, help="teacher (default: the weights' base model; --bench: tiny)")
    ap.add_argument("--set", action="append", default=[], help="--bench: recipe override key=value")
    ap.add_argument("--n", type=int, default=16, help="held-out prompts")
    ap.add_argument("--steps", type=int, default=12, help="sampling steps")
    ap.add_argument("--json", default=None, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.bench:
        g = bench(Path(args.out), model=args.model or "tiny", sets=args.set, n_eval=args.n)
    elif args.weights:
        g = distill_gain(args.weights, model=args.model, n=args.n, steps=args.steps)
    else:
        ap.error("pass --weights FILE or --bench")
    g["command"] = "python -m clear_cli.jobs.gain " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(describe(g))
    path = Path(args.json) if args.json else (Path(args.out) / "gain.json" if args.bench else None)
    if path is not None:
        from clear_cli.files import atomic_write_text

        atomic_write_text(path, json.dumps(g, indent=2) + "\n")
        print(f"figures: {path}")


if __name__ == "__main__":
    main()
