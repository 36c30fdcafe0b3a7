"""What the tiny teacher learned, measured: colour following, attention locality, CLEAR without distillation.

- `color_check`: prompts naming one object's colour on a plain background (held-out scene seeds); an image
  passes when the dominant named colour among the pixels that differ from its own background is the named
  object colour. A random model lands near 1 in len(COLORS).
- `attention_locality`: share of image-to-image attention mass within radius r tokens, per layer, measured
  by a small processor that recomputes the attention probabilities (softmax(QK^T)) beside the real call.
- `clear_vs_teacher`: the same prompts and seeds drawn with full attention and with CLEAR at small windows
  (no distillation): PSNR and SSIM of student against teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from clear_cli.config import doc, merge_options
from clear_cli.errors import UsageError
from clear_cli.flux import PIXELS_PER_TOKEN, TINY_MODELS
from clear_cli.logs import Log, sayer
from clear_cli.tiny import scenes

HELD_OUT = scenes.HELD_OUT_SEED  # scene seeds for checks start here (training draws below scenes.TRAIN_SEEDS)


def color_prompts(n: int = 100, start: int = HELD_OUT) -> list[tuple[str, str, str]]:
    """(prompt, object colour, background colour) for n single-object plain-background scenes."""
    out = []
    for i in range(n):
        sc = scenes.sample_scene(start + i, n_objects=1, texture="plain")
        out.append((scenes.caption(sc), sc.objects[0].color, sc.background))
    return out


def dominant_object_color(img: np.ndarray, threshold: float = 0.2) -> str | None:
    """Named colour most common among pixels far from the image's own background (its border median)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    diff = np.sqrt(((img - bg) ** 2).sum(-1))
    fg = img[diff > threshold]
    if len(fg) < 4:
        return None
    counts = np.bincount(scenes.nearest_color(fg), minlength=len(scenes.COLOR_NAMES))
    return scenes.COLOR_NAMES[int(counts.argmax())]


def _images(pipe, prompts: Sequence[str], seed: int, size: int, steps: int, batch: int = 25) -> np.ndarray:
    """Draw prompt i with seed `seed + i` (the held-out scene's own seed): float [N, size, size, 3] in [0, 1].

    The model's own text length is passed explicitly: a stock FluxPipeline would pad to 512 (DESIGN.md §8).
    """
    from clear_cli.models import text_len
    from clear_cli.sampling.seeds import draw

    out = []
    for i in range(0, len(prompts), batch):
        images = draw(pipe, range(i, min(i + batch, len(prompts))), seed, prompts=prompts, height=size, width=size,
                      num_inference_steps=steps, output_type="np", max_sequence_length=text_len(pipe))
        out.append(np.asarray(images, dtype=np.float32))
    return np.concatenate(out)


@dataclass
class ColorResult:
    rate: float
    n: int
    hits: int
    confusion: dict[str, int] = field(default_factory=dict)
    background_hits: int | None = None  # images whose border is the named background colour (generator checks)


