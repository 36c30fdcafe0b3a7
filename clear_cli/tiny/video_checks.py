"""What the tiny Wan teacher learned, measured: colour and motion following, attention locality in space and time.

- `motion_check`: held-out prompts (`a small red circle moving left`), each drawn with its own seed; a clip's
  colour passes when the dominant named colour among pixels far from its background is the named one, its motion
  when the shape's centroid moves (at least `min_travel` of the frame) mostly along the named direction. A random
  model lands near 1 in 8 for colour and 1 in 4 for motion (often below: no shape, no motion).
- `attention_locality`: per layer, the self-attention mass (softmax(QK^T / sqrt(d)) recomputed beside the real
  call, over all sampling steps) as a function of distance on the (T, H, W) token grid: the mean |dt| in latent
  frames, the mean spatial distance in tokens, and the share inside 3-D windows (dt/r_t)^2 + (dy/r)^2 + (dx/r)^2
  < 1, each beside what uniform attention on the same grid would give.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from clear_cli.config import doc, merge_options
from clear_cli.flux import TINY_VIDEO_MODELS
from clear_cli.logs import Log, sayer
from clear_cli.tiny import HELD_OUT_SEED
from clear_cli.tiny import video_scenes as vs
from clear_cli.tiny.checks import CheckResult, _check_figures_out

WINDOWS = ((2, 0), (3, 0), (2, 2), (3, 2))  # (r, r_t) in tokens / latent frames (strict "< 1": r_t=2 reaches dt=1)


# ---------------------------------------------------------------- scoring one clip


def foreground(video: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """[F,H,W] bool: pixels far from the clip's background (the median of all frames' borders)."""
    border = np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1).reshape(-1, 3)
    bg = np.median(border, axis=0)
    return np.sqrt(((video - bg) ** 2).sum(-1)) > threshold


def dominant_color(video: np.ndarray, fg: np.ndarray | None = None) -> str | None:
    fg = foreground(video) if fg is None else fg
    pix = video[fg]
    if len(pix) < 4:
        return None
    return vs.COLOR_NAMES[int(np.bincount(vs.nearest_color(pix), minlength=len(vs.COLOR_NAMES)).argmax())]


def motion_direction(video: np.ndarray, fg: np.ndarray | None = None, min_travel: float = 0.08) -> str | None:
    """The named direction the shape's centroid moves in (a least-squares line through the frames that show it),
    or None when it moves less than `min_travel` of the frame side over the clip or shows in fewer than 3 frames."""
    fg = foreground(video) if fg is None else fg
    f, h, w = fg.shape
    ts, cs = [], []
    ys, xs = np.mgrid[0:h, 0:w]
    for t in range(f):
        m = fg[t]
        if m.sum() >= 4:
            ts.append(t)
            cs.append(((xs[m].mean() + 0.5) / w, (ys[m].mean() + 0.5) / h))
    if len(ts) < 3:
        return None
    t = np.asarray(ts, dtype=np.float64)
    c = np.asarray(cs)
    slope = np.polyfit(t, c, 1)[0]  # (dx, dy) per frame
    travel = slope * (f - 1)
    if np.hypot(*travel) < min_travel:
        return None
    ax = int(np.abs(travel).argmax())
    return ("right" if travel[0] > 0 else "left") if ax == 0 else ("down" if travel[1] > 0 else "up")


@dataclass
class ClipScore:
    color: str | None
    direction: str | None
    color_ok: bool
    direction_ok: bool


def score_clip(video: np.ndarray, color: str, direction: str) -> ClipScore:
    """Score one clip [F,H,W,3] in [0,1] against the colour and direction its prompt names."""
    fg = foreground(video)
    got_c, got_d = dominant_color(video, fg), motion_direction(video, fg)
    return ClipScore(got_c, got_d, got_c == color, got_d == direction)


# ---------------------------------------------------------------- sampling


def draw(pipe, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 20, guidance: float = 4.0,
         size: int = 64, frames: int = 13, batch: int = 25) -> np.ndarray:
    """Prompt i drawn with seed seeds[i]: float [N, frames, size, size, 3] in [0, 1]."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i:i + batch]]
        res = pipe(list(prompts[i:i + batch]), negative_prompt=[""] * len(gens), height=size, width=size,
                   num_frames=frames, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   output_type="np")
        out.append(np.asarray(res.frames, dtype=np.float32))
    return np.concatenate(out)


@dataclass
class MotionResult:
    n: int
    color_rate: float
    direction_rate: float
    both_rate: float
    guidance: float
    steps: int
    misses: list[dict[str, Any]] = field(default_factory=list)


def motion_check(pipe, n: int = 100, *, start: int = HELD_OUT_SEED, steps: int = 20, guidance: float = 4.0,
                 frames: int = 13, size: int = 64) -> MotionResult:
    clips = vs.held_out_clips(n, start, frames)
    prompts = [vs.caption(c) for c in clips]
    videos = draw(pipe, prompts, [start + i for i in range(n)], steps=steps, guidance=guidance, size=size,
                  frames=frames)
    scores = [score_clip(v, c.color, c.direction) for v, c in zip(videos, clips)]
    misses = [dict(prompt=p, color=s.color, direction=s.direction) for p, s in zip(prompts, scores)
              if not (s.color_ok and s.direction_ok)]
    return MotionResult(n, float(np.mean([s.color_ok for s in scores])),
                        float(np.mean([s.direction_ok for s in scores])),
                        float(np.mean([s.color_ok and s.direction_ok for s in scores])), guidance, steps, misses)


