"""The Triton CLEAR kernel under the Triton interpreter, against `reference`: a child process of
tests/unit/test_attention_triton.py (TRITON_INTERPRET=1 must be set before the kernels are defined, so they run in a
process of their own and no other test sees the interpreter).

    TRITON_INTERPRET=1 PYTHONPATH=. python tests/unit/_triton_interp.py default   # or: slow, or case names

Prints one JSON object: {case name: {"err": {...}, "scale": {...}, "seconds": s, ...}}. Errors are max |triton -
reference|; the reference runs in fp32 on the same (rounded) inputs; `scale` is max(1, max |reference|) per output.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib

import torch

# (batch, heads, H, W, text_len, window, down_factor, head_dim, dtype, fwd tiles, bwd tiles, splits, layout)
# layout: "bhnd" contiguous; "bnhd" the processor's transposed view of [B, N, heads, D]; "dlast" a non-unit last
# stride (made contiguous by the kernel wrapper).
T44, T48, T84 = ((4, 4), (4, 4)), ((4, 4), (4, 8)), ((4, 8), (4, 4))
CASES = {
    "fp32-ragged-oddtext-split-bnhd": (1, 2, 9, 13, 7, 4, 1, 64, "fp32", T48, T84, 3, "bnhd"),
    "fp32-text0-f2-batch2": (2, 1, 8, 8, 0, 2, 2, 32, "fp32", T44, T44, 0, "bhnd"),
    "fp32-f4-window-over-grid-d128": (1, 1, 8, 12, 3, 20, 4, 128, "fp32", T84, T48, 2, "bhnd"),
    "fp32-window1": (1, 2, 5, 7, 4, 1, 1, 32, "fp32", T48, T48, 0, "bhnd"),
    "fp32-one-row-dlast": (1, 1, 1, 9, 2, 2, 1, 32, "fp32", T44, T44, 0, "dlast"),
    "fp16-ragged-split-d128": (1, 1, 9, 13, 5, 3, 1, 128, "fp16", T48, T84, 2, "bnhd"),
    "fp16-f2-text-odd": (1, 2, 8, 8, 3, 3, 2, 64, "fp16", T44, T48, 0, "bhnd"),
}


def _random_cases(n: int, seed: int) -> dict:
    rng = random.Random(seed)
    out = {}
    tiles = [((4, 4), (4, 4)), ((4, 8), (4, 4)), ((8, 8), (8, 8)), ((4, 4), (8, 4)), ((8, 4), (4, 8))]
    for i in range(n):
        f = rng.choice([1, 1, 2, 4])
        h = max(f, rng.randint(1, 18) // f * f)
        w = max(f, rng.randint(1, 18) // f * f)
        case = (rng.choice([1, 2, 3]), rng.choice([1, 2]), h, w, rng.choice([0, 1, 5, 16, 17]),
                rng.choice([1, 2, 3, 5, 8, 30]), f, rng.choice([32, 64, 128]), rng.choice(["fp32", "fp16"]),
                rng.choice(tiles), rng.choice(tiles), rng.choice([0, 1, 2, 5]), rng.choice(["bhnd", "bnhd"]))
        out[f"random-{seed}-{i}"] = case
    return out


CASES.update(_random_cases(14, 7))
SUITES = {"default": [c for c in CASES if not c.startswith("random-")] + ["compile", "model", "layout"],
          "slow": [c for c in CASES if c.startswith("random-")]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _make(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "bnhd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "dlast":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    return x.contiguous()


def run_case(case: tuple) -> dict:
    from clear_cli.attention import clear_attention
    from clear_cli.attention.triton_clear import TileConfig, TritonConfig, clear_triton_attention

    b, nh, h, w, t, r, f, d, dname, ft, bt, splits, layout = case
    dtype = DTYPES[dname]
    n = t + h * w
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, k, v, do = (torch.randn(b, nh, n, d, generator=g).to(dtype) for _ in range(4))
    dw = (torch.rand(f, f, generator=g) + 0.5).to(dtype) if f > 1 else None
    leaves = [_make(x, layout).requires_grad_(True) for x in (q, k, v)]
    if dw is not None:
        leaves.append(dw.clone().requires_grad_(True))
    # dk/dv: the backward tiles swapped (own key tile = bt's query tile), so the two tilings differ there too
    cfg = TritonConfig(TileConfig(*ft), TileConfig(*bt), dkdv=TileConfig(bt[1], bt[0]), splits=splits)
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f)
    t0 = time.perf_counter()
    out = clear_triton_attention(*leaves[:3], down_weight=leaves[3] if dw is not None else None, config=cfg, **kw)
    grads = torch.autograd.grad(out, leaves, do)
    seconds = time.perf_counter() - t0
    ref_leaves = [x.detach().float().requires_grad_(True) for x in leaves]
    ref = clear_attention(*ref_leaves[:3], down_weight=ref_leaves[3] if dw is not None else None,
                          backend="reference", **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.float())
    names = ["out", "dq", "dk", "dv", "dw"][:len(leaves) + 1]
    err, scale = {}, {}
    for name, a, bb in zip(names, [out, *grads], [ref, *ref_grads]):
        err[name] = float((a.detach().float() - bb).abs().max())
        scale[name] = max(1.0, float(bb.abs().max()))
    return {"err": err, "scale": scale, "seconds": round(seconds, 2), "dtype": dname,
            "finite": bool(all(torch.isfinite(x).all() for x in [out, *grads])),
            "same_layout": out.stride() == leaves[0].stride() if layout != "dlast" else out.is_contiguous()}


def run_compiled() -> dict:
    """torch.compile(fullgraph=True) through the dispatcher with backend='triton' and (ordered as on CUDA) 'auto': no
    graph break, same values."""
    from clear_cli.attention import clear_attention, kernels

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3 + 30, 32, generator=g) for _ in range(3))
    kw = dict(text_len=3, grid=(5, 6), window=2, down_factor=1)

    def fn(q, k, v):
        return clear_attention(q, k, v, backend="triton", **kw)

    def fn_auto(q, k, v):
        return clear_attention(q, k, v, backend="auto", **kw)

    ref_leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    ref = clear_attention(*ref_leaves, backend="reference", **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    err, scale = {}, {}
    # `auto` as on CUDA (triton first), to trace the dispatcher's choice too
    kernels.AUTO_ORDER["cpu"] = ("triton", "tiled")
    for label, f in (("", fn), ("auto-", fn_auto)):
        torch._dynamo.reset()
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        for name, a, bb in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref, *ref_grads]):
            err[label + name] = float((a.detach() - bb.detach()).abs().max())
            scale[label + name] = max(1.0, float(bb.detach().abs().max()))
    del kernels.AUTO_ORDER["cpu"]
    return {"err": err, "scale": scale, "dtype": "fp32", "finite": True, "same_layout": True}


def run_model() -> dict:
    """The linearized tiny FLUX with backend='triton' against backend='reference': output and the trainable
    attention parameters' gradients (the processor hands the kernel transposed [B, N, heads, D] views)."""
    from diffusers import FluxTransformer2DModel

    import clear_cli
    from clear_cli.attention.linearize import trainable_attention_parameters
    from clear_cli.models import tiny

    from clear_cli.attention import triton_plan

    # 32-token query tiles instead of fp32's default 16 (the interpreter's time grows with the number of programs)
    triton_plan.TUNED[triton_plan.config_key(3, 32, torch.float32, None)] = triton_plan.WIDE
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(**tiny.TRANSFORMER).eval()
    g = torch.Generator().manual_seed(1)
    h, w, t = 6, 8, 5
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    x = dict(hidden_states=torch.randn(1, h * w, 64, generator=g),
             encoder_hidden_states=torch.randn(1, t, 64, generator=g),
             pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.rand(1, generator=g),
             guidance=torch.full((1,), 3.5), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(t, 3))
    res = {}
    for backend in ("reference", "triton"):
        clear_cli.linearize(tr, window=3, down_factor=2, backend=backend)
        params = trainable_attention_parameters(tr, freeze_others=True)
        for p in params.values():
            p.grad = None
        t0 = time.perf_counter()
        out = tr(**x).sample
        out.square().mean().backward()
        res[backend] = (out.detach(), {n: p.grad.clone() for n, p in params.items()}, time.perf_counter() - t0)
    (o_ref, g_ref, _), (o_tri, g_tri, sec) = res["reference"], res["triton"]
    err = {"out": float((o_tri - o_ref).abs().max())}
    scale = {"out": max(1.0, float(o_ref.abs().max()))}
    for name, gr in g_ref.items():   # each gradient relative to its own size (they are tiny at init)
        err[name] = float((g_tri[name] - gr).abs().max())
        scale[name] = max(1e-30, float(gr.abs().max()))
    return {"err": err, "scale": scale, "seconds": round(sec, 2), "dtype": "fp32", "finite": True,
            "same_layout": True, "n_grads": len(g_ref)}


