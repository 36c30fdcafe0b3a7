"""The tiny teacher's checks measure what they claim."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

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


class _StubVAE(torch.nn.Module):
    """encode -> latent_dist.mean = the image; decode = the image (or a flat grey one)."""

    def __init__(self, grey: bool):
        super().__init__()
        self.grey = grey
        self.p = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=torch.zeros_like(z) if self.grey else z)


def test_reconstruction_check_scores_the_autoencoder():
    perfect = checks.reconstruction_check(SimpleNamespace(vae=_StubVAE(grey=False)), n=10, size=64)
    assert perfect.hits == 10 and perfect.rate == 1.0
    flat = checks.reconstruction_check(SimpleNamespace(vae=_StubVAE(grey=True)), n=10, size=64)
    assert flat.hits == 0 and sum(flat.confusion.values()) == 10
