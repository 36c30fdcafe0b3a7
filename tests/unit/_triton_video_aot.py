"""Compile the 3-D Triton CLEAR kernels ahead of time for a CUDA arch without a GPU (Triton's bundled ptxas), as
tests/unit/_triton_aot.py does for the 2-D ones, and print each kernel's registers, stack and shared memory.

    PYTHONPATH=. python tests/unit/_triton_video_aot.py [CONFIG_NAME ...] [--arch 90] [--dtype bf16] [--head-dim 128]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from _triton_aot import compile_one  # noqa: E402


def kernels_for(config, dtype: str, head_dim: int, text: bool = True, i64: bool = False) -> list:
    """(kernel, constexprs, launch tile or None) for the 3-D kernels of a forward + backward (the shared 2-D dense
    kernels are compiled by _triton_aot)."""
    import clear_cli.attention.video_triton as vt

    bd = max(16, 1 << (head_dim - 1).bit_length())
    base = dict(D=head_dim, BLOCK_D=bd, PREC="ieee" if dtype == "fp32" else "tf32", HAS_TEXT=text, I64=i64)

    def tiles(t):
        return dict(QT=t.q_tile[0], QA=t.q_tile[1], QB=t.q_tile[2], KT=t.k_tile[0], KA=t.k_tile[1], KB=t.k_tile[2])

    f, b, c = config.fwd, config.bwd, config.dkdv_or_bwd
    return [(vt._fwd_video_kernel, dict(base, **tiles(f)), f),
            (vt._bwd_dq_video_kernel, dict(base, **tiles(b)), b),
            (vt._bwd_dkdv_video_kernel, dict(base, **tiles(c)), c)]


def main() -> None:
    from clear_cli.attention.video_plan import CANDIDATES, SMALL, WIDE

    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--i64", action="store_true", help="the int64 rule variant (huge windows)")
    a = ap.parse_args()
    configs = {c.name: c for c in (*CANDIDATES, *SMALL, *WIDE)}
    for name in a.names or list(configs):
        for fn, consts, launch in kernels_for(configs[name], a.dtype, a.head_dim, i64=a.i64):
            row = compile_one(fn, consts, a.dtype, a.arch, launch.num_warps, launch.num_stages)
            print(f"sm{a.arch} {a.dtype} d{a.head_dim} {name:14} {row['kernel']:24} regs {row['regs']} "
                  f"stack {row['stack']} smem {row['shared']}", flush=True)


if __name__ == "__main__":
    main()
