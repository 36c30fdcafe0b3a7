"""Compile the Triton CLEAR kernels ahead of time for a CUDA arch, without a GPU (Triton's bundled ptxas), and read
each kernel's registers, spill/stack bytes and shared memory from the cubin. Catches what the interpreter cannot
(a kernel the real compiler rejects) and shows register pressure per launch config.

    PYTHONPATH=. python tests/unit/_triton_aot.py [CONFIG_NAME ...] [--arch 90] [--dtype bf16] [--head-dim 128]

Used by tests/unit/test_attention_triton.py (slow) for the default configs.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile

POINTERS = {"Q", "K", "V", "KP", "VP", "O", "DO", "DQ", "DK", "DV", "KX", "VX", "DKX", "DVX"}
FP32_POINTERS = {"LSE", "LSEP", "OP", "DELTA", "DQP", "DKP", "DVP"}
I32_POINTERS = {"REL", "CNT"}
FLOATS = {"qk_scale", "sm_scale"}


def _signature(fn, dtype: str, consts: dict) -> dict:
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = f"*{dtype}"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name in I32_POINTERS:
            sig[name] = "*i32"
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def kernels_for(config, dtype: str, head_dim: int, text: bool = True, pool: bool = True) -> list:
    """(kernel, constexprs, TileConfig or None) for every kernel a forward + backward launches with `config`."""
    import clear_cli.attention.triton_clear as tc

    bd = max(16, 1 << (head_dim - 1).bit_length())
    prec = "ieee" if dtype == "fp32" else "tf32"
    f, b, c = config.fwd, config.bwd, config.dkdv_or_bwd
    base = dict(D=head_dim, BLOCK_D=bd, PREC=prec)

    def tiles(t):
        return dict(QA=t.q_tile[0], QB=t.q_tile[1], KA=t.k_tile[0], KB=t.k_tile[1])

    def dense(t, split):
        return dict(base, BM=t.block_m, BN=t.block_n, SPLIT=split)

    return [
        (tc._fwd_image_kernel, dict(base, **tiles(f), HAS_TEXT=text, HAS_POOL=pool), f),
        (tc._fwd_text_kernel, dense(f, True), f),
        (tc._merge_kernel, dict(D=head_dim, BLOCK_D=bd, BM=32), None),
        (tc._delta_kernel, dict(D=head_dim, BLOCK_D=bd, BM=64), None),
        (tc._bwd_dq_image_kernel, dict(base, **tiles(b), HAS_TEXT=text, HAS_POOL=pool), b),
        (tc._bwd_dkdv_image_kernel, dict(base, **tiles(c), HAS_TEXT=text), c),
        (tc._bwd_dkdv_dense_kernel, dense(c, True), c),
        (tc._bwd_dq_text_kernel, dense(b, True), b),
    ]


def compile_one(fn, consts: dict, dtype: str, arch: int, num_warps: int, num_stages: int) -> dict:
    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(fn.fn).parameters)
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, consts),
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    row = {"kernel": fn.fn.__name__, "shared": k.metadata.shared, "regs": None, "stack": None}
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        try:
            out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        finally:
            os.unlink(f.name)
        regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
        row["regs"] = int(regs.group(1)) if regs else None
        row["stack"] = int(stack.group(1)) if stack else None
    return row


def compile_config(config, arch: int = 90, dtype: str = "bf16", head_dim: int = 128) -> list[dict]:
    rows = []
    for fn, consts, launch in kernels_for(config, dtype, head_dim):
        warps, stages = (launch.num_warps, launch.num_stages) if launch else (4, 1)
        rows.append(compile_one(fn, consts, dtype, arch, warps, stages))
    return rows


def main() -> None:
    from clear_cli.attention.triton_plan import CANDIDATES, SMALL, WIDE

    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--head-dim", type=int, default=128)
    a = ap.parse_args()
    configs = {c.name: c for c in (*CANDIDATES, SMALL, WIDE)}
    for name in a.names or list(configs):
        for row in compile_config(configs[name], a.arch, a.dtype, a.head_dim):
            print(f"sm{a.arch} {a.dtype} d{a.head_dim} {name:16} {row['kernel']:24} regs {row['regs']} "
                  f"stack {row['stack']} smem {row['shared']}", flush=True)


if __name__ == "__main__":
    main()
