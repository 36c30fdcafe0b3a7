"""The 3-D Triton kernel under the Triton interpreter, against the dense reference: a child process of
tests/unit/test_attention_video_triton.py (TRITON_INTERPRET=1 must be set before the kernels are defined).

    TRITON_INTERPRET=1 PYTHONPATH=. python tests/unit/_triton_video_interp.py default   # or case names

Prints one JSON object: {case: {"err": {...}, "scale": {...}, ...}}; errors are max |triton - reference| with the
reference in fp32 on the same (rounded) inputs; `scale` is max(1, max |reference|) per output.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib

import torch

# (batch, heads, (T, H, W), global tokens, window, time_window, head_dim, dtype, fwd tiles, bwd tiles, splits, layout)
# tiles: (query tile, key tile), each (frames, rows, columns); dk/dv runs the backward tiles swapped.
A = ((2, 2, 4), (1, 4, 4))
B = ((1, 4, 4), (2, 2, 4))
C = ((4, 2, 2), (2, 2, 4))
CASES = {
    "fp32-ragged-noncubic-bnhd": (1, 2, (5, 6, 7), 0, 6, 3, 32, "fp32", A, B, 0, "bnhd"),   # full + partial tiles
    "fp32-rt0-same-frame": (2, 1, (3, 5, 9), 0, 3, 0, 32, "fp32", B, A, 0, "bhnd"),
    "fp32-window-over-volume-global": (1, 1, (3, 4, 5), 3, 30, 9, 64, "fp32", A, C, 2, "bhnd"),
    "fp32-T1-equals-2d": (1, 2, (1, 9, 13), 0, 4, 3, 32, "fp32", B, B, 0, "bhnd"),
    "fp32-global-odd-split-window1": (1, 1, (4, 3, 6), 5, 1, 1, 32, "fp32", C, A, 3, "bnhd"),
    "fp32-big-coeffs-int64": (1, 1, (2, 3, 5), 0, 40000, 30000, 16, "fp32", B, B, 0, "bhnd"),
    "fp16-ragged-global": (1, 2, (5, 5, 6), 2, 2, 3, 64, "fp16", A, C, 0, "bnhd"),
    "fp16-rt0": (1, 1, (4, 6, 5), 0, 3, 0, 32, "fp16", C, B, 0, "bhnd"),
}
SLOW = ("fp32-rt0-same-frame", "fp32-T1-equals-2d", "fp16-ragged-global")
SUITES = {"default": [c for c in CASES if c not in SLOW] + ["wan-model", "compile"], "slow": list(SLOW)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _make(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.transpose(1, 2).contiguous().transpose(1, 2) if layout == "bnhd" else x.contiguous()


def run_case(case: tuple) -> dict:
    from clear_cli.attention.video_geometry import reference_video_attention
    from clear_cli.attention.video_plan import VideoTileConfig, VideoTritonConfig
    from clear_cli.attention.video_triton import clear_video_triton_attention

    b, nh, grid, g, r, rt, d, dname, ft, bt, splits, layout = case
    dtype = DTYPES[dname]
    n = g + grid[0] * grid[1] * grid[2]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v, do = (torch.randn(b, nh, n, d, generator=gen).to(dtype) for _ in range(4))
    leaves = [_make(x, layout).requires_grad_(True) for x in (q, k, v)]
    cfg = VideoTritonConfig(VideoTileConfig(*ft), VideoTileConfig(*bt), VideoTileConfig(bt[1], bt[0]), splits)
    kw = dict(text_len=g, grid=grid, window=r, time_window=rt)
    t0 = time.perf_counter()
    out = clear_video_triton_attention(*leaves, config=cfg, **kw)
    grads = torch.autograd.grad(out, leaves, do)
    seconds = time.perf_counter() - t0
    ref_leaves = [x.detach().float().requires_grad_(True) for x in leaves]
    ref = reference_video_attention(*ref_leaves, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
    err, scale = {}, {}
    for name, x, y in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads]):
        err[name] = float((x.detach().float() - y.detach()).abs().max())
        scale[name] = max(1.0, float(y.detach().abs().max()))
    return {"err": err, "scale": scale, "seconds": round(seconds, 2), "dtype": dname,
            "finite": bool(all(torch.isfinite(x).all() for x in [out, *grads])),
            "same_layout": out.stride() == leaves[0].stride()}


def run_wan_model() -> dict:
    """A tiny random WanTransformer3DModel linearized with backend='triton' against backend='reference': output and
    the self-attention parameters' gradients (the processor hands the kernel transposed [B, N, heads, D] views)."""
    from diffusers import WanTransformer3DModel

    from clear_cli.attention import video_plan
    from clear_cli.attention.wan import linearize_wan, unlinearize_wan

    # 32-token tiles instead of fp32's 16 (the interpreter's time grows with the number of programs)
    video_plan.TUNED[video_plan.config_key((3, 5, 6), 3, 2, 12, torch.float32, None)] = video_plan.WIDE[0]
    torch.manual_seed(0)
    tr = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                               out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                               cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 4, 3, 10, 12, generator=g), torch.tensor([500]), torch.randn(1, 7, 16, generator=g))
    params = {f"{i}.{n}": p for i, b in enumerate(tr.blocks) for n, p in b.attn1.named_parameters()}
    res = {}
    for backend in ("reference", "triton"):
        linearize_wan(tr, window=3, time_window=2, backend=backend)
        tr.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = tr(*x).sample
        out.square().mean().backward()
        res[backend] = (out.detach(), {n: p.grad.clone() for n, p in params.items()}, time.perf_counter() - t0)
        unlinearize_wan(tr)
    (o_ref, g_ref, _), (o_tri, g_tri, sec) = res["reference"], res["triton"]
    err = {"out": float((o_tri - o_ref).abs().max())}
    scale = {"out": max(1.0, float(o_ref.abs().max()))}
    for name, gr in g_ref.items():   # each gradient relative to its own size
        err[name] = float((g_tri[name] - gr).abs().max())
        scale[name] = max(1e-30, float(gr.abs().max()))
    return {"err": err, "scale": scale, "seconds": round(sec, 2), "dtype": "fp32", "finite": True,
            "same_layout": True, "n_grads": len(g_ref)}


