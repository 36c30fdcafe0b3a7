"""`clear gen --parallel patch|data`: the parts of `clear_cli.generate` that change when several processes share the work.

patch: every CLEAR denoising stage runs with the image token grid cut into bands of rows, one per process
(`PatchRunner.denoise`); the stage's input latents are broadcast from process 0 first (every process computed
them; this makes them bit-identical), and its output is all-gathered, so decoding (tiled VAE), the refinement
stages' resize / encode and the full-attention base stage run unchanged on every process. Each step reports its
time and the bytes each process sent, against what an all-gather of keys/values would have sent.

data: the planned images (names fixed before the split, so files are named as in a single run) are dealt out
round-robin; process 0 shows one progress bar over all of them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import torch

from clear_cli.parallel.attention import BandGroup
from clear_cli.parallel.bands import split_bands
from clear_cli.parallel.launch import ParallelRun
from clear_cli.parallel.processor import band_context, band_processors
from clear_cli.sampling.runner import StageRunner

STAT_KINDS = ("halo", "text", "pooled")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def check_stages(par: ParallelRun, stages, down_factor: int) -> None:
    """Refuse before any work when a CLEAR stage has fewer (units of f) token rows than processes."""
    if par.mode != "patch":
        return
    for st in stages:
        if st.attention == "clear":
            split_bands(st.grid[0], par.size, down_factor)


class _StepMeter:
    """Per transformer call (= per denoising step): time and bytes sent, max over processes; logged by process 0."""

    def __init__(self, runner: PatchRunner, group: BandGroup, steps: int):
        self.runner, self.group, self.steps = runner, group, steps
        self.records: list[dict] = []
        self._t0 = 0.0
        self._before: dict[str, int] = {}

    def __enter__(self) -> _StepMeter:
        tr = self.runner.pipe.transformer
        self._handles = [tr.register_forward_pre_hook(self._pre), tr.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()

    def _pre(self, _module, _args) -> None:
        self.runner.sync()
        self._before = self.group.comm.stats.snapshot()
        self._t0 = time.perf_counter()

    def _post(self, _module, _args, _out) -> None:
        self.runner.sync()
        dt = time.perf_counter() - self._t0
        comm = self.group.comm
        now = comm.stats.snapshot()
        delta = {k: now.get(k, 0) - self._before.get(k, 0) for k in now}
        keys = [*STAT_KINDS, "kv_all_gather (equivalent)"]
        vals = torch.tensor([dt, sum(delta.get(k, 0) for k in STAT_KINDS), *(delta.get(k, 0) for k in keys)],
                            dtype=torch.float64, device=getattr(comm, "device", "cpu"))
        vals = comm.max_(vals).tolist()  # report the slowest process and the busiest sender
        rec = {"step": len(self.records) + 1, "seconds": vals[0], "bytes_sent": int(vals[1]),
               **{f"{k}_bytes": int(v) for k, v in zip(STAT_KINDS, vals[2:5])}, "kv_all_gather_bytes": int(vals[5])}
        self.records.append(rec)
        parts = ", ".join(f"{k} {fmt_bytes(rec[f'{k}_bytes'])}" for k in STAT_KINDS if rec[f"{k}_bytes"])
        ratio = rec["kv_all_gather_bytes"] / rec["bytes_sent"] if rec["bytes_sent"] else float("inf")
        self.runner.par.log(f"    step {rec['step']}/{self.steps}: {rec['seconds']:.2f} s, sent "
                            f"{fmt_bytes(rec['bytes_sent'])} per process ({parts or 'nothing'}) vs "
                            f"{fmt_bytes(rec['kv_all_gather_bytes'])} to all-gather K/V ({ratio:.1f}x)")


class PatchRunner(StageRunner):
    """`StageRunner` whose CLEAR stages run one band of the token grid per process."""

    def __init__(self, par: ParallelRun, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.par = par
        self.step_stats: list[dict] = []  # every CLEAR step of the run: seconds, bytes by kind (max over processes)

    def denoise(self, latents, ids, stage, embeds, generator_desc: str, progress: bool):
        comm = self.par.comm
        latents = comm.broadcast_(latents.contiguous(), 0, "sync")
        if self.mode is None or self.mode[0] != "clear":  # full attention: every process runs the whole stage
            return comm.broadcast_(super().denoise(latents, ids, stage, embeds, generator_desc, progress)
                                   .contiguous(), 0, "sync")
        group = BandGroup.split(comm, stage.grid, self.down_factor)
        reach = self.window - 1
        rows = "/".join(str(e - s) for s, e in group.bands)
        self.par.log(f"  patch parallel: {comm.size} processes, bands of {rows} token rows, halo {reach} rows "
                     f"each side{', pooled tokens all-gathered' if self.down_factor > 1 else ''}")
        tr = self.pipe.transformer
        with band_processors(tr), band_context(group), _StepMeter(self, group, stage.steps) as meter:
            band = super().denoise(group.rows(latents), group.rows(ids, 0), stage, embeds, generator_desc, progress)
        self.step_stats.extend({"stage": stage.index, **r} for r in meter.records)
        if meter.records:
            n = len(meter.records)
            sent = sum(r["bytes_sent"] for r in meter.records)
            alt = sum(r["kv_all_gather_bytes"] for r in meter.records)
            secs = sum(r["seconds"] for r in meter.records)
            self.par.log(f"  patch parallel: {n} steps, {secs / n:.2f} s/step, {fmt_bytes(sent / n)} sent per "
                         f"process per step vs {fmt_bytes(alt / n)} for an all-gather of K/V")
        return group.gather_rows(band.contiguous())


def make_runner(par: ParallelRun, *args, **kwargs) -> StageRunner:
    """The runner for `par.mode`: a PatchRunner, or the plain runner (data mode: each process runs whole images)."""
    return PatchRunner(par, *args, **kwargs) if par.mode == "patch" else StageRunner(*args, **kwargs)


def run_images(par: ParallelRun, run_all: Callable, runner, plans: list, stages, cfg, base_info, target,
               progress: bool, say: Callable[[str], None]) -> list:
    """Run `run_all` (generate's loop over images) in `par`'s mode; every process returns every image's record."""
    check_stages(par, stages, runner.down_factor)
    if par.mode == "patch":
        return run_all(runner, plans, stages, cfg, base_info, target, progress, say)
    import torch.distributed as dist
    from clear_cli.logs import progress_bar as tqdm

    comm, n = par.comm, len(plans)
    mine = list(range(par.rank, n, par.size))
    comm.sum_(torch.zeros(1, device=comm.device))  # everyone has checked its outputs before anyone writes
    bar = tqdm(total=n, unit="image", desc=f"{par.size} processes", disable=not (progress and par.is_main),
               dynamic_ncols=True)
    results: list = []
    with bar:
        for i in range(math.ceil(n / par.size)):
            if i < len(mine):
                g = mine[i]
                out = run_all(runner, [plans[g]], stages, cfg, base_info, target, False, _renumber(say, g, n))
                results += [(g, o) for o in out]
            done = comm.sum_(torch.tensor([1.0 if i < len(mine) else 0.0], device=comm.device))
            bar.update(int(done.item()))
    gathered: list = [None] * par.size
    dist.all_gather_object(gathered, results)
    return [o for _, o in sorted((pair for part in gathered for pair in part), key=lambda p: p[0])]


def _renumber(say: Callable[[str], None], index: int, total: int) -> Callable[[str], None]:
    """generate's loop numbers the images it is given ([1/1]); number them within the whole run instead."""
    def out(msg: str) -> None:
        say(re.sub(r"^\[\d+/\d+\]", f"[{index + 1}/{total}]", msg))
    return out
