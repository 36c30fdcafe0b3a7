"""`clear gen` planning without a model: resolution parsing, cascade sizes, sigma schedules and start sigmas."""

from __future__ import annotations

import numpy as np
import pytest

from clear_cli.errors import UsageError
from clear_cli.jobs.generate import GenConfig, plan_outputs, read_prompts, slug
from clear_cli.resolution import parse_res
from clear_cli.sampling.plan import base_size, plan_stages, shift_sigma, stage_sizes, stock_mu

# FLUX.1-dev's scheduler config (scheduler/scheduler_config.json)
FLUX_SCHED = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                  num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


@pytest.mark.parametrize("text,expected", [
    ("1k", (1024, 1024)), ("2K", (2048, 2048)), ("4k", (4096, 4096)), ("8k", (8192, 8192)),
    ("512", (512, 512)), ("2048x1024", (2048, 1024)), ("1024X576", (1024, 576)), (768, (768, 768)),
])
def test_parse_res(text, expected):
    assert parse_res(text) == expected


@pytest.mark.parametrize("text,fragment", [
    ("1000", "1000 is not a multiple of 16"), ("0", "must be positive"), ("1024x0", "must be positive"),
    ("big", "is not a size"), ("-512", "is not a size"), ("1024x1000", "1000 is not a multiple of 16"),
    ("32768", "above the 16384 px limit"),
])
def test_parse_res_rejects(text, fragment):
    with pytest.raises(UsageError, match=fragment):
        parse_res(text)


def test_parse_res_suggests_neighbours():
    with pytest.raises(UsageError) as e:
        parse_res("1000")
    assert e.value.hint == "use 992 or 1008"


def test_stock_mu_matches_design_numbers():
    # DESIGN.md §5: mu = 3.2 at 2K, 11.5 at 4K, 44.8 at 8K under the stock (uncapped) rule
    assert stock_mu(128 * 128, FLUX_SCHED) == pytest.approx(3.23, abs=0.01)
    assert stock_mu(256 * 256, FLUX_SCHED) == pytest.approx(11.55, abs=0.01)
    assert stock_mu(512 * 512, FLUX_SCHED) == pytest.approx(44.83, abs=0.01)
    assert stock_mu(64 * 64, FLUX_SCHED) == pytest.approx(1.15)


def test_shift_matches_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHED)
    mu = calculate_shift(4096)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
    ours = plan_stages((1024, 1024), FLUX_SCHED, base_res=1024, train_res=1024, steps=28)[0]
    assert ours.kind == "direct" and ours.mu == pytest.approx(mu)
    np.testing.assert_allclose(ours.sigmas, sched.sigmas[:-1].numpy(), atol=1e-6)
    static = dict(FLUX_SCHED, use_dynamic_shifting=False)
    assert shift_sigma(0.7, None, static) == pytest.approx(3 * 0.7 / (1 + 2 * 0.7))


@pytest.mark.parametrize("target,sizes", [
    ((8192, 8192), [(1024, 1024), (2048, 2048), (4096, 4096), (8192, 8192)]),
    ((4096, 4096), [(1024, 1024), (2048, 2048), (4096, 4096)]),
    ((2048, 2048), [(1024, 1024), (2048, 2048)]),
    ((1024, 1024), [(1024, 1024)]),
    ((1152, 1152), [(1152, 1152)]),  # barely above the base: sampled directly
    ((4096, 2048), [(1456, 720), (2912, 1440), (4096, 2048)]),
])
def test_stage_sizes_x2(target, sizes):
    assert stage_sizes(target, 1024, 2) == sizes
    assert stage_sizes(target, 1024, 2, cascade=False) == [target]


def test_stage_sizes_x4_and_base_aspect():
    assert stage_sizes((8192, 8192), 1024, 4) == [(1024, 1024), (4096, 4096), (8192, 8192)]
    assert stage_sizes((4096, 4096), 1024, 4) == [(1024, 1024), (4096, 4096)]
    bw, bh = base_size((4096, 1024), 1024)
    assert bw % 16 == 0 and bh % 16 == 0 and abs(bw / bh - 4) < 0.1 and abs(bw * bh / 1024 ** 2 - 1) < 0.05


@pytest.mark.parametrize("upscale", [2, 4])
@pytest.mark.parametrize("res", ["2k", "4k", "8k", "8192x4096"])
def test_refinement_stages_start_near_strength_not_pure_noise(res, upscale):
    target = parse_res(res)
    stages = plan_stages(target, FLUX_SCHED, base_res=1024, train_res=1024, upscale=upscale, strength=0.7,
                         steps=28, refine_steps=20)
    assert stages[0].kind == "base" and stages[0].attention == "full" and stages[0].start_sigma == pytest.approx(1)
    assert stages[0].ntk_factor is None and not stages[0].proportional
    assert (stages[-1].width, stages[-1].height) == target
    refine = stages[1:]
    assert refine and all(s.kind == "refine" and s.attention == "clear" for s in refine)
    for s in refine:
        # near the strength: the base resolution's static shift (the authors' static shift 3 gives 0.875)
        assert 0.7 <= s.start_sigma <= 0.9, (s.width, s.start_sigma)
        assert s.steps == 14 and len(s.sigmas) == 14 and s.sigmas == sorted(s.sigmas, reverse=True)
        assert s.sigmas[-1] < 0.15  # then the scheduler steps to 0
        assert s.ntk_factor == 10 and s.proportional and s.guidance == 7.5
        # the stock dynamic rule at the stage's own size would have started at (almost) pure noise
        assert s.stock_start_sigma > 0.98


