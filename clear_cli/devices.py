"""`--device` and `--dtype`, resolved the same way by every command."""

from __future__ import annotations

import re
import warnings

import torch

from clear_cli.errors import UsageError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """auto -> cuda when available, else cpu; cpu; cuda; cuda:N (checked against the devices present)."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if m is None:
        raise UsageError(f"--device {device!r} is not a device", "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine", "use --device cpu")
    idx = int(m.group(1) or 0)
    if idx >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here",
                         f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", idx)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """auto -> bf16 on CUDA, fp32 on CPU; fp32 / bf16 / fp16 (fp16 warns: FLUX and T5 overflow in it)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {dtype!r} is not a dtype", "use auto, fp32, bf16 or fp16")
    out = DTYPES[name]
    if out is torch.float16:
        warnings.warn("fp16 overflows in FLUX and its T5 encoder (black or NaN images); prefer bf16", stacklevel=2)
    return out


def is_main_process() -> bool:
    """The one main-process rule for multi-process runs (torchrun / accelerate launch): every process runs the job
    and gets a Result; only the process of global rank 0 reports (`Result.is_main`). Read from the initialised
    process group, else from the launcher's RANK variable; a single process is always the main one."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0
