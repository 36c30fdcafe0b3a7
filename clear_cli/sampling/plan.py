"""The SDEdit cascade's plan, computed without a model: stage sizes, sigma schedules and start sigmas (DESIGN.md §5).

The scheduler shift. FLUX's stock dynamic rule makes mu linear in the token count with no cap (mu 3.2 at 2K,
11.5 at 4K, 44.8 at 8K): an SDEdit stage at strength 0.7 would start at sigma 0.98 at 2K and 1.0 (pure noise,
the base image thrown away) at 4K-8K. Refinement stages therefore use the *base* stage's shift (static), so a stage
at strength s runs round(refine_steps * s) steps of the base resolution's schedule from u = s down, starting at
that schedule's sigma for s (0.88 for s = 0.7 with FLUX at 1024^2; the authors' static shift 3 gives 0.875). Every stage's start
sigma is checked before anything runs. Sampling directly above the base resolution (`cascade=False`) clamps mu at
the scheduler's `max_image_seq_len` for the same reason.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from clear_cli.errors import ClearError, UsageError
from clear_cli.flux import PIXELS_PER_TOKEN

DEFAULT_NTK = 10.0  # the authors' factor for every high-resolution stage
START_SIGMA_LIMIT = 0.95  # a refinement stage starting above this has (almost) thrown its input away


@dataclass
class Stage:
    """One sampling stage of the plan (computed without running the model)."""

    index: int
    kind: str  # base | refine | direct
    width: int
    height: int
    attention: str  # full | clear
    sigmas: list[float]
    mu: float | None
    start_sigma: float
    steps: int
    guidance: float
    strength: float | None = None
    stock_start_sigma: float | None = None  # what the stock dynamic shift would start at (refine stages)
    ntk_factor: float | None = None
    proportional: bool = False

    @property
    def grid(self) -> tuple[int, int]:
        return self.height // PIXELS_PER_TOKEN, self.width // PIXELS_PER_TOKEN

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("sigmas")
        return d


_SCHED_DEFAULTS = dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
                       shift=1.0, use_dynamic_shifting=True, time_shift_type="exponential")


def _cfg(config: Any, key: str) -> Any:
    getter = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    v = getter(key, None)
    return _SCHED_DEFAULTS[key] if v is None else v


def stock_mu(tokens: int, config: Any) -> float:
    """FLUX's dynamic-shift mu: linear in the image token count, no cap (diffusers' calculate_shift)."""
    b0, b1 = _cfg(config, "base_image_seq_len"), _cfg(config, "max_image_seq_len")
    s0, s1 = _cfg(config, "base_shift"), _cfg(config, "max_shift")
    m = (s1 - s0) / (b1 - b0)
    return tokens * m + (s0 - m * b0)


def shift_sigma(u: float, mu: float | None, config: Any) -> float:
    """The scheduler's shift of an unshifted sigma `u`: dynamic with `mu`, or the config's static shift."""
    if u <= 0:
        return 0.0
    if mu is None or not _cfg(config, "use_dynamic_shifting"):
        s = float(_cfg(config, "shift"))
        return s * u / (1 + (s - 1) * u)
    if _cfg(config, "time_shift_type") == "linear":
        return mu / (mu + (1 / u - 1))
    if mu > 700:  # exp overflows; the shifted sigma is 1 for any u > 0 here
        return 1.0
    e = math.exp(mu)
    return e / (e + (1 / u - 1))


def _grid_u(n: int) -> list[float]:
    """The stock unshifted schedule: linspace(1, 1/n, n)."""
    return [1.0] if n == 1 else [1.0 - i * (1.0 - 1.0 / n) / (n - 1) for i in range(n)]


def base_size(target: tuple[int, int], base_res: int) -> tuple[int, int]:
    """About base_res^2 pixels with the target's aspect ratio, sides multiples of 16 (at least 16)."""
    w, h = target
    scale = base_res / math.sqrt(w * h)
    return max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16)


