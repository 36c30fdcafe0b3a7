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


def test_background_colour_is_read_from_the_border():
    items = checks.color_prompts(30, start=2 * 10**9)
    sc = [scenes.sample_scene(2 * 10**9 + i, n_objects=1, texture="plain") for i in range(30)]
    imgs = scenes.render(sc, 64)
    assert [checks.background_color(im) for im in imgs] == [bg for _, _, bg in items]


def test_check_refuses_bad_models_and_training_seeds(tmp_path, capsys):
    from safetensors.torch import save_file

    from clear_cli.cli.app import run

    not_st = tmp_path / "junk.safetensors"
    not_st.write_text("not weights")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    for argv, msg in ((["--model", str(not_st)], "not a safetensors weight file"),
                      (["--model", str(other)], "holds no tiny FLUX weights"),
                      (["--model", str(tmp_path / "missing.safetensors")], "is not tiny, tiny-random"),
                      (["--start", "5"], "would draw training scenes")):
        assert run(["tiny", "check", "--n", "2", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