def test_refine_strength_maps_to_schedule_tail():
    stages = plan_stages((2048, 2048), FLUX_SCHED, base_res=1024, train_res=1024, strength=0.5, refine_steps=20)
    assert stages[1].steps == 10
    e = np.exp(1.15)
    assert stages[1].start_sigma == pytest.approx(e / (e + (1 / 0.5 - 1)), abs=1e-6)
    # few steps: still starts at the strength's sigma (no rounding down of the start)
    few = plan_stages((2048, 2048), FLUX_SCHED, base_res=1024, train_res=1024, strength=0.7, refine_steps=4)[1]
    assert few.steps == 3 and few.start_sigma == pytest.approx(e / (e + (1 / 0.7 - 1)), abs=1e-6)
    # 20 steps at 0.7: exactly the tail of the stock 20-step schedule (u = 0.70, 0.65, ..., 0.05)
    st = plan_stages((2048, 2048), FLUX_SCHED, base_res=1024, train_res=1024, strength=0.7, refine_steps=20)[1]
    tail = [shift_sigma(u, 1.15, FLUX_SCHED) for u in np.linspace(1, 1 / 20, 20)[6:]]
    np.testing.assert_allclose(st.sigmas, tail, atol=1e-9)


def test_direct_sampling_above_base_clamps_mu():
    (st,) = plan_stages((8192, 8192), FLUX_SCHED, base_res=1024, train_res=1024, cascade=False, steps=20)
    assert st.kind == "direct" and st.attention == "clear" and st.ntk_factor == 10 and st.proportional
    assert st.mu == pytest.approx(1.15)  # the stock rule would give 44.8: every sigma ~1 until the last step
    assert st.sigmas[10] < 0.8
    (low,) = plan_stages((1024, 1024), FLUX_SCHED, base_res=1024, train_res=1024)
    assert low.ntk_factor is None and not low.proportional


def test_down_factor_aligns_clear_stages():
    stages = plan_stages((4096, 2048), FLUX_SCHED, base_res=1024, train_res=1024, down_factor=4)
    assert all(s.width % 64 == 0 and s.height % 64 == 0 for s in stages[1:])
    assert (stages[-1].width, stages[-1].height) == (4096, 2048)
    with pytest.raises(UsageError, match="multiples of 64 px"):
        plan_stages((1040, 1040), FLUX_SCHED, base_res=1024, train_res=1024, down_factor=4)


def test_ntk_factor_option():
    stages = plan_stages((2048, 2048), FLUX_SCHED, base_res=1024, train_res=1024, ntk_factor=1.0)
    assert stages[1].ntk_factor is None
    stages = plan_stages((2048, 2048), FLUX_SCHED, base_res=1024, train_res=1024, ntk_factor=4)
    assert stages[1].ntk_factor == 4


def test_planned_sigmas_run_unshifted_in_the_scheduler():
    """What generate does: a scheduler with shift 1 starts exactly at the planned start sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    st = plan_stages((4096, 4096), FLUX_SCHED, base_res=1024, train_res=1024)[2]
    sched = FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHED, use_dynamic_shifting=False, shift=1.0)
    sched.set_timesteps(sigmas=st.sigmas)
    assert float(sched.sigmas[0]) == pytest.approx(st.start_sigma, abs=1e-6)
    assert float(sched.timesteps[0]) == pytest.approx(1000 * st.start_sigma, abs=1e-3)


def test_outputs_names_and_prompts(tmp_path):
    assert slug("A blue plane, over the SEA!") == "a-blue-plane-over-the-sea"
    assert slug("!!!") == "image"
    cfg = GenConfig(out=str(tmp_path), seed=5, n=2)
    plans = plan_outputs(["a cat", "a dog"], cfg)
    assert [p.name for _, _, p in plans] == ["a-cat_5.png", "a-cat_6.png", "a-dog_5.png", "a-dog_6.png"]
    one = plan_outputs(["a cat"], GenConfig(out=str(tmp_path / "x.png")))
    assert one[0][2] == tmp_path / "x.png"
    with pytest.raises(UsageError, match="names one file"):
        plan_outputs(["a", "b"], GenConfig(out=str(tmp_path / "x.png")))
    f = tmp_path / "p.txt"
    f.write_text("# comment\na red circle\n\n  a green square  \n")
    assert read_prompts(["x"], f) == ["x", "a red circle", "a green square"]
    with pytest.raises(UsageError, match="prompt is empty"):
        read_prompts(["  "])
    with pytest.raises(UsageError, match="no prompt given"):
        read_prompts([])