def run_compiled() -> dict:
    """torch.compile(fullgraph=True) through the dispatcher with backend='triton' and (ordered as on CUDA) 'auto':
    no graph break, the reference's values and gradients."""
    from clear_cli.attention import video_kernels
    from clear_cli.attention.video_geometry import reference_video_attention
    from clear_cli.attention.video_kernels import clear_video_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 2 + 48, 32, generator=g) for _ in range(3))
    kw = dict(text_len=2, grid=(3, 4, 4), window=2, time_window=1)
    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = reference_video_attention(*ref_leaves, **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    err, scale = {}, {}
    video_kernels.AUTO_ORDER["cpu"] = ("triton", "tiled")
    try:
        for label in ("triton", "auto"):
            torch._dynamo.reset()
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            fn = torch.compile(lambda q, k, v: clear_video_attention(q, k, v, backend=label, **kw), fullgraph=True,
                               backend="aot_eager")
            out = fn(*leaves)
            grads = torch.autograd.grad(out.square().sum(), leaves)
            for name, a, b in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref, *ref_grads]):
                err[f"{label}-{name}"] = float((a.detach() - b.detach()).abs().max())
                scale[f"{label}-{name}"] = max(1.0, float(b.detach().abs().max()))
    finally:
        del video_kernels.AUTO_ORDER["cpu"]
    return {"err": err, "scale": scale, "dtype": "fp32", "finite": True, "same_layout": True}


def main(argv: list[str]) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    names = []
    for a in argv or ["default"]:
        names += SUITES.get(a, [a])
    results = {}
    for name in names:
        try:
            extra = {"wan-model": run_wan_model, "compile": run_compiled}
            results[name] = extra[name]() if name in extra else run_case(CASES[name])
        except Exception as e:  # report, so the test names the case
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
