"""What patch parallelism sends per attention layer at any size, counted by the real code on meta tensors.

`layer_bytes` runs `band_communicate` and `merge_text` (the only communication of a band's attention layer) for
every process of a group with a counting-only `DryComm`: no memory, no transfer, and exactly the bytes the send
wrappers of a real run count. bench/comm_figures.py turns it into the BENCHMARKS.md tables.
"""

from __future__ import annotations

import torch

from clear_cli.flux import D_MODEL as FLUX_D_MODEL
from clear_cli.flux import HEADS as FLUX_HEADS
from clear_cli.flux import TEXT_LEN as FLUX_TEXT_LEN
from clear_cli.parallel.attention import BandGroup, band_communicate, merge_text
from clear_cli.parallel.comm import DryComm


def layer_bytes(grid: tuple[int, int], procs: int, window: int, down_factor: int = 1,
                text_len: int = FLUX_TEXT_LEN, heads: int = FLUX_HEADS, head_dim: int = FLUX_D_MODEL // FLUX_HEADS,
                dtype: torch.dtype = torch.bfloat16) -> list[dict[str, int]]:
    """Per process (rank order): band rows, bytes sent in one attention layer by kind (halo, pooled, text), and
    `kv_all_gather`, what an all-gather of the image keys/values (sequence parallelism) would send instead."""
    out = []
    for rank in range(procs):
        comm = DryComm(rank, procs)
        group = BandGroup.split(comm, grid, down_factor)
        hb, w = group.band_grid
        k = torch.empty(1, heads, text_len + hb * w, head_dim, dtype=dtype, device="meta")
        band_communicate(k, k, text_len=text_len, group=group, window=window)
        if text_len:  # the text queries' partial results are merged in fp32 whatever the model's dtype
            o = torch.empty(1, heads, text_len, head_dim, dtype=torch.float32, device="meta")
            merge_text(o, torch.empty(1, heads, text_len, dtype=torch.float32, device="meta"), comm)
        out.append({"rows": hb, **comm.stats.sent, "kv_all_gather": comm.stats.equivalent["kv_all_gather"]})
    return out