def stage_sizes(target: tuple[int, int], base_res: int, upscale: int, cascade: bool = True,
                align: int = 16) -> list[tuple[int, int]]:
    """Sizes of the stages: [target] when sampled directly, else base, base*upscale, ..., target.

    A cascade is used only when the target has more than 1.5x the base's pixels (a slightly larger image is
    sampled directly). Intermediate sizes are multiples of `align` px (16 x down_factor: pooling needs whole
    f x f token patches).
    """
    w, h = target
    if not cascade or w * h <= 1.5 * base_res * base_res:
        return [target]
    bw, bh = base_size(target, base_res)
    sizes = [(bw, bh)]
    f = 1
    while True:
        f *= upscale
        nw, nh = max(align, round(bw * f / align) * align), max(align, round(bh * f / align) * align)
        if nw * nh * 1.5 >= w * h:  # close enough (or past): the last stage lands on the target
            break
        sizes.append((nw, nh))
    sizes.append(target)
    return sizes


def check_target(target: tuple[int, int], down_factor: int) -> int:
    """With down_factor f the CLEAR stages need whole f x f token patches: sides multiples of 16 f px."""
    align = 16 * int(down_factor)
    if down_factor > 1 and (target[0] % align or target[1] % align):
        raise UsageError(f"--res {target[0]}x{target[1]}: with down_factor {down_factor} the sides must be multiples "
                         f"of {align} px (whole {down_factor}x{down_factor} token patches)",
                         f"use e.g. {round(target[0] / align) * align or align}x"
                         f"{round(target[1] / align) * align or align}")
    return align


def plan_stages(target: tuple[int, int], scheduler_config: Any, *, base_res: int, train_res: int,
                upscale: int = 2, strength: float = 0.7, steps: int = 28, refine_steps: int = 20,
                guidance: float = 3.5, refine_guidance: float = 7.5, cascade: bool = True,
                ntk_factor: float | None = None, down_factor: int = 1) -> list[Stage]:
    """The stages, their sigma schedules and start sigmas, without running anything.

    Refinement stages use the base stage's mu (static), never the stock dynamic rule at their own size.
    Raises ClearError if a refinement stage would start at (almost) pure noise, UsageError if the target's
    token grid is not a multiple of `down_factor`.
    """
    align = check_target(target, down_factor)
    sizes = stage_sizes(target, base_res, upscale, cascade, align)
    ntk = DEFAULT_NTK if ntk_factor is None else float(ntk_factor)
    ntk = None if ntk == 1.0 else ntk
    max_tokens = int(_cfg(scheduler_config, "max_image_seq_len"))
    stages: list[Stage] = []

    def high(w: int, h: int) -> bool:  # above the training resolution: NTK + proportional attention
        return w * h > 1.5 * train_res * train_res

    if len(sizes) == 1:
        w, h = sizes[0]
        mu = stock_mu(min((w // 16) * (h // 16), max_tokens), scheduler_config)
        sig = [shift_sigma(u, mu, scheduler_config) for u in _grid_u(steps)]
        stages.append(Stage(0, "direct", w, h, "clear", sig, mu, sig[0], steps, guidance,
                            ntk_factor=ntk if high(w, h) else None, proportional=high(w, h)))
        return stages
    bw, bh = sizes[0]
    mu_base = stock_mu(min((bw // 16) * (bh // 16), max_tokens), scheduler_config)
    sig = [shift_sigma(u, mu_base, scheduler_config) for u in _grid_u(steps)]
    stages.append(Stage(0, "base", bw, bh, "full", sig, mu_base, sig[0], steps, guidance))
    # The tail of a refine_steps schedule from u = strength: round(refine_steps * strength) evenly spaced steps
    # (the stock grid's own tail when it has a point at the strength; 20 steps at 0.7: u = 0.70, 0.65, ..., 0.05).
    n_run = max(1, min(refine_steps, round(refine_steps * strength)))
    grid = [strength * (n_run - i) / n_run for i in range(n_run)]
    for i, (w, h) in enumerate(sizes[1:], start=1):
        sig = [shift_sigma(u, mu_base, scheduler_config) for u in grid]
        stock = shift_sigma(grid[0], stock_mu((w // 16) * (h // 16), scheduler_config), scheduler_config)
        st = Stage(i, "refine", w, h, "clear", sig, mu_base, sig[0], n_run, refine_guidance, strength=strength,
                   stock_start_sigma=stock, ntk_factor=ntk, proportional=True)
        if st.start_sigma > START_SIGMA_LIMIT and strength < 0.9:
            raise ClearError(f"stage {i} ({w}x{h}) would start at sigma {st.start_sigma:.3f} for strength "
                             f"{strength}: (almost) pure noise, the base image would be lost",
                             "the scheduler config's shift is too large for SDEdit; lower --strength")
        stages.append(st)
    return stages
