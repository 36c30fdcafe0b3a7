"""Communication of patch-parallel CLEAR per attention layer: halo exchange vs an all-gather of keys/values.

Figures (no GPU needed): runs the real communication code of `clear_cli.parallel` (band_communicate, merge_text) for
every process of the group on meta tensors with a counting-only communicator, so the bytes are those the send
wrappers count in a real run. FLUX sizes: d_model 3072 (24 heads x 128), T = 512 text tokens, bf16.

    python bench/comm_figures.py                      # print the tables
    python bench/comm_figures.py --write BENCHMARKS.md # (re)write the "Multi-GPU communication" section

Measurement (GPUs, one process per GPU): times one layer's communication, halo exchange + text merge against
`all_gather` of the band's keys/values, with real tensors over NCCL (gloo on CPU for a dry run at small sizes):

    torchrun --nproc_per_node 4 bench/comm_figures.py --measure --res 4k --window 16
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch

from clear_cli.parallel import BandGroup, band_communicate, merge_text
from clear_cli.parallel.traffic import FLUX_D_MODEL as D_MODEL
from clear_cli.parallel.traffic import FLUX_HEADS as HEADS
from clear_cli.parallel.traffic import FLUX_TEXT_LEN as TEXT_LEN
from clear_cli.parallel.traffic import layer_bytes

RES = {"4K": 4096, "8K": 8192}
PROCS = (2, 4, 8)
WINDOWS = (8, 16, 32)
BEGIN, END = "<!-- comm_figures:begin -->", "<!-- comm_figures:end -->"


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def tables() -> str:
    lines = [
        "Per attention layer and process (the busiest process; interior bands send to two sides), MB = 10^6 bytes.",
        "FLUX sizes: d_model 3072 (24 heads x 128), T = 512, bf16 keys/values; text merge in fp32. Counted by the",
        "send wrappers of `clear_cli/parallel/comm.py` running the real code on meta tensors (ring model for",
        "collectives: all-reduce 2(P-1)/P x size, all-gather (P-1) x chunk). All-gather of K/V = what sequence",
        "parallelism sends so that every process holds every key and value.",
        "",
        "| res | tokens | P | r | band rows | halo | text merge | total | all-gather K/V | less |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, px in RES.items():
        g = px // 16
        for p in PROCS:
            for r in WINDOWS:
                ranks = layer_bytes((g, g), p, r)
                worst = max(ranks, key=lambda d: d.get("halo", 0) + d.get("text", 0))
                total = worst.get("halo", 0) + worst.get("text", 0)
                ag = max(d["kv_all_gather"] for d in ranks)
                lines.append(f"| {name} | {g}x{g} | {p} | {r} | {worst['rows']} | {mb(worst.get('halo', 0))} | "
                             f"{mb(worst.get('text', 0))} | {mb(total)} | {mb(ag)} | {ag / total:.1f}x |")
    lines += [
        "",
        "With down-sampled tokens (f = 4, the published r = 8 / 16 checkpoints), each process also all-gathers its",
        "band's pooled keys/values (1/16 of its tokens); the halo and text merge are as above:",
        "",
        "| res | P | pooled all-gather | r = 8 total | r = 16 total | all-gather K/V | less (r = 8 / 16) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, px in RES.items():
        g = px // 16
        for p in PROCS:
            tot, pooled, ag = {}, 0, 0
            for r in (8, 16):
                ranks = layer_bytes((g, g), p, r, down_factor=4)
                tot[r] = max(sum(d.get(k, 0) for k in ("halo", "text", "pooled")) for d in ranks)
                pooled = max(d.get("pooled", 0) for d in ranks)
                ag = max(d["kv_all_gather"] for d in ranks)
            lines.append(f"| {name} | {p} | {mb(pooled)} | {mb(tot[8])} | {mb(tot[16])} | {mb(ag)} | "
                         f"{ag / tot[8]:.1f}x / {ag / tot[16]:.1f}x |")
    return "\n".join(lines)


def section() -> str:
    return "\n".join([
        BEGIN,
        "## Multi-GPU communication (patch parallelism)",
        "",
        "`clear gen --parallel patch` cuts the token grid into one band of rows per process. Per attention layer a",
        "process sends only the r-1 rows of keys/values its neighbours' circles reach (point-to-point), its text",
        "queries' partial softmax (an exact log-sum-exp merge: all-reduce of the max, then of the weighted sums),",
        "and, with f > 1, its band's pooled tokens. Sequence parallelism (all-gather of keys/values) sends every",
        "band to every process. Produced by `python bench/comm_figures.py --write BENCHMARKS.md` (no GPU needed).",
        "",
        tables(),
        "",
        "Exactness (CPU, gloo, tiny-random FLUX, fp32): 2 and 3 processes reproduce the single-process latents to",
        "< 1e-4 (bands thicker and thinner than the reach, f = 1 / 2 / 4): `pytest -m slow tests/integration/"
        "test_parallel_gen.py`. Timings of the exchange on GPUs: `torchrun --nproc_per_node P bench/comm_figures.py "
        "--measure` (not measured yet: no multi-GPU machine here).",
        END,
    ])


def write_section(path: Path) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    new = section()
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _m: new, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def measure(res: int, window: int, down_factor: int, repeats: int, dtype: torch.dtype) -> None:
    """Time one layer's communication with real tensors under torchrun (NCCL on GPUs, gloo on CPU)."""
    import torch.distributed as dist

    from clear_cli.parallel import DistComm

    cuda = torch.cuda.is_available()
    if cuda:
        import os

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    comm = DistComm(dev)
    g = res // 16
    group = BandGroup.split(comm, (g, g), down_factor)
    hb, w = group.band_grid
    hd = D_MODEL // HEADS
    k = torch.randn(1, HEADS, TEXT_LEN + hb * w, hd, dtype=dtype, device=dev)
    o = torch.randn(1, HEADS, TEXT_LEN, hd, dtype=torch.float32, device=dev)
    lse = torch.randn(1, HEADS, TEXT_LEN, dtype=torch.float32, device=dev)
    kv = torch.stack([k[:, :, TEXT_LEN:], k[:, :, TEXT_LEN:]]).contiguous()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def timed(fn) -> float:
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync()
        return (time.perf_counter() - t0) / repeats

    comm.stats.reset()
    t_halo = timed(lambda: (band_communicate(k, k, text_len=TEXT_LEN, group=group, window=window),
                            merge_text(o, lse, comm)))
    sent = comm.stats.total // (repeats + 1)
    t_ag = timed(lambda: comm.all_gather(kv, "kv", sizes=[(e - s) * w for s, e in group.bands], dim=3))
    ag = comm.stats.sent["kv"] // (repeats + 1)
    t = torch.tensor([t_halo, t_ag], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if comm.rank == 0:
        print(f"res {res} ({g}x{g} tokens), P {comm.size}, r {window}, f {down_factor}, {dtype}: per layer "
              f"halo+merge {t[0].item() * 1e3:.2f} ms ({sent / 1e6:.1f} MB/process) vs all-gather K/V "
              f"{t[1].item() * 1e3:.2f} ms ({ag / 1e6:.1f} MB/process) on {dev.type}")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", type=Path, help="write the section into this Markdown file (e.g. BENCHMARKS.md)")
    ap.add_argument("--measure", action="store_true", help="time real transfers (run under torchrun)")
    ap.add_argument("--res", default="4k", help="--measure: 4k, 8k or pixels")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--down-factor", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    a = ap.parse_args(argv)
    if a.measure:
        res = int(a.res[:-1]) * 1024 if a.res.lower().endswith("k") else int(a.res)
        measure(res, a.window, a.down_factor, a.repeats, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
        return 0
    if a.write:
        write_section(a.write)
        print(f"wrote the Multi-GPU communication section of {a.write}")
    else:
        print(tables())
    return 0


if __name__ == "__main__":
    sys.exit(main())
