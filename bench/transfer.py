"""Zero-shot transfer of CLEAR weights on the tiny model: do weights distilled on the teacher carry over to a derivative
and to a style LoRA stacked on the teacher, applied as a delta (`--base`)? The paper's claim, measured (issue 18).

    python bench/transfer.py --out out/transfer            # ~10-20 min on 2 CPU cores, one thread
    python bench/transfer.py --out out/transfer --quick    # plumbing only (tiny sizes, meaningless figures)

Everything is rebuilt from the shipped tiny teacher (seeded; each step reuses its output in OUT if present):
1. derivative: the teacher fully fine-tuned on scenes with the colour channels rotated (`clear_cli.tiny.derive`,
   style roll): a diffusers folder OUT/deriv, every transformer weight moved;
2. style LoRA: a rank-8 LoRA of the teacher trained on inverted colours (style invert): OUT/style_lora.safetensors;
   fused into the teacher as OUT/teacher_style for the synth/distill of its own CLEAR weights;
3. for the teacher, the derivative and the teacher + style: `clear synth` (256 scenes, 128 px, 12 steps,
   recipes/tiny_prompts.txt) and `clear distill recipes/tiny.yaml` (r = 2, 300 steps), as the gain bench;
4. on held-out prompts (scenes 10^9 + 7 on, seeds 0 + i, 128 px, 12 steps), PSNR / SSIM of each CLEAR variant
   against the same model's own full-attention images:
     zero-shot      the model linearized at r = 2, its own weights
     overwrite      the teacher's CLEAR file loaded as absolute projections (what --base prevents)
     transferred    the teacher's CLEAR weights as a delta: W_model + (W_clear - W_teacher) (`rebase.for_model`);
                    for the LoRA: the CLEAR LoRA (exported at full rank) and the style LoRA stacked in stock
                    diffusers (`load_lora_weights` twice, `set_adapters`)
     own            CLEAR distilled on that model itself (same recipe)
   recovery = (PSNR transferred - zero-shot) / (PSNR own - zero-shot): the share of distillation's gain the
   transferred delta keeps.
Figures: OUT/transfer.json and a markdown table on stdout (BENCHMARKS.md quotes it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WINDOW = 2
FULL = dict(n_data=256, synth_steps=12, distill_steps=300, n_eval=16, eval_steps=12,
            derive=dict(style="roll", steps=300, lr=1e-3, scenes=1024),
            style=dict(style="invert", steps=200, lr=3e-3, scenes=1024, lora_rank=8),
            controlnet=dict(steps=300, batch=16, scenes=512))
QUICK = dict(n_data=8, synth_steps=2, distill_steps=3, n_eval=2, eval_steps=2,
             derive=dict(style="roll", steps=2, lr=1e-3, scenes=64, batch=4),
             style=dict(style="invert", steps=2, lr=3e-3, scenes=64, batch=4, lora_rank=4),
             controlnet=dict(steps=2, batch=4, scenes=16))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _timed(times: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            times[name] = round(time.perf_counter() - self.t, 1)
            _say(f"  {name}: {times[name]} s")
    return _T()


# ------------------------------------------------------------------------------------------------ building

def build_models(out: Path, s: dict, times: dict) -> dict[str, str]:
    """The derivative folder, the style LoRA and the teacher with the LoRA fused (each reused if present)."""
    from clear_cli.models import load_pipeline, save_pipeline
    from clear_cli.tiny.derive import derive

    deriv, lora, fused = out / "deriv", out / "style_lora.safetensors", out / "teacher_style"
    if not (deriv / "model_index.json").is_file():
        with _timed(times, "derive (full fine-tune, roll)"):
            derive(deriv, **s["derive"])
    if not lora.is_file():
        with _timed(times, "style LoRA (invert)"):
            derive(lora, **s["style"])
    if not (fused / "model_index.json").is_file():
        pipe = load_pipeline("tiny")
        pipe.load_lora_weights(str(lora), adapter_name="style")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        save_pipeline(pipe, fused)
    return {"tiny": "tiny", "deriv": str(deriv), "teacher_style": str(fused), "style_lora": str(lora)}


def distil(model: str, work: Path, s: dict, times: dict, tag: str) -> Path:
    """`clear synth` + `clear distill recipes/tiny.yaml` for `model` (reused if its clear_attn file exists)."""
    from clear_cli.jobs.distill import distill
    from clear_cli.jobs.synth import synth

    weights = work / "distill" / "clear_attn.safetensors"
    if weights.is_file():
        return weights
    data = work / "synth"
    with _timed(times, f"synth {tag}"):
        synth(model=model, prompts=str(ROOT / "recipes" / "tiny_prompts.txt"), n=s["n_data"], res="128",
              steps=s["synth_steps"], out=str(data), device="cpu", progress=False, overwrite=True)
    with _timed(times, f"distill {tag}"):
        distill(str(ROOT / "recipes" / "tiny.yaml"), sets=[f"data={data}", f"model={model}",
                                                                 f"train.steps={s['distill_steps']}"],
                out=str(work / "distill"), overwrite=True, device="cpu", progress=False)
    return weights


# ------------------------------------------------------------------------------------------------ measuring

class Subject:
    """One model: its prompts' embeddings, its full-attention images, and images of CLEAR variants."""

    def __init__(self, pipe, prompts: list[str], s: dict):
        from clear_cli.models import text_len

        self.pipe, self.s = pipe, s
        with torch.no_grad():
            t5, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=pipe.device,
                                               max_sequence_length=text_len(pipe))
        self.embeds = (t5, pooled)
        self.n = len(prompts)

    def images(self) -> torch.Tensor:
        from clear_cli.sampling.seeds import draw

        out = [draw(self.pipe, [i], 0, embeds=self.embeds, width=128, height=128, output_type="pt",
                    num_inference_steps=self.s["eval_steps"], guidance_scale=3.5) for i in range(self.n)]
        return torch.cat([o.float().clamp(0, 1).cpu() for o in out])