def background_color(img: np.ndarray) -> str:
    """Named colour nearest to the median of the image's border pixels."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    return scenes.COLOR_NAMES[int(scenes.nearest_color(np.median(border, axis=0)))]


def color_check(pipe, n: int = 100, size: int = 128, steps: int = 20, start: int = HELD_OUT) -> ColorResult:
    """Colour following over n held-out prompts (one object, plain background; scene and noise seeds from start).

    Also counts the images whose background is the named background colour: a model that binds colour words to
    the wrong thing paints the object's colour there.
    """
    items = color_prompts(n, start)
    imgs = _images(pipe, [p for p, _, _ in items], start, size, steps)
    hits = bg_hits = 0
    misses: dict[str, int] = {}
    for img, (_, want, bg) in zip(imgs, items):
        bg_hits += background_color(img) == bg
        got = dominant_object_color(img)
        if got == want:
            hits += 1
        else:
            key = f"{want}->{got}"
            misses[key] = misses.get(key, 0) + 1
    return ColorResult(rate=hits / n, n=n, hits=hits, confusion=misses, background_hits=bg_hits)


def reconstruction_check(pipe, n: int = 100, size: int = 128, start: int = HELD_OUT) -> ColorResult:
    """The colour check on the VAE alone: encode -> decode (latent mean) the real check scenes.

    It bounds what the generator can score: an object colour the autoencoder loses cannot be drawn either.
    """
    sc = [scenes.sample_scene(start + i, n_objects=1, texture="plain") for i in range(n)]
    vae = pipe.vae
    first = next(vae.parameters())
    dev, dtype = first.device, first.dtype
    recs = []
    with torch.no_grad():
        for i in range(0, n, 25):
            x = torch.from_numpy(scenes.render(sc[i:i + 25], size)).permute(0, 3, 1, 2).to(dev, dtype) * 2 - 1
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            recs.append(((rec.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
    hits, misses = 0, {}
    for img, s in zip(np.concatenate(recs), sc):
        got, want = dominant_object_color(img), s.objects[0].color
        if got == want:
            hits += 1
        else:
            misses[f"{want}->{got}"] = misses.get(f"{want}->{got}", 0) + 1
    return ColorResult(rate=hits / n, n=n, hits=hits, confusion=misses)


def sample_grid(pipe, n: int = 16, size: int = 128, steps: int = 20, start: int = HELD_OUT) -> tuple[np.ndarray, list[str]]:
    """A square grid image of n held-out scene prompts (for docs and eyeballing) and the prompts."""
    caps = scenes.held_out_prompts(n, start)
    imgs = _images(pipe, caps, start, size, steps)
    k = int(np.ceil(np.sqrt(n)))
    pad = np.ones((k * k - n, size, size, 3), np.float32)
    g = np.concatenate([imgs, pad]).reshape(k, k, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(k * size, k * size, 3)
    return g, caps


class _LocalityProbe:
    """Attention processor that measures where image queries put their image-to-image attention mass.

    It recomputes softmax(QK^T / sqrt(d)) from the module's own projections, norms and RoPE (the stock FLUX
    processor's order), adds up the mass per radius, then lets the stock processor produce the output.
    """

    def __init__(self, index: int, stats: dict, radii: Sequence[int], text_len: int, grid: tuple[int, int]):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.index, self.stats, self.radii, self.text_len = index, stats, list(radii), text_len
        self.inner = FluxAttnProcessor()
        h, w = grid
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([yy.flatten(), xx.flatten()], -1).float()
        self.dist2 = torch.cdist(pos, pos) ** 2  # [HW, HW] squared token distance

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        with torch.no_grad():
            q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
            k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (-1, attn.head_dim)))
            if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
                eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
                ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
                q, k = torch.cat([eq, q], 1), torch.cat([ek, k], 1)
            if image_rotary_emb is not None:
                q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
                k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
            t = self.text_len
            q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # [B, heads, N, d]
            probs = torch.softmax(q @ k.transpose(-1, -2) / attn.head_dim ** 0.5, dim=-1)
            ii = probs[:, :, t:, t:]  # image queries -> image keys
            d2 = self.dist2.to(ii.device)
            total = float(ii.sum())
            st = self.stats.setdefault(self.index, {"total": 0.0, **{r: 0.0 for r in self.radii}})
            st["total"] += total
            for r in self.radii:
                st[r] += float((ii * (d2 < r * r)).sum())
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


@dataclass
class LocalityResult:
    size: int
    grid: tuple[int, int]
    radii: list[int]
    layers: list[str]  # "double 0", ..., "single 1"
    share: list[list[float]]  # [layer][radius]: share of image-to-image mass within the radius
    uniform: list[float]  # the same share for uniform attention over the grid (the no-locality baseline)


def attention_locality(pipe, prompts: Sequence[str] | None = None, size: int = 256, steps: int = 8,
                       radii: Sequence[int] = (2, 4, 8)) -> LocalityResult:
    """Share of image-to-image attention mass within radius r tokens, per layer, over a short sampling run."""
    from clear_cli.models import text_len

    prompts = list(prompts) if prompts else scenes.held_out_prompts(4)
    tr = pipe.transformer
    g = size // PIXELS_PER_TOKEN
    stats: dict = {}
    mods = [m for m in tr.modules() if type(m).__name__ == "FluxAttention"]
    names = [f"double {i}" for i in range(len(tr.transformer_blocks))] + \
            [f"single {i}" for i in range(len(tr.single_transformer_blocks))]
    saved = [m.processor for m in mods]
    try:
        for i, m in enumerate(mods):
            m.set_processor(_LocalityProbe(i, stats, radii, text_len(pipe), (g, g)))
        _images(pipe, prompts, HELD_OUT, size, steps)
    finally:
        for m, p in zip(mods, saved):
            m.set_processor(p)
    probe = _LocalityProbe(0, {}, radii, 0, (g, g))
    uniform = [float((probe.dist2 < r * r).float().mean()) for r in radii]
    share = [[stats[i][r] / stats[i]["total"] for r in radii] for i in range(len(mods))]
    return LocalityResult(size=size, grid=(g, g), radii=list(radii), layers=names[:len(mods)], share=share,
                          uniform=uniform)


@dataclass
class ClearQuality:
    size: int
    window: int
    psnr: float
    ssim: float
    n: int


def clear_vs_teacher(pipe, windows: Sequence[int] = (2, 3, 4), size: int = 256, n: int = 4, steps: int = 20,
                     backend: str = "auto") -> list[ClearQuality]:
    """CLEAR without distillation against full attention: mean PSNR/SSIM over n held-out prompts."""
    from clear_cli.attention.linearize import linearize, unlinearize
    from clear_cli.metrics.pixel import psnr, ssim

    prompts = scenes.held_out_prompts(n)
    teacher = _images(pipe, prompts, HELD_OUT, size, steps)
    out = []
    try:
        for r in windows:
            linearize(pipe, window=int(r), backend=backend)
            student = _images(pipe, prompts, HELD_OUT, size, steps)
            s, t = (torch.from_numpy(v).permute(0, 3, 1, 2) for v in (student, teacher))  # [N, 3, H, W] in [0, 1]
            out.append(ClearQuality(size=size, window=int(r), psnr=float(psnr(s, t).mean()),
                                    ssim=float(ssim(s, t).mean()), n=n))
    finally:
        unlinearize(pipe)
    return out


def to_dict(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _pipe(model: str, device: str):
    from clear_cli.errors import UsageError
    from clear_cli.models import load_pipeline
    from clear_cli.models import tiny as tiny_mod

    if model in TINY_MODELS:
        return load_pipeline(model, device=device)
    path = Path(model)
    if not path.is_file():
        raise UsageError(f"--model {model!r} is not tiny, tiny-random or a tiny weight file")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    except Exception as e:  # not a safetensors file: say so in one line instead of a traceback
        raise UsageError(f"--model {model}: not a safetensors weight file ({e})") from None
    is_checkpoint = any(k.startswith("ema.") for k in keys)
    if not is_checkpoint and not any(k.split(".", 1)[0] in tiny_mod.COMPONENT_PREFIXES for k in keys):
        raise UsageError(f"--model {model} holds no tiny FLUX weights (no transformer.*, vae.* ... keys)",
                         "pass a tiny_flux.safetensors that `clear tiny train` wrote, or a run's checkpoints/flux_N")
    pipe = load_pipeline("tiny-random", device="cpu")
    comps = {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
             "text_encoder_2": pipe.text_encoder_2}
    if is_checkpoint:  # a flux checkpoint of `clear tiny train`, checked while the run goes on
        from clear_cli.tiny.train import load_flux_checkpoint

        load_flux_checkpoint(comps, path)
    else:
        tiny_mod.load_trained(comps, path)
    from clear_cli.devices import resolve_device

    return pipe.to(resolve_device(device))


@dataclass
class TinyCheckConfig:
    """`clear tiny check`; each field is the CLI option of the same name."""

    model: str = doc("tiny", "`tiny` (shipped weights), `tiny-random`, a weight file, or a run's "
                             "checkpoints/flux_N.safetensors")
    n: int = doc(100, "prompts in the colour check")
    steps: int = doc(20, "sampling steps")
    start: int = doc(HELD_OUT, "first held-out scene seed (another set: 2000000000)")
    locality: bool = doc(True, "measure attention locality at 256 px")
    clear: bool = doc(True, "CLEAR r=2-4 vs full attention at 256 px")
    device: str = doc("cpu", "cpu, auto, cuda or cuda:N")
    out: str | None = doc(None, "also write the figures as JSON here")


@dataclass
class CheckResult:
    """The figures of `check` (JSON-able; `result["color"]` reads them as the dict it used to be)."""

    figures: dict
    path: Path | None = None
    is_main: bool = True

    def __getitem__(self, key: str) -> Any:
        return self.figures[key]


def _check_figures_out(out: Path) -> None:
    """Before minutes of checks: a .json name, a folder that can be written, and never a file that is not an
    earlier figures file (there is no --overwrite to ask for that)."""
    import json

    from clear_cli.files import check_out_file

    check_out_file(out, ".json", what="figures file")
    if out.exists():
        try:
            ours = isinstance(json.loads(out.read_text(encoding="utf-8")), dict)
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise UsageError(f"--out {out} exists and is not a figures file of `clear tiny check`",
                             "pick another --out; only an earlier figures file is replaced")


def check(config: TinyCheckConfig | None = None, *, log: Log | None = None, progress: bool = True,
          **options: Any) -> CheckResult:
    """All checks for a tiny model, with the random model's colour rate beside it.

    `config` or keyword `options` (TinyCheckConfig fields). `log` receives one line per figure as it is
    measured (None: quiet). With `out`, the figures are also written there as JSON.
    """
    cfg = merge_options(TinyCheckConfig, config, options, job="check")
    if cfg.out is not None:
        _check_figures_out(Path(cfg.out))
    figures = run_checks(cfg.model, n=cfg.n, steps=cfg.steps, locality=cfg.locality, clear=cfg.clear,
                         device=cfg.device, start=cfg.start, log=log)
    path = None
    if cfg.out is not None:
        import json

        from clear_cli.files import atomic_write_text

        path = Path(cfg.out)
        atomic_write_text(path, json.dumps(figures, indent=1))
        sayer(log)(f"wrote {path}")
    return CheckResult(figures=figures, path=path)


def run_checks(model: str = "tiny", *, n: int = 100, steps: int = 20, locality: bool = True, clear: bool = True,
               device: str = "cpu", start: int = HELD_OUT, log: Log | None = None) -> dict:
    """`check` as it was before 0.2: the figures as a JSON-able dict."""
    import time

    from clear_cli.errors import UsageError

    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    if start < HELD_OUT:
        raise UsageError(f"--start {start} would draw training scenes; held-out seeds start at {HELD_OUT}")
    say = sayer(log)
    res: dict = {"model": model, "n": n, "steps": steps, "start": start}
    for name in (model, "tiny-random"):
        t = time.time()
        c = color_check(_pipe(name, device), n=n, steps=steps, start=start)
        key = "color" if name == model else "color_random"
        res[key] = to_dict(c)
        say(f"colour following ({name}): {c.hits}/{c.n} = {c.rate:.0%}, background in the named colour "
             f"{c.background_hits}/{c.n}  [{time.time() - t:.0f} s]")
    pipe = _pipe(model, device)
    rec = reconstruction_check(pipe, n=n, start=start)
    res["color_vae"] = to_dict(rec)
    say(f"colour kept by the VAE alone (encode -> decode the real scenes): {rec.hits}/{rec.n} = {rec.rate:.0%}")
    if locality:
        loc = attention_locality(pipe)
        res["locality"] = to_dict(loc)
        say(f"attention locality at {loc.size} px ({loc.grid[0]}x{loc.grid[1]} tokens): image-to-image mass within r")
        say("  layer      " + "  ".join(f"r={r:<4}" for r in loc.radii))
        for name, row in zip(loc.layers, loc.share):
            say(f"  {name:<10} " + "  ".join(f"{v:6.1%}" for v in row))
        say("  uniform    " + "  ".join(f"{v:6.1%}" for v in loc.uniform))
    if clear:
        try:
            qs = clear_vs_teacher(pipe, steps=steps)
        except ImportError as e:  # clear_cli.linearize not available in this build
            say(f"CLEAR comparison skipped ({e})")
        else:
            res["clear"] = [to_dict(q) for q in qs]
            for q in qs:
                say(f"CLEAR r={q.window} vs full attention at {q.size} px: PSNR {q.psnr:.2f} dB, SSIM {q.ssim:.3f} (n={q.n})")
    return res
