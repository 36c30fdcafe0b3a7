"""Which metrics to compute, loading their networks once, and batched passes over image files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clear_cli.errors import UsageError
from clear_cli.logs import warner
from clear_cli.extras import MissingExtra
from clear_cli.metrics.loading import NetworkUnavailable

ALL_METRICS = ("fid", "clip", "lpips", "ssim", "psnr", "dino", "speed")
NETWORK_METRICS = ("fid", "clip", "lpips", "dino")
FID_SMALL_N = 2048
"""Below this many images per set the FID covariance (2048-d Inception features) is rank-deficient: flagged."""


def parse_metrics(text: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """(metrics in canonical order, whether the user named them). None / "all" -> every metric, not explicit."""
    if text is None or text == "all" or text == ["all"]:
        return list(ALL_METRICS), False
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not items:
        raise UsageError("--metrics is empty", f"name some of: {','.join(ALL_METRICS)}")
    unknown = [m for m in items if m not in ALL_METRICS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], ALL_METRICS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"unknown metric {unknown[0]!r} in --metrics", f"{hint}choose from {','.join(ALL_METRICS)}")
    return [m for m in ALL_METRICS if m in items], True


@dataclass
class Networks:
    """The metric networks that loaded; `skipped` says why a metric is left out."""

    inception: Callable | None = None
    clip: object | None = None
    dino: Callable | None = None
    lpips: Callable | None = None
    skipped: dict[str, str] = field(default_factory=dict)


def load_networks(metrics: list[str], *, explicit: bool, device: torch.device, inception_weights: str | None = None,
                  clip_model: str | None = None, dino_model: str | None = None,
                  lpips_weights: str | None = None, warn: Callable[[str], None] | None = None) -> Networks:
    """Load what `metrics` need. A hub network that cannot be fetched fails the run when the user named the
    metric (explicit), else the metric is skipped with one warning. Bad local paths always fail."""
    from clear_cli.metrics import clip as clip_mod
    from clear_cli.metrics import dino as dino_mod
    from clear_cli.metrics.inception import load_inception
    from clear_cli.metrics.lpips import Lpips

    nets = Networks()
    loaders = {
        "fid": ("inception", lambda: load_inception(inception_weights, device)),
        "clip": ("clip", lambda: clip_mod.ClipScorer(clip_model or clip_mod.DEFAULT_CLIP, device)),
        "dino": ("dino", lambda: dino_mod.DinoFeatures(dino_model or dino_mod.DEFAULT_DINO, device)),
        "lpips": ("lpips", lambda: Lpips(lpips_weights, device)),
    }
    import contextlib
    import sys

    from clear_cli.metrics.loading import downloads

    for m in metrics:
        if m not in loaders:
            continue
        attr, load = loaders[m]
        try:  # downloads only for metrics the user named; a download's chatter never reaches stdout
            with downloads(explicit), contextlib.redirect_stdout(sys.stderr):
                setattr(nets, attr, load())
        except (NetworkUnavailable, MissingExtra) as e:
            if explicit:
                raise
            nets.skipped[m] = e.one_line().removeprefix("error: ")
            (warn or warner(None))(f"skipping {m}: {nets.skipped[m]}")
    return nets


def load_images(paths: Sequence[Path], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Image files -> uint8 [B, 3, H, W] (all the same size; `size` (W, H) resizes each, bicubic)."""
    import numpy as np
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if size is not None and im.size != tuple(size):
                im = im.resize(tuple(size), Image.BICUBIC)
            arrays.append(np.asarray(im))
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise UsageError(f"images differ in size ({', '.join(str(s[1]) + 'x' + str(s[0]) for s in sizes)})",
                         "compare images drawn at one resolution")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def image_features(paths: Sequence[Path], nets: Networks, batch: int = 16,
                   progress: Callable[[int], None] | None = None,
                   size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Per-image features of one image set: 'inception' [N, D], 'clip' / 'dino' [N, D] unit-norm."""
    out: dict[str, list[torch.Tensor]] = {}
    for sl in _batches(len(paths), batch):
        x = load_images(paths[sl], size)
        if nets.inception is not None:
            out.setdefault("inception", []).append(nets.inception(x).double().cpu())
        if nets.clip is not None:
            out.setdefault("clip", []).append(nets.clip.image_embeds(x))
        if nets.dino is not None:
            out.setdefault("dino", []).append(nets.dino(x))
        if progress:
            progress(sl.stop - sl.start)
    return {k: torch.cat(v) for k, v in out.items()}


def pair_metrics(paths_a: Sequence[Path], paths_b: Sequence[Path], metrics: list[str], nets: Networks,
                 batch: int = 16, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Per-pair values [N] of 'ssim', 'psnr' (inf = identical), 'lpips' between two aligned image lists."""
    from clear_cli.metrics import pixel

    out: dict[str, list[torch.Tensor]] = {}
    for sl in _batches(len(paths_a), batch):
        a, b = load_images(paths_a[sl]), load_images(paths_b[sl])
        if a.shape != b.shape:
            raise UsageError(f"image {paths_a[sl.start]} and {paths_b[sl.start]} differ in size",
                             "compare images drawn at one resolution")
        if "ssim" in metrics:
            out.setdefault("ssim", []).append(pixel.ssim(a, b))
        if "psnr" in metrics:
            out.setdefault("psnr", []).append(pixel.psnr(a, b))
        if "lpips" in metrics and nets.lpips is not None:
            out.setdefault("lpips", []).append(nets.lpips(a, b))
        if progress:
            progress(sl.stop - sl.start)
    return {k: torch.cat(v) for k, v in out.items()}
