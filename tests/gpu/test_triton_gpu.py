"""The Triton CLEAR kernel on CUDA: bf16/fp16/fp32 against `reference`, every candidate config, the sweep, FLUX-size
shapes (a row oracle at 8K), and the kernel inside the linearized tiny FLUX.

Run on a GPU machine: `python -m pytest -q tests/gpu/test_triton_gpu.py -m gpu` (skipped without CUDA). bf16 is
checked here only: the Triton interpreter's bf16 dot is wrong (triton-lang/triton#11584).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _qkv(b, nh, n, d, dtype, seed=0, layout="bhnd"):
    g = torch.Generator(device="cuda").manual_seed(seed)
    xs = [torch.randn(b, n, nh, d, device="cuda", dtype=dtype, generator=g) for _ in range(3)]
    if layout == "bnhd":   # the processor's transposed views
        return [x.transpose(1, 2).requires_grad_(True) for x in xs]
    return [x.transpose(1, 2).contiguous().requires_grad_(True) for x in xs]


# today's tolerances (tests/unit/test_attention_flex.py): reference in the same dtype; gradients x10
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


SHAPES = [  # (batch, heads, H, W, text_len, window, down_factor, head_dim, layout)
    (2, 4, 24, 40, 13, 5, 2, 64, "bnhd"),
    (1, 3, 33, 47, 77, 8, 1, 128, "bhnd"),      # ragged edge tiles, odd text
    (1, 2, 32, 32, 0, 16, 4, 128, "bnhd"),      # no text, pooled keys
    (2, 2, 20, 12, 9, 1, 1, 32, "bhnd"),        # window 1, the tiny model's head_dim
]
# bf16 on every shape (the interpreter cannot check it); fp16 and fp32 (IEEE dots) on two, to see the compiled path
# agree with what the interpreter checked. Each (dtype, head_dim, tiles) compiles its own kernels: keep this short.
CASES = [(torch.bfloat16, s) for s in SHAPES] + [(dt, SHAPES[i]) for dt in (torch.float16, torch.float32)
                                                 for i in (0, 1)]


@pytest.mark.parametrize("dtype, shape", CASES, ids=lambda x: str(x).replace("torch.", "") if
                         isinstance(x, torch.dtype) else "x".join(map(str, x[:8])))
def test_triton_cuda_matches_reference(dtype, shape):
    b, nh, h, w, t, r, f, d, layout = shape
    from clear_cli.attention import clear_attention

    q, k, v = _qkv(b, nh, t + h * w, d, dtype, layout=layout)
    dw = (torch.rand(f, f, device="cuda", dtype=dtype) + 0.5).requires_grad_(True) if f > 1 else None
    leaves = [q, k, v] + ([dw] if dw is not None else [])
    kw = dict(text_len=t, grid=(h, w), window=r, down_factor=f, down_weight=dw)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    out = clear_attention(q, k, v, backend="triton", **kw)
    tol = TOL[dtype]
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(ref)
    for a, bb in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g)):
        scale = max(1.0, float(bb.abs().max()))
        torch.testing.assert_close(a, bb, atol=tol * 10 * scale, rtol=tol * 10)


def test_every_candidate_config_compiles_and_matches():
    from clear_cli.attention import clear_attention
    from clear_cli.attention.triton_clear import CANDIDATES, WIDE, clear_triton_attention

    q, k, v = _qkv(1, 2, 29 + 40 * 36, 128, torch.bfloat16)
    kw = dict(text_len=29, grid=(40, 36), window=9, down_factor=4)
    ref = clear_attention(q, k, v, backend="reference", **kw)
    g = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, [q, k, v], g)
    failed = []
    for cfg in (*CANDIDATES, WIDE):
        try:
            out = clear_triton_attention(q, k, v, config=cfg, **kw)
            grads = torch.autograd.grad(out, [q, k, v], g)
        except Exception as e:   # sm80 may lack shared memory for the largest: name them all at once
            failed.append(f"{cfg.name}: {type(e).__name__}: {str(e)[:120]}")
            continue
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=cfg.name)
        for a, bb in zip(grads, g_ref):
            torch.testing.assert_close(a, bb, atol=0.2, rtol=0.2, msg=cfg.name)
    major = torch.cuda.get_device_capability()[0]
    assert not failed or major < 9, failed     # on Hopper every candidate must run


def test_sweep_times_candidates_and_applies_the_winner():
    from clear_cli.attention import triton_plan
    from clear_cli.attention.triton_clear import CANDIDATES, default_config, sweep

    configs = CANDIDATES[:2]
    saved = dict(triton_plan.TUNED)
    try:
        res = sweep((48, 48), 32, 8, heads=2, head_dim=64, configs=configs, repeats=1)
        assert [r["name"] for r in res if r["error"] is None]
        assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in res if r["error"] is None)
        assert default_config(8, 64, torch.bfloat16, "cuda").name == res[0]["name"]
    finally:
        triton_plan.TUNED.clear()
        triton_plan.TUNED.update(saved)


def test_auto_picks_triton_on_cuda():
    from clear_cli.attention.kernels import SHORTCUT, choose_backend

    name, why = choose_backend("cuda", torch.bfloat16, (1, 24, 512 + 4096, 128), (64, 64), 512, 16)
    assert name == "triton", why
    assert choose_backend("cuda", torch.bfloat16, (1, 24, 512 + 64, 128), (8, 8), 512, 16)[0] == SHORTCUT


def _row_oracle(q, k, v, rows, t, grid, r, f, scale):
    """Exact CLEAR attention for a few query rows, from coordinates (no N x N mask)."""
    from clear_cli.attention.geometry import pool_tokens, pool_weight

    h, w = grid
    n = q.shape[2]
    kf, vf = k.float(), v.float()
    if f > 1:
        wt = pool_weight(None, f, kf)
        kf = torch.cat([kf, pool_tokens(kf[:, :, t:], grid, f, wt)], 2)
        vf = torch.cat([vf, pool_tokens(vf[:, :, t:], grid, f, wt)], 2)
    idx = torch.arange(n, device=q.device)
    ky, kx = (idx - t) // w, (idx - t) % w
    outs = []
    for row in rows:
        allowed = torch.ones(kf.shape[2], dtype=torch.bool, device=q.device)
        if row < t:
            allowed[n:] = False
        else:
            y, x = (row - t) // w, (row - t) % w
            allowed[t:n] = (ky[t:] - y) ** 2 + (kx[t:] - x) ** 2 < r * r
        s = (q[:, :, row:row + 1].float() @ kf.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        outs.append(torch.softmax(s, -1) @ vf)
    return torch.cat(outs, 2)


@pytest.mark.parametrize("res, r, f", [(512, 16, 1), (512, 8, 4)])
def test_flux_size_8k_rows_match_an_exact_oracle(res, r, f):
    from clear_cli.attention import clear_attention

    t, nh, d = 512, 24, 128
    grid = (res, res)
    with torch.no_grad():
        q, k, v = (x.detach() for x in _qkv(1, nh, t + res * res, d, torch.bfloat16, layout="bnhd"))
        out = clear_attention(q, k, v, text_len=t, grid=grid, window=r, down_factor=f, backend="triton")
        n = q.shape[2]
        rows = [0, 7, t - 1, t, t + res - 1, t + res * 100 + 250, n - res, n - 1]   # text, corners, interior
        want = _row_oracle(q, k, v, rows, t, grid, r, f, d ** -0.5)
        torch.testing.assert_close(out[:, :, rows].float(), want, atol=2e-2, rtol=2e-2)
        assert torch.isfinite(out).all()


def test_2k_forward_backward_matches_flex():
    from clear_cli.attention import clear_attention

    t, grid, r = 512, (128, 128), 16
    q, k, v = _qkv(1, 24, t + 128 * 128, 128, torch.bfloat16, layout="bnhd")
    kw = dict(text_len=t, grid=grid, window=r)
    g = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    out = clear_attention(q, k, v, backend="triton", **kw)
    grads = torch.autograd.grad(out, [q, k, v], g)
    ref = clear_attention(q, k, v, backend="flex", **kw)
    g_ref = torch.autograd.grad(ref, [q, k, v], g)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for a, bb in zip(grads, g_ref):
        torch.testing.assert_close(a, bb, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_triton_inside_the_linearized_tiny_flux(dtype, tol):
    """Forward against the reference backend and a training step's gradients, in the model's own call path."""
    import clear_cli
    from diffusers import FluxTransformer2DModel

    from clear_cli.attention.linearize import trainable_attention_parameters
    from clear_cli.models import tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tr = FluxTransformer2DModel(**tiny.TRANSFORMER).eval().to("cuda", dtype)
    g = torch.Generator().manual_seed(1)
    h, w, t, b = 16, 20, 9, 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    x = dict(hidden_states=torch.randn(b, h * w, 64, generator=g),
             encoder_hidden_states=torch.randn(b, t, 64, generator=g),
             pooled_projections=torch.randn(b, 64, generator=g), timestep=torch.rand(b, generator=g),
             guidance=torch.full((b,), 3.5), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(t, 3))
    x = {n: a.to("cuda", dtype if a.is_floating_point() and "ids" not in n else a.dtype) for n, a in x.items()}
    grads = {}
    for backend in ("reference", "triton"):
        clear_cli.linearize(tr, window=5, down_factor=2, backend=backend)
        params = trainable_attention_parameters(tr, freeze_others=True)
        for p in params.values():
            p.grad = None
        out = tr(**x).sample
        out.float().square().mean().backward()
        grads[backend] = (out.detach().float(), {n: p.grad.float().clone() for n, p in params.items()})
    (o_ref, g_ref), (o_tri, g_tri) = grads["reference"], grads["triton"]
    assert float((o_tri - o_ref).abs().max()) < tol
    for name, g in g_ref.items():
        err = float((g_tri[name] - g).abs().max()) / max(1e-6, float(g.abs().max()))
        assert err < (1e-3 if dtype == torch.float32 else 0.1), f"{name}: {err}"