def run_layout() -> dict:
    """A Kontext layout (target 5x6 + a 3x4 reference after it, 3 text tokens) through `layout.attend` with
    backend='triton' against the `global` rule's dense mask: forward and gradients."""
    import torch.nn.functional as F

    from clear_cli.attention.layout import ImageGrid, TokenLayout, attend, layout_mask

    lay = TokenLayout(3, (ImageGrid(0, 0, 5, 6), ImageGrid(1, 30, 3, 4)))
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, lay.seq_len, 32, generator=g) for _ in range(4))
    leaves = [_make(x, "bnhd").requires_grad_(True) for x in (q, k, v)]
    out = attend(*leaves, lay, window=2, backend="triton")
    grads = torch.autograd.grad(out, leaves, do)
    ref_leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_leaves, attn_mask=layout_mask(lay, 2))
    ref_grads = torch.autograd.grad(ref, ref_leaves, do)
    err, scale = {}, {}
    for name, a, bb in zip(("out", "dq", "dk", "dv"), [out, *grads], [ref, *ref_grads]):
        err[name] = float((a.detach() - bb).abs().max())
        scale[name] = max(1.0, float(bb.abs().max()))
    return {"err": err, "scale": scale, "dtype": "fp32", "finite": bool(torch.isfinite(out).all()),
            "same_layout": True}


def main(argv: list[str]) -> None:
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    names = []
    for a in argv or ["default"]:
        names += SUITES.get(a, [a])
    results = {}
    for name in names:
        if name in ("compile", "model", "layout"):
            results[name] = {"compile": run_compiled, "model": run_model, "layout": run_layout}[name]()
            continue
        try:
            results[name] = run_case(CASES[name])
        except Exception as e:  # report, so the test names the case
            results[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