def scores(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    from clear_cli.metrics.pixel import mean_psnr, psnr, ssim

    return {"psnr_db": round(mean_psnr(psnr(x, ref))[0], 3), "ssim": round(float(ssim(x, ref).mean()), 4)}


def measure_model(model: str, own: Path, teacher_w: Path, prompts: list[str], s: dict) -> dict:
    """zero-shot / overwrite / transferred (delta) / own CLEAR weights on `model`, against its full attention."""
    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.models import load_pipeline
    from clear_cli.models.rebase import for_model
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights, load_tensors

    pipe = load_pipeline(model)
    sub = Subject(pipe, prompts, s)
    ref = sub.images()
    rows: dict[str, dict] = {}
    linearize(pipe, window=WINDOW)
    rows["zero-shot"] = scores(sub.images(), ref)
    variants = [("own", load_attention_weights(own))]
    if model != "tiny":
        variants = [("overwrite", load_attention_weights(teacher_w)),
                    ("transferred", for_model(load_attention_weights(teacher_w), model, "tiny")), *variants]
    for name, w in variants:
        previous = apply_attention_weights(pipe.transformer, w)
        rows[name] = scores(sub.images(), ref)
        load_tensors(pipe.transformer, previous)
    unlinearize(pipe)
    return {"model": model, "rows": rows, "full_attention": ref}


def measure_lora(style_lora: str, fused: str, fused_own: Path, teacher_w: Path, prompts: list[str], s: dict,
                 tmp: Path) -> dict:
    """teacher + style LoRA (stock adapters): zero-shot; + the teacher's CLEAR LoRA stacked; the fused model's own."""
    from clear_cli.attention.linearize import linearize
    from clear_cli.jobs.export import export
    from clear_cli.models import load_pipeline
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights

    clear_lora = tmp / "clear_lora_full_rank.safetensors"
    if not clear_lora.is_file():
        export(teacher_w, format="lora", energy=1.0, out=clear_lora, overwrite=True, progress=False)
    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(style_lora, adapter_name="style")
    pipe.load_lora_weights(str(clear_lora), adapter_name="clear_attn")  # "clear" would clash with ModuleDict.clear
    sub = Subject(pipe, prompts, s)
    pipe.set_adapters(["style"], [1.0])
    ref = sub.images()
    rows: dict[str, dict] = {}
    linearize(pipe, window=WINDOW)
    rows["zero-shot"] = scores(sub.images(), ref)
    pipe.set_adapters(["style", "clear_attn"], [1.0, 1.0])
    rows["transferred"] = scores(sub.images(), ref)
    own = load_pipeline(fused)  # the LoRA fused into the teacher, distilled on itself
    own_sub = Subject(own, prompts, s)
    own_ref = own_sub.images()
    linearize(own, window=WINDOW)
    apply_attention_weights(own.transformer, load_attention_weights(fused_own))
    rows["own"] = scores(own_sub.images(), own_ref)
    rows["own"]["reference_vs_stacked_psnr_db"] = scores(own_ref, ref)["psnr_db"]  # fused = adapters (same model)
    return {"model": "tiny + style LoRA", "rows": rows, "full_attention": ref}


def build_controlnet(out: Path, s: dict, times: dict) -> str:
    """The tiny ControlNet (grey scene -> colour scene; `clear_cli.tiny.controlnet`), reused if present."""
    from clear_cli.tiny.controlnet import train_controlnet

    path = out / "controlnet"
    if not (path / "config.json").is_file():
        with _timed(times, "ControlNet (grey -> scene)"):
            train_controlnet(path, **s["controlnet"])
    return str(path)


def measure_controlnet(cn_path: str, teacher_w: Path, s: dict) -> dict:
    """The teacher with the tiny ControlNet on top, each CLEAR variant against the same full-attention ControlNet
    call; plus how far the control moves the teacher and how well its images follow the control."""
    import numpy as np
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.models import load_pipeline, text_len
    from clear_cli.models.weights import apply_attention_weights, load_attention_weights, load_tensors
    from clear_cli.tiny import HELD_OUT_SEED, scenes
    from clear_cli.tiny.controlnet import grey

    base = load_pipeline("tiny")
    pipe = FluxControlNetPipeline.from_pipe(base, controlnet=FluxControlNetModel.from_pretrained(cn_path).eval())
    pipe.set_progress_bar_config(disable=True)
    imgs, caps = scenes.make_batch([HELD_OUT_SEED + i for i in range(s["n_eval"])], 128)
    controls = grey(imgs)
    control_pil = [Image.fromarray((c * 255).round().astype(np.uint8)) for c in controls]
    t = text_len(pipe)

    def images(scale: float = 1.0) -> torch.Tensor:
        out = [pipe(prompt=caps[i], control_image=control_pil[i], controlnet_conditioning_scale=scale, height=128,
                    width=128, num_inference_steps=s["eval_steps"], guidance_scale=3.5, max_sequence_length=t,
                    generator=torch.Generator().manual_seed(i), output_type="pt").images for i in range(len(caps))]
        return torch.cat([o.float().clamp(0, 1).cpu() for o in out])

    def follows(x: torch.Tensor) -> dict:   # the images in grey against the control images
        g = torch.from_numpy(grey(x.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
        return scores(g, torch.from_numpy(controls).permute(0, 3, 1, 2).float())

    ref = images()
    no_control = images(0.0)
    rows: dict[str, dict] = {}
    linearize(pipe, window=WINDOW)   # the transformer and the ControlNet
    rows["zero-shot"] = scores(images(), ref)
    previous = apply_attention_weights(pipe.transformer, load_attention_weights(teacher_w))
    rows["transferred"] = scores(images(), ref)   # the teacher's CLEAR weights; the ControlNet CLEAR zero-shot
    unlinearize(pipe.controlnet)
    rows["transferred, ControlNet full attention"] = scores(images(), ref)
    load_tensors(pipe.transformer, previous)
    unlinearize(pipe)
    return {"model": "tiny + ControlNet (grey -> scene)", "rows": rows,
            "control_effect": {"no_control_vs_control": scores(no_control, ref),
                               "follows_control_with": follows(ref), "follows_control_without": follows(no_control)}}


def recovery(rows: dict) -> float | None:
    if "transferred" not in rows:
        return None
    gain = rows["own"]["psnr_db"] - rows["zero-shot"]["psnr_db"]
    return round((rows["transferred"]["psnr_db"] - rows["zero-shot"]["psnr_db"]) / gain, 3) if gain > 0 else None


def style_checks(teacher_ref: torch.Tensor, deriv_ref: torch.Tensor, style_ref: torch.Tensor) -> dict:
    """How far the derivative and the LoRA moved the teacher's images (PSNR against the teacher's; low = visible),
    and how close they are to the teacher's images restyled (roll / invert)."""
    from clear_cli.tiny.derive import apply_style

    def styled(x, style):
        return torch.from_numpy(apply_style(x.permute(0, 2, 3, 1).numpy(), style)).permute(0, 3, 1, 2)

    return {"deriv_vs_teacher": scores(deriv_ref, teacher_ref), "style_vs_teacher": scores(style_ref, teacher_ref),
            "deriv_vs_teacher_rolled": scores(deriv_ref, styled(teacher_ref, "roll")),
            "style_vs_teacher_inverted": scores(style_ref, styled(teacher_ref, "invert"))}


def table(res: dict) -> str:
    lines = ["| model | CLEAR r = 2 | PSNR (dB) | SSIM |", "|---|---|---|---|"]
    lines += [] if "teacher" not in res else _model_rows(res)
    if "controlnet" in res:
        label = "teacher + tiny ControlNet"
        names = {"zero-shot": "zero-shot (both linearized, no weights)",
                 "transferred": "the teacher's CLEAR weights, ControlNet CLEAR zero-shot",
                 "transferred, ControlNet full attention": "the teacher's CLEAR weights, ControlNet full attention"}
        for row, r in res["controlnet"]["rows"].items():
            lines.append(f"| {label} | {names[row]} | {r['psnr_db']:.2f} | {r['ssim']:.4f} |")
    return "\n".join(lines)


def _model_rows(res: dict) -> list[str]:
    lines: list[str] = []
    names = {"zero-shot": "zero-shot (no weights)", "overwrite": "teacher's file overwriting the projections",
             "transferred": "teacher's weights as a delta (--base tiny)", "own": "distilled on this model itself"}
    for key in ("teacher", "derivative", "lora"):
        m = res[key]
        label = {"teacher": "tiny teacher", "derivative": "derivative (fine-tuned, roll)",
                 "lora": "teacher + style LoRA (invert)"}[key]
        for row in ("zero-shot", "overwrite", "transferred", "own"):
            if row in m["rows"]:
                name = names[row]
                if key == "lora" and row == "transferred":
                    name = "teacher's CLEAR LoRA stacked with the style LoRA"
                r = m["rows"][row]
                lines.append(f"| {label} | {name} | {r['psnr_db']:.2f} | {r['ssim']:.4f} |")
        if m.get("recovery") is not None:
            lines.append(f"| {label} | recovery (transferred gain / own gain, PSNR) | {100 * m['recovery']:.0f}% | |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/transfer.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out/transfer", help="working folder (models, data, runs, transfer.json)")
    ap.add_argument("--quick", action="store_true", help="plumbing only: tiny sizes, figures meaningless")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny's ops gain nothing from more)")
    ap.add_argument("--only", choices=("all", "controlnet"), default="all",
                    help="controlnet: the teacher's CLEAR weights and the tiny ControlNet row only "
                         "(OUT/transfer_controlnet.json)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from clear_cli.tiny.scenes import held_out_prompts

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    c0 = time.process_time()
    if args.only == "controlnet":
        return _controlnet_only(out, s, times, t0, c0, args, argv)
    _say("building the derivative and the style LoRA")
    models = build_models(out, s, times)
    _say("distilling CLEAR on each model")
    w = {k: distil(models[k], out / f"clear_{k}", s, times, k) for k in ("tiny", "deriv", "teacher_style")}
    prompts = held_out_prompts(s["n_eval"])
    _say("measuring")
    with _timed(times, "measure"):
        teacher = measure_model("tiny", w["tiny"], w["tiny"], prompts, s)
        deriv = measure_model(models["deriv"], w["deriv"], w["tiny"], prompts, s)
        lora = measure_lora(models["style_lora"], models["teacher_style"], w["teacher_style"], w["tiny"], prompts, s,
                            out)
        controlnet = measure_controlnet(build_controlnet(out, s, times), w["tiny"], s)
    res = {"teacher": teacher, "derivative": deriv, "lora": lora, "controlnet": controlnet,
           "style": style_checks(teacher["full_attention"], deriv["full_attention"], lora["full_attention"])}
    for k in ("teacher", "derivative", "lora"):
        res[k].pop("full_attention")
        res[k]["recovery"] = recovery(res[k]["rows"])
    res.update({
        "settings": {k: v for k, v in s.items()}, "window": WINDOW, "quick": args.quick,
        "command": "python bench/transfer.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seconds": times, "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "machine": {"nproc": os.cpu_count(), "cpu": _cpu(), "torch": torch.__version__, "threads": args.threads,
                    "python": platform.python_version(), "loadavg_end": _loadavg()},
    })
    from clear_cli.files import atomic_write_text

    atomic_write_text(out / "transfer.json", json.dumps(res, indent=2) + "\n")
    print(table(res))
    st = res["style"]
    print(f"\nderivative vs teacher (full attention): {st['deriv_vs_teacher']['psnr_db']:.2f} dB; style LoRA vs "
          f"teacher: {st['style_vs_teacher']['psnr_db']:.2f} dB (visibly different looks)")
    print(f"wall {res['wall_seconds']} s, CPU {res['cpu_seconds']} s; figures: {out / 'transfer.json'}")
    return res


def _controlnet_only(out: Path, s: dict, times: dict, t0: float, c0: float, args, argv) -> dict:
    _say("distilling CLEAR on the teacher; training the tiny ControlNet")
    w = distil("tiny", out / "clear_tiny", s, times, "tiny")
    cn = build_controlnet(out, s, times)
    with _timed(times, "measure ControlNet"):
        res = {"controlnet": measure_controlnet(cn, w, s)}
    res.update({"settings": {k: v for k, v in s.items()}, "window": WINDOW, "quick": args.quick,
                "command": "python bench/transfer.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                "seconds": times, "wall_seconds": round(time.perf_counter() - t0, 1),
                "cpu_seconds": round(time.process_time() - c0, 1),
                "machine": {"nproc": os.cpu_count(), "cpu": _cpu(), "torch": torch.__version__,
                            "threads": args.threads, "python": platform.python_version(),
                            "loadavg_end": _loadavg()}})
    from clear_cli.files import atomic_write_text

    atomic_write_text(out / "transfer_controlnet.json", json.dumps(res, indent=2) + "\n")
    print(table(res))
    ce = res["controlnet"]["control_effect"]
    print(f"\ncontrol: without it {ce['no_control_vs_control']['psnr_db']:.2f} dB from the ControlNet's images; "
          f"grey images vs the control: {ce['follows_control_with']['psnr_db']:.2f} dB with, "
          f"{ce['follows_control_without']['psnr_db']:.2f} dB without")
    print(f"wall {res['wall_seconds']} s, CPU {res['cpu_seconds']} s; figures: {out / 'transfer_controlnet.json'}")
    return res


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


if __name__ == "__main__":
    main()
