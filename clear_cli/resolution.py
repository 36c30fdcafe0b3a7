"""`--res` for every command: `1k|2k|4k|8k` (n x 1024 square), `WxH`, or one number -> (width, height) in pixels.

FLUX packs 16 x 16 pixels into one token (VAE /8, then 2 x 2 patches), so sides must be multiples of 16.
"""

from __future__ import annotations

import re

from clear_cli.errors import UsageError
from clear_cli.flux import PIXELS_PER_TOKEN
MAX_SIDE = 16384


def parse_res(text: str | int, what: str = "--res") -> tuple[int, int]:
    """Parse a resolution; a UsageError names the problem and the nearest valid sizes."""
    s = str(text).strip().lower()
    m_k = re.fullmatch(r"(\d+(?:\.\d+)?)k", s)
    m_wh = re.fullmatch(r"(\d+)\s*[x*]\s*(\d+)", s)
    if m_k:
        w = h = int(round(float(m_k.group(1)) * 1024))
    elif m_wh:
        w, h = int(m_wh.group(1)), int(m_wh.group(2))
    elif re.fullmatch(r"\d+", s):
        w = h = int(s)
    else:
        raise UsageError(f"{what} {text!r} is not a size", "use 1k, 2k, 4k, 8k, WxH (e.g. 2048x1024) or one number")
    for side in (w, h):
        if side <= 0:
            raise UsageError(f"{what} {text}: sizes must be positive", "e.g. --res 1024 or --res 2k")
        if side % PIXELS_PER_TOKEN:
            lo = side // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
            hi = lo + PIXELS_PER_TOKEN
            alt = f"{lo} or {hi}" if lo > 0 else str(hi)
            raise UsageError(f"{what} {text}: {side} is not a multiple of 16 (FLUX packs 16x16 pixels per token)",
                             f"use {alt}")
        if side > MAX_SIDE:
            raise UsageError(f"{what} {text}: {side} px is above the {MAX_SIDE} px limit")
    return w, h


def token_grid(text: str | int, what: str = "--res") -> tuple[int, int]:
    """The FLUX token grid (rows, columns) of a resolution."""
    w, h = parse_res(text, what)
    return h // PIXELS_PER_TOKEN, w // PIXELS_PER_TOKEN
