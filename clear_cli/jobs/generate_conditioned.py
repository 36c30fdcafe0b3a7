"""`clear gen --image / --mask / --control`: the stock pipeline for those inputs (`clear_cli.sampling.conditioned`),
one direct stage, linearized with the weights; called by `clear_cli.jobs.generate.generate` after its checks."""

from __future__ import annotations

import time

from clear_cli.files import save_png
from clear_cli.flux import model_defaults
from clear_cli.jobs.generate import GenConfig, GenOutput, _companions, side_by_side
from clear_cli.logs import Log
from clear_cli.sampling.runner import StageRunner


def conditioning(cfg: GenConfig):
    from clear_cli.sampling.conditioned import Conditioning

    return Conditioning(image=cfg.image, mask=cfg.mask, control=cfg.control, controlnet=cfg.controlnet,
                        kontext=cfg.kontext)


def read_conditioning(cond) -> dict:
    from clear_cli.sampling.conditioned import read_image

    images = {}
    for key, path, mode in (("image", cond.image, "RGB"), ("mask", cond.mask, "L"), ("control", cond.control, "RGB")):
        if path:
            images[key] = read_image(path, f"--{key}", mode)
    return images


def generate_conditioned(pipe, cond, images: dict, plans, cfg: GenConfig, target: tuple[int, int], window: int,
                          down: int, weights, train_seq_len: int, steps: int, progress: bool, say: Log,
                          warn) -> list[GenOutput]:
    """`--image / --mask / --control`: the stock pipeline for those inputs, one direct stage, linearized."""
    import torch

    from clear_cli import __version__
    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.flux import TINY_MODELS
    from clear_cli.models import text_len
    from clear_cli.sampling import conditioned

    name = conditioned.choose(cond, pipe.transformer)
    cn = None
    if cond.control:
        cn = conditioned.load_controlnet(cond.controlnet, pipe._execution_device, pipe.transformer.dtype)
    variant = conditioned.build(pipe, name, cn)
    variant.set_progress_bar_config(disable=not progress, leave=False)
    w, h = target
    if cfg.res is not None and cfg.cascade and max(w, h) > model_defaults(cfg.model).base_res:
        warn(f"{name} samples directly at {w}x{h} (no cascade with --image/--mask/--control)")
    tiny = cfg.model in TINY_MODELS or cfg.model == "tiny-random"
    kw = conditioned.call_kwargs(name, images, width=w, height=h, strength=cfg.strength, tiny=tiny)
    runner = StageRunner(variant, window, down, cfg.backend, weights, train_seq_len)
    say(f"plan: {name} at {w}x{h} (direct), window {window}, down_factor {down}, model {cfg.model} on "
        f"{pipe._execution_device} {str(pipe.transformer.dtype).replace('torch.', '')}")
    info_base = {"model": cfg.model, "pipeline": name, "window": window, "down_factor": down,
                 "weights": weights.source if weights else "none (zero-shot)",
                 "weights_sha256": weights.sha256 if weights else "", "weights_base": cfg.base,
                 "image": cond.image, "mask": cond.mask, "control": cond.control, "controlnet": cond.controlnet,
                 "steps": steps, "guidance": cfg.guidance, "size": f"{w}x{h}", "software": f"clear-dit {__version__}"}
    info_base = {k: v for k, v in info_base.items() if v is not None}
    if "Img2Img" in name or "Inpaint" in name:
        info_base["strength"] = cfg.strength

    def draw(prompt: str, seed: int, attention: str):
        runner.use(attention, None, False)   # CLEAR + the student weights, or the original model
        if cn is not None:
            if attention == "clear":
                linearize(cn, window, down, cfg.backend)
            else:
                unlinearize(cn)
        out = variant(prompt=prompt, num_inference_steps=steps, guidance_scale=cfg.guidance,
                      max_sequence_length=text_len(variant), generator=torch.Generator("cpu").manual_seed(seed),
                      **kw)
        return out.images[0]

    from clear_cli.models.compile import compiled, describe

    results: list[GenOutput] = []
    try:
        with compiled(pipe, cfg.compile, warn=warn) as compile_state:   # the variant shares the transformer
            if compile_state is not None:
                say(describe(compile_state))
            results = _conditioned_images(draw, runner, plans, cfg, name, w, h, steps, info_base, say)
    finally:
        runner.restore()
        if cn is not None:
            unlinearize(cn)
    return results


def _conditioned_images(draw, runner: StageRunner, plans, cfg: GenConfig, name: str, w: int, h: int, steps: int,
                        info_base: dict, say: Log) -> list[GenOutput]:
    results: list[GenOutput] = []
    for i, (prompt, seed, path) in enumerate(plans):
        say(f"[{i + 1}/{len(plans)}] {prompt!r} seed {seed} -> {path}")
        t0 = time.perf_counter()
        image = draw(prompt, seed, "clear")
        runner.sync()
        seconds = time.perf_counter() - t0
        info = {"prompt": prompt, "seed": seed, "attention": "clear", **info_base}
        save_png(image, path, info)
        out = GenOutput(path=path, prompt=prompt, seed=seed, width=image.width, height=image.height,
                        seconds=seconds, stages=[{"kind": "direct", "pipeline": name, "width": w, "height": h,
                                                  "attention": "clear", "steps": steps, "seconds": seconds}])
        say(f"  wrote {path} ({image.width}x{image.height}, {seconds:.1f} s)")
        if cfg.compare:
            from clear_cli.metrics.pixel import image_psnr, image_ssim

            t1 = time.perf_counter()
            full = draw(prompt, seed, "full")
            out.full_seconds = time.perf_counter() - t1
            out.full_path, out.compare_path = _companions(path)
            out.psnr, out.ssim = image_psnr(image, full), image_ssim(image, full)
            save_png(full, out.full_path, {**info, "attention": "full"})
            save_png(side_by_side(image, full), out.compare_path,
                     {**info, "layout": "left: CLEAR, right: full attention", "psnr_db": round(out.psnr, 3),
                      "ssim": round(out.ssim, 5)})
            say(f"  compare: CLEAR vs full attention PSNR {out.psnr:.2f} dB, SSIM {out.ssim:.4f} -> "
                f"{out.compare_path}")
        results.append(out)
    return results
