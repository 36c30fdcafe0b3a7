"""Multi-process generation: exact patch parallelism for CLEAR (halo exchange only) and data parallelism.

    torchrun --nproc_per_node 4 -m clear_cli gen "a blue plane" --res 8k --parallel patch

Patch: the image token grid is cut into bands of rows, one per process (`bands`); in every CLEAR attention layer a
process exchanges the r-1 halo rows of keys/values with its neighbours, all-gathers the small pooled tokens (f > 1)
and merges the text queries' partial softmaxes exactly (`attention`); everything else is token-wise and stays
local (`processor`). Every byte sent is counted where it is sent (`comm`). Data: prompts dealt out over processes.
"""

from __future__ import annotations

from clear_cli.parallel.attention import (
    BandGroup, BandKeys, band_attention, band_communicate, exchange_halos, gather_pooled, merge_text,
)
from clear_cli.parallel.bands import halo_plan, key_rows, split_bands
from clear_cli.parallel.comm import Comm, CommStats, DistComm, DryComm, ThreadComm, ThreadGroup
from clear_cli.parallel.launch import MODES, ParallelRun, is_main_process, start_parallel
from clear_cli.parallel.processor import band_context, band_processors

__all__ = [
    "BandGroup", "BandKeys", "band_attention", "band_communicate", "exchange_halos", "gather_pooled", "merge_text", "halo_plan", "key_rows",
    "split_bands", "Comm", "CommStats", "DistComm", "DryComm", "ThreadComm", "ThreadGroup", "MODES", "ParallelRun",
    "is_main_process", "start_parallel", "band_context", "band_processors",
]
