"""Memory-fit estimates and the one-line refusals (clear_cli.models.fit), for FLUX.1-dev counted on the meta device."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from clear_cli.errors import UsageError
from clear_cli.models import fit

CUDA = torch.device("cuda")  # only its type is read: capacities come from CLEAR_DEVICE_MEMORY here


@pytest.fixture(scope="module")
def arch():
    return fit.flux_dev_arch()


def test_arch_counts_come_from_the_architecture(arch):
    from clear_cli.models.memory import flux_dev_figure

    fig = flux_dev_figure(2)
    assert arch.params["transformer"] == fig.params and arch.trained == fig.trained
    assert arch.teacher_copy == fig.teacher_copy
    assert (arch.d_model, arch.n_double, arch.n_single, arch.text_len) == (3072, 19, 38, 512)
    assert arch.weights(2) == 2 * sum(arch.params.values())


def test_gen_need_grows_with_resolution_and_offload_saves(arch):
    sides = [1024, 2048, 4096, 8192]
    needs = [fit.gen_need(arch, s, s).total for s in sides]
    assert needs == sorted(needs) and needs[-1] > needs[0] + 16 * fit.GiB  # 8K adds tens of GiB of activations
    for s in sides:
        plain, off = fit.gen_need(arch, s, s), fit.gen_need(arch, s, s, offload=True)
        assert off.total < plain.total
        assert off.total > arch.weights(2, ("transformer",))  # the transformer must sit on the GPU whole
        assert plain.total >= arch.weights(2)
    assert fit.gen_need(arch, 8192, 8192, clear=True).total > fit.gen_need(arch, 8192, 8192, clear=False).total


def test_distill_need_orders(arch):
    kw = dict(micro_batch=1, optimizer="prodigy", mixed_precision="bf16")
    ckpt = fit.distill_need(arch, 1024, checkpointing=True, **kw)
    nockpt = fit.distill_need(arch, 1024, checkpointing=False, **kw)
    assert nockpt.total > ckpt.total
    assert fit.distill_need(arch, 1024, checkpointing=True, **{**kw, "optimizer": "adamw"}).total < ckpt.total
    zero2 = fit.distill_need(arch, 1024, checkpointing=True, world=4, zero_stage=2, **kw)
    assert zero2.total < ckpt.total
    # never below the one-copy weights distillation holds (DESIGN.md §4: 25.5 GiB of bf16 weights)
    assert ckpt.parts["weights"] > 25.5 * fit.GiB


def gen_cfg(**kw):
    from clear_cli.jobs.generate import GenConfig

    return replace(GenConfig(), model="flux-dev-random", dtype="bf16", **kw)


def test_gen_refused_with_number_and_offload_fix(monkeypatch, arch):
    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "56")
    need = fit.gen_need(arch, 8192, 8192).total / fit.GiB
    off = fit.gen_need(arch, 8192, 8192, offload=True).total / fit.GiB
    assert off < 56 < need  # the case this test is about
    with pytest.raises(UsageError) as e:
        fit.check_gen(gen_cfg(), CUDA, (8192, 8192))
    msg = e.value.one_line()
    assert f"needs ~{need:.1f} GiB" in msg and f"--offload needs ~{off:.1f} GiB" in msg and "\n" not in msg
    fit.check_gen(gen_cfg(offload=True), CUDA, (8192, 8192))  # the fix it names passes


def test_gen_refusal_names_a_smaller_res_when_offload_is_not_enough(monkeypatch, arch):
    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "36")
    with pytest.raises(UsageError) as e:
        fit.check_gen(gen_cfg(offload=True), CUDA, (8192, 8192))
    assert "--res 4k" in e.value.one_line() or "--res 2k" in e.value.one_line()
    monkeypatch.setenv("CLEAR_SKIP_MEMORY_CHECK", "1")
    fit.check_gen(gen_cfg(offload=True), CUDA, (8192, 8192))


def test_fits_pass_silently(monkeypatch):
    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "141")
    fit.check_gen(gen_cfg(), CUDA, (8192, 8192))
    fit.check_gen(replace(gen_cfg(), model="tiny-random"), CUDA, (8192, 8192))  # tiny: nothing to check


def test_bad_memory_env_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "lots")
    with pytest.raises(UsageError, match="CLEAR_DEVICE_MEMORY"):
        fit.check_gen(gen_cfg(), CUDA, (1024, 1024))


def test_synth_refusal_names_a_smaller_batch(monkeypatch, arch):
    from clear_cli.jobs.synth import SynthConfig

    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "40")
    cfg = replace(SynthConfig(), model="flux-dev-random", dtype="bf16", batch_size=16)
    with pytest.raises(UsageError) as e:
        fit.check_synth(cfg, CUDA, 1024, 1024)
    assert "--batch-size" in e.value.one_line()
    fit.check_synth(replace(cfg, batch_size=1), CUDA, 1024, 1024)


def test_distill_refusal_names_checkpointing(monkeypatch, arch):
    from clear_cli.training.recipe import load_recipe

    recipe = load_recipe("recipes/flux_dev.yaml", ["model=flux-dev-random", "train.gradient_checkpointing=false",
                                                    "train.batch_size=1", "train.gradient_accumulation=1"])
    acc = SimpleNamespace(num_processes=1, state=SimpleNamespace(deepspeed_plugin=None), device=CUDA)
    ckpt = fit.distill_need(arch, 1024, micro_batch=1, checkpointing=True, optimizer="prodigy",
                            mixed_precision="bf16", attn_layers=10).total / fit.GiB
    nockpt = fit.distill_need(arch, 1024, micro_batch=1, checkpointing=False, optimizer="prodigy",
                              mixed_precision="bf16", attn_layers=10).total / fit.GiB
    cap = (ckpt + nockpt) / 2
    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", f"{cap:.1f}")
    with pytest.raises(UsageError) as e:
        fit.check_distill(recipe, acc)
    assert "train.gradient_checkpointing=true" in e.value.one_line()
    fit.check_distill(replace(recipe, train=replace(recipe.train, gradient_checkpointing=True)), acc)


def test_weights_of_another_architecture_refused(tmp_path, tiny_random_pipe, arch):
    from clear_cli.metrics.testing import write_student
    from clear_cli.models.weights import load_attention_weights

    w = load_attention_weights(write_student(tmp_path / "tiny.safetensors", tiny_random_pipe.transformer, window=8))
    with pytest.raises(UsageError) as e:
        fit.check_weights(w, arch, "flux-dev-random")
    msg = e.value.one_line()
    assert "do not fit flux-dev-random" in msg and "made for tiny-random" in msg and "model [3072" in msg
    tiny = fit.architecture("tiny-random", tiny_random_pipe)
    fit.check_weights(w, tiny, "tiny-random")  # the right model takes them
