"""How the image token grid is cut into bands of rows (one per process), and which halo rows move where.

An image query at row y sees image keys in rows y-(r-1) .. y+(r-1) only (DESIGN.md §2: dy^2 < r^2), so a band of rows
[start, stop) needs the keys and values of rows [start-(r-1), stop+(r-1)) clipped to the grid: its own rows plus a
halo. When bands are thinner than the reach r-1, a halo spans several neighbours; the plan below handles any widths.
"""

from __future__ import annotations

from dataclasses import dataclass

from clear_cli.errors import UsageError


@dataclass(frozen=True)
class Transfer:
    """Rows [start, stop) of the token grid sent by process `src` (its own rows) to process `dst` (its halo)."""

    src: int
    dst: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def split_bands(height: int, parts: int, down_factor: int = 1) -> list[tuple[int, int]]:
    """Cut `height` token rows into `parts` bands [start, stop), as even as possible, each a whole multiple of
    `down_factor` rows (so every pooled f x f patch lies inside one band). Earlier bands get the extra units.

    UsageError when there are more processes than (units of f) rows: every process needs at least one.
    """
    f = int(down_factor)
    if parts < 1:
        raise ValueError(f"need at least one band, got {parts}")
    if f < 1 or height % f:
        raise ValueError(f"down_factor {down_factor} does not divide the {height} token rows")
    units = height // f
    if parts > units:
        what = (f"{units} token row{'s' * (units != 1)}" if f == 1
                else f"{units} band{'s' * (units != 1)} of {f} rows (down_factor {f})")
        raise UsageError(f"--parallel patch: {parts} processes but the image has only {what}; each process needs a "
                         "band of its own", f"use at most {units} process{'es' * (units != 1)} or a larger --res")
    base, extra = divmod(units, parts)
    bands, start = [], 0
    for i in range(parts):
        stop = start + (base + (1 if i < extra else 0)) * f
        bands.append((start, stop))
        start = stop
    return bands


def key_rows(band: tuple[int, int], height: int, window: int) -> tuple[int, int]:
    """Rows [lo, hi) whose keys the band's image queries can see: the band and r-1 rows on each side, clipped."""
    reach = int(window) - 1
    return max(0, band[0] - reach), min(height, band[1] + reach)


def halo_plan(bands: list[tuple[int, int]], window: int) -> list[Transfer]:
    """Every (src -> dst) transfer of halo rows, ordered by dst then src: the rows of src's band inside dst's reach."""
    height = bands[-1][1]
    out = []
    for dst, band in enumerate(bands):
        lo, hi = key_rows(band, height, window)
        for src, (s, e) in enumerate(bands):
            a, b = max(s, lo), min(e, hi)
            if src != dst and a < b:
                out.append(Transfer(src, dst, a, b))
    return out