def reconstruction_check(pipe, n: int = 100, *, start: int = HELD_OUT_SEED, frames: int = 13,
                         size: int = 64) -> MotionResult:
    """The VAE alone: held-out clips encoded (latent mean) and decoded, scored as `motion_check` scores samples.
    What the VAE loses here, no transformer can draw."""
    from clear_cli.tiny.video_train import to_video

    clips = vs.held_out_clips(n, start, frames)
    vae = pipe.vae
    out = []
    with torch.no_grad():
        for i in range(0, n, 16):
            x = to_video(vs.render(clips[i:i + 16], size, frames))
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
            out.append(((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1).numpy())
    videos = np.concatenate(out)
    scores = [score_clip(v, c.color, c.direction) for v, c in zip(videos, clips)]
    return MotionResult(n, float(np.mean([s.color_ok for s in scores])),
                        float(np.mean([s.direction_ok for s in scores])),
                        float(np.mean([s.color_ok and s.direction_ok for s in scores])), 0.0, 0)


# ---------------------------------------------------------------- attention locality


def grid_distances(t: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """|dt|, |dy|, |dx| between all pairs of tokens of a (t, h, w) grid in WanTransformer's order (t, h, w)."""
    tt, yy, xx = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    tt, yy, xx = (a.flatten().float() for a in (tt, yy, xx))
    return ((tt[:, None] - tt[None]).abs(), (yy[:, None] - yy[None]).abs(), (xx[:, None] - xx[None]).abs())


def window_mask(dt: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, r: float, r_t: float) -> torch.Tensor:
    """The 3-D rule: (dt/r_t)^2 + (dy/r)^2 + (dx/r)^2 < 1; r_t = 0 means the same frame only."""
    time_term = (dt / r_t) ** 2 if r_t > 0 else torch.where(dt > 0, torch.inf, 0.0)
    return time_term + (dy / r) ** 2 + (dx / r) ** 2 < 1


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs (x[..., 2i], x[..., 2i+1])."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


def attention_probs(attn, hidden_states: torch.Tensor, rotary_emb=None) -> torch.Tensor:
    """softmax(QK^T / sqrt(d)) of a WanAttention self-attention call, [B, heads, N, N], as its processor forms
    Q and K (projections, RMS norms across heads, the rotary embedding)."""
    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:
        q, k = _rope(q, *rotary_emb), _rope(k, *rotary_emb)
    q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


class _LocalityProbe:
    """Wraps a WanAttention self-attention processor: recomputes its attention probabilities and accumulates their
    mass by distance on the token grid, then runs the real processor unchanged."""

    def __init__(self, inner, grid: tuple[int, int, int]):
        self.inner = inner
        self.dt, self.dy, self.dx = grid_distances(*grid)
        self.masks = {w: window_mask(self.dt, self.dy, self.dx, *w) for w in WINDOWS}
        self.sums: dict[str, float] = {"calls": 0.0, "dt": 0.0, "ds": 0.0, **{f"{r},{rt}": 0.0 for r, rt in WINDOWS}}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        with torch.no_grad():
            p = attention_probs(attn, hidden_states, rotary_emb).mean(dim=(0, 1))  # [N, N]
            n = p.shape[0]
            self.sums["calls"] += 1
            self.sums["dt"] += float((p * self.dt).sum() / n)
            self.sums["ds"] += float((p * torch.sqrt(self.dy ** 2 + self.dx ** 2)).sum() / n)
            for (r, rt), m in self.masks.items():
                self.sums[f"{r},{rt}"] += float((p * m).sum() / n)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)

    def result(self) -> dict[str, float]:
        c = max(self.sums["calls"], 1.0)
        return {k: v / c for k, v in self.sums.items() if k != "calls"}


@dataclass
class LocalityResult:
    grid: tuple[int, int, int]
    layers: list[dict[str, float]]  # per layer: mean |dt|, mean spatial distance, mass in each window
    uniform: dict[str, float]  # the same figures for uniform attention on the grid


def uniform_locality(grid: tuple[int, int, int]) -> dict[str, float]:
    dt, dy, dx = grid_distances(*grid)
    n = dt.shape[0]
    out = {"dt": float(dt.mean()), "ds": float(torch.sqrt(dy ** 2 + dx ** 2).mean())}
    for r, rt in WINDOWS:
        out[f"{r},{rt}"] = float(window_mask(dt, dy, dx, r, rt).float().sum() / (n * n))
    return out


def attention_locality(pipe, n: int = 8, *, start: int = HELD_OUT_SEED, steps: int = 20, guidance: float = 4.0,
                       frames: int = 13, size: int = 64) -> LocalityResult:
    tr = pipe.transformer
    pt, ph, pw = tr.config.patch_size
    s = pipe.vae_scale_factor_spatial
    grid = (((frames - 1) // pipe.vae_scale_factor_temporal + 1) // pt, size // s // ph, size // s // pw)
    blocks = list(tr.blocks)
    saved = [b.attn1.processor for b in blocks]
    probes = [_LocalityProbe(p, grid) for p in saved]
    try:
        for b, pr in zip(blocks, probes):
            b.attn1.set_processor(pr)
        clips = vs.held_out_clips(n, start, frames)
        draw(pipe, [vs.caption(c) for c in clips], [start + i for i in range(n)], steps=steps, guidance=guidance,
             size=size, frames=frames)
    finally:
        for b, p in zip(blocks, saved):
            b.attn1.set_processor(p)
    return LocalityResult(grid, [pr.result() for pr in probes], uniform_locality(grid))


# ---------------------------------------------------------------- the command's driver


@dataclass
class TinyWanCheckConfig:
    """`clear tiny video-check`; each field is the CLI option of the same name."""

    model: str = doc("tiny-wan", "`tiny-wan` (shipped weights), `tiny-wan-random`, a tiny_wan.safetensors, or a "
                                 "run's checkpoints/wan_N.safetensors")
    n: int = doc(100, "held-out prompts in the colour and motion check")
    steps: int = doc(20, "sampling steps")
    guidance: float = doc(4.0, "classifier-free guidance scale")
    start: int = doc(HELD_OUT_SEED, "first held-out clip seed (another set: 2000000000)")
    locality: bool = doc(True, "measure attention locality per layer")
    threads: int = doc(1, "torch CPU threads")
    out: str | None = doc(None, "also write the figures as JSON here")


def check(config: TinyWanCheckConfig | None = None, *, log: Log | None = None, progress: bool = True,
          **options: Any) -> CheckResult:
    """Colour and motion following, and attention locality, of a tiny Wan model; a CheckResult.

    `config` or keyword `options` (TinyWanCheckConfig fields). `log` receives one line per figure as it is
    measured (None: quiet; there are no progress bars, so `progress` changes nothing). With `out`, the figures
    are also written there as JSON."""
    import json

    from clear_cli.files import atomic_write_text

    cfg = merge_options(TinyWanCheckConfig, config, options, job="video_check")
    if cfg.out is not None:
        _check_figures_out(Path(cfg.out))
    torch.set_num_threads(cfg.threads)
    figures = run_checks(cfg.model, n=cfg.n, steps=cfg.steps, guidance=cfg.guidance, start=cfg.start,
                         locality=cfg.locality, log=sayer(log))
    path = None
    if cfg.out is not None:
        path = Path(cfg.out)
        atomic_write_text(path, json.dumps(figures, indent=1))
        sayer(log)(f"wrote {path}")
    return CheckResult(figures=figures, path=path)


def load(model: str):
    """`tiny-wan`, `tiny-wan-random`, a tiny_wan.safetensors a run wrote, or a run's checkpoints/wan_N.safetensors."""
    from clear_cli.errors import ClearError
    from clear_cli.models import tiny_wan
    from clear_cli.tiny.video_train import load_checkpoint

    if model in TINY_VIDEO_MODELS:
        return tiny_wan.build_pipeline(random=model == "tiny-wan-random")
    path = Path(model)
    if not path.is_file():
        raise ClearError(f"{model} is neither tiny-wan, tiny-wan-random nor a weight file",
                         "pass --model tiny-wan, or a run's tiny_wan.safetensors / checkpoints/wan_N.safetensors")
    comps = tiny_wan.build_components()
    if path.name.startswith("wan_"):
        load_checkpoint(comps, path)
    else:
        tiny_wan.load_trained(comps, path)
    pipe = tiny_wan.pipeline_class()(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_checks(model: str = "tiny-wan", *, n: int = 100, steps: int = 20, guidance: float = 4.0,
               start: int = HELD_OUT_SEED, locality: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    pipe = load(model)
    mc = motion_check(pipe, n, start=start, steps=steps, guidance=guidance)
    log(f"{model}: colour {mc.color_rate:.0%}, direction {mc.direction_rate:.0%}, both {mc.both_rate:.0%} "
        f"of {n} held-out prompts (guidance {guidance}, {steps} steps)")
    out: dict[str, Any] = {"model": model, "motion": asdict(mc)}
    if locality:
        loc = attention_locality(pipe, steps=steps, guidance=guidance, start=start)
        u = loc.uniform
        log(f"attention locality on the {loc.grid} grid (T, H, W tokens); uniform attention in brackets:")
        for i, lay in enumerate(loc.layers):
            wins = ", ".join(f"r={w.split(',')[0]} r_t={w.split(',')[1]}: {lay[w]:.0%} [{u[w]:.0%}]"
                             for w in lay if "," in w)
            log(f"  layer {i}: mean |dt| {lay['dt']:.2f} [{u['dt']:.2f}] frames, mean distance {lay['ds']:.2f} "
                f"[{u['ds']:.2f}] tokens; mass in {wins}")
        out["locality"] = asdict(loc)
    return out
