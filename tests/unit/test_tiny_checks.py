"""The tiny teacher's checks measure what they claim."""

from __future__ import annotations

import pytest

from clear_cli.tiny import checks, scenes


def test_colour_measure_is_exact_on_drawn_scenes():
    items = checks.color_prompts(30)
    imgs = scenes.render([scenes.sample_scene(checks.HELD_OUT + i, n_objects=1, texture="plain") for i in range(30)],
                         96)
    assert [checks.dominant_object_color(im) for im in imgs] == [c for _, c, _ in items]
    assert all(len(p.split()) <= 31 for p, _, _ in items)


def test_locality_of_a_random_model_is_uniform():
    from clear_cli.models import load_pipeline

    pipe = load_pipeline("tiny-random")
    res = checks.attention_locality(pipe, prompts=["a red circle in the center on a blue background"], size=128,
                                    steps=1, radii=(2, 4))
    assert res.grid == (8, 8) and len(res.share) == 4
    for row in res.share:  # random weights attend almost uniformly; the share must be near the area share
        for got, want in zip(row, res.uniform):
            assert got == pytest.approx(want, abs=0.05)
