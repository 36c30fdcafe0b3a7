"""`clear distill` on CUDA: bf16 mixed precision, flex attention backward, gradient checkpointing; FLUX-size memory.

Run on a GPU machine: `python -m pytest -q tests/gpu/test_distill_gpu.py -m gpu -s` (skipped without CUDA).
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_bf16_flex_distillation_runs_resumes_and_keeps_the_teacher_exact(tmp_path):
    from clear_cli.attention.linearize import teacher_mode
    from clear_cli.jobs.distill import distill
    from clear_cli.models import load_pipeline
    from clear_cli.jobs.synth import synth

    data = tmp_path / "s128"
    synth(n=16, model="tiny-random", res=128, out=str(data), steps=2, batch_size=8, device="cuda", dtype="bf16",
          progress=False)
    sets = [f"data={data}", "model=tiny-random", "window=2", "train.steps=4", "train.batch_size=8",
            "train.gradient_accumulation=2", "train.optimizer=prodigy", "train.mixed_precision=bf16",
            "train.gradient_checkpointing=true", "loss.attn_layers=[2,3]", "checkpoint.every=2",
            "validation.prompts=[a red circle]", "validation.steps=2"]
    pipe = load_pipeline("tiny-random", device="cuda", dtype="bf16")
    t = time.perf_counter()
    full = distill(None, overrides=sets, out=tmp_path / "full", progress=False, pipe=pipe)
    print(f"\n4 bf16 flex steps (with compile) {time.perf_counter() - t:.1f} s: {full.log}")
    assert all(math.isfinite(r[k]) for r in full.log for k in ("loss", "fm", "pred", "attn"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "full" / "clear_attn.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # The teacher pass is the stock bf16 model, bit for bit, after training.
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
    x = dict(hidden_states=torch.randn(2, 64, 64, generator=g), encoder_hidden_states=torch.randn(2, 32, 64, generator=g),
             pooled_projections=torch.randn(2, 64, generator=g), timestep=torch.rand(2, generator=g),
             guidance=torch.full((2,), 3.5), img_ids=torch.cat([torch.zeros(64, 1), ids.float()], 1),
             txt_ids=torch.zeros(32, 3))
    x = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() and k != "guidance" else v.dtype) for k, v in x.items()}
    stock = load_pipeline("tiny-random", device="cuda", dtype="bf16").transformer
    # accelerate's prepare() wrapped the trained model's forward in bf16 autocast (outputs as fp32): do the same.
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = stock(**x).sample
        with teacher_mode(pipe.transformer):
            got = pipe.transformer(**x).sample
    assert torch.equal(got.float(), want.float())
    # Resume (CUDA kernels may differ in the last bits, so approximately).
    part = tmp_path / "part"
    distill(None, overrides=sets + ["train.steps=2"], out=part, progress=False)
    second = distill(None, overrides=sets, out=part, progress=False, resume="auto")
    for a, b in zip(full.log[2:], second.log):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


def test_flux_size_memory_and_step_time():
    """One transformer + teacher copies vs two copies, measured on a FLUX.1-dev-sized model (random bf16 weights),
    and the time of one distillation step (teacher + student, checkpointing, flex) at 1024^2, batch 1."""
    from diffusers import FluxTransformer2DModel

    from clear_cli.attention.linearize import linearize, trainable_attention_parameters
    from clear_cli.jobs.distill import loss_terms
    from clear_cli.training.batches import Batch, pack_latents
    from clear_cli.models.memory import FLUX_DEV
    from clear_cli.training.recipe import load_recipe

    torch.cuda.reset_peak_memory_stats()
    with torch.device("meta"):
        tr = FluxTransformer2DModel(**FLUX_DEV)
    tr = tr.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for p in tr.parameters():
            p.normal_(0, 0.02)
    base = torch.cuda.memory_allocated()
    tr.requires_grad_(False)
    linearize(tr, window=16, backend="auto", keep_teacher=True)
    with_teacher = torch.cuda.memory_allocated()
    params = trainable_attention_parameters(tr, freeze_others=True)
    for p in params.values():
        p.data = p.data.float()
    tr.enable_gradient_checkpointing()
    gib = 1024 ** 3
    figures = {"model_gib": base / gib, "teacher_copies_gib": (with_teacher - base) / gib,
               "two_copies_gib": 2 * base / gib}
    recipe = load_recipe(None, ["data=d", "loss.attn_layers=null"])
    from clear_cli.attention.linearize import default_attention_layers

    layers = default_attention_layers(tr)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-5)
    z, ids = pack_latents(torch.randn(1, 16, 128, 128, device="cuda"))
    batch = Batch(x0=z, noise=torch.randn_like(z), sigmas=torch.tensor([0.5], device="cuda"),
                  t5=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
                  pooled=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16), img_ids=ids.to(torch.bfloat16),
                  txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16), indices=[0])
    times = []
    for i in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = loss_terms(tr, tr, batch, recipe, layers)
        terms["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    figures.update(step_s=times, peak_gib=torch.cuda.max_memory_allocated() / gib,
                   trained_params_b=sum(p.numel() for p in params.values()) / 1e9, device=torch.cuda.get_device_name())
    print("\nFLUX-size distillation:", json.dumps(figures))
    assert figures["teacher_copies_gib"] < 0.2 * figures["model_gib"]
