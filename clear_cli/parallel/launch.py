"""Starting a multi-process run: the process group (NCCL on GPUs, gloo on CPU), each process's device, the mode.

Processes come from a launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:

    torchrun --nproc_per_node 4 -m clear_cli gen "a blue plane" --res 8k --parallel patch
    accelerate launch --num_processes 4 -m clear_cli gen --prompts prompts.txt --parallel data

Process i uses GPU LOCAL_RANK (or the CPU with gloo). A process group that the caller already initialised (a
script run under accelerate) is used as it is and left alone.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clear_cli.devices import is_main_process as _is_main_process
from clear_cli.errors import UsageError
from clear_cli.logs import Log

if TYPE_CHECKING:
    from clear_cli.parallel.comm import DistComm

MODES = ("none", "patch", "data")
LAUNCH_HINT = ("start one process per band or GPU: torchrun --nproc_per_node 2 -m clear_cli gen ... --parallel {mode}, "
               "or accelerate launch --num_processes 2 -m clear_cli gen ...")



@dataclass
class ParallelRun:
    """This process's place in a multi-process generation."""

    mode: str  # patch | data
    comm: DistComm
    device: str  # what this process loads the model on: cpu or cuda:LOCAL_RANK
    owns_group: bool  # we initialised the process group (and destroy it at exit)
    log: Log = field(default=lambda _msg: None)

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def is_main(self) -> bool:
        return self.comm.rank == 0

    def main_only(self, log: Log | None) -> Log | None:
        """`log` on process 0, silence elsewhere (one copy of every line); also kept as `self.log`."""
        if log is None:
            return None
        out: Log = log if self.is_main else (lambda _msg: None)
        self.log = out
        return out


def check_mode(mode: str) -> str:
    m = str(mode or "none").strip().lower()
    if m not in MODES:
        raise UsageError(f"--parallel {mode!r} is not one of {', '.join(MODES)}",
                         "patch: one image split over the processes; data: prompts split over them")
    return m


def launched() -> bool:
    """True under a distributed launcher (torchrun / accelerate launch) or with an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def start_parallel(mode: str, device: str = "auto", *, compare: bool = False) -> ParallelRun | None:
    """Join (or start) the process group for `--parallel MODE`; None for `none`. UsageError, one line, when the
    process was not started by a distributed launcher or the options cannot be split."""
    m = check_mode(mode)
    if m == "none":
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError(f"--parallel {m} needs torch.distributed, which this torch build lacks")
    if not launched():
        raise UsageError(f"--parallel {m} needs a distributed launch, but this is a single process",
                         LAUNCH_HINT.format(mode=m))
    if m == "patch" and compare:
        raise UsageError("--compare cannot be split with --parallel patch (its full-attention run is not local)",
                         "drop --compare, or use --parallel data")
    name = str(device or "auto").strip().lower()
    owns = not dist.is_initialized()
    rank = dist.get_rank() if not owns else int(os.environ["RANK"])
    size = dist.get_world_size() if not owns else int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if name.startswith("cuda:") and size > 1:
        raise UsageError(f"--device {device} would put every process on one GPU",
                         "pass --device cuda (or auto): process i uses GPU LOCAL_RANK")
    use_cuda = torch.cuda.is_available() if name == "auto" else name.startswith("cuda")
    if name not in ("auto", "cpu") and not name.startswith("cuda"):
        raise UsageError(f"--device {device!r} is not a device", "use auto, cpu or cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine", "use --device cpu")
        if local >= torch.cuda.device_count():
            raise UsageError(f"process {rank} has LOCAL_RANK {local} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s)", "start at most one process per GPU")
        torch.cuda.set_device(local)
        dev = f"cuda:{local}"
    else:
        dev = "cpu"
    if owns:
        backend = "nccl" if use_cuda else "gloo"
        kwargs = {"device_id": torch.device(dev)} if use_cuda else {}
        dist.init_process_group(backend=backend, **kwargs)
        atexit.register(_destroy)
    from clear_cli.parallel.comm import DistComm

    return ParallelRun(mode=m, comm=DistComm(dev), device=dev, owns_group=owns)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


is_main_process = _is_main_process  # the one rule (clear_cli/devices.py), kept here for parallel callers
