"""Every shipped recipe loads and validates; recipe problems are reported all at once."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from clear_cli.config import field_docs
from clear_cli.errors import UsageError
from clear_cli.training.recipe import (
    CheckpointConfig, LossConfig, Recipe, TrainConfig, ValidationConfig, load_recipe, recipe_hash, resume_differences,
)
from clear_cli.config import to_dict

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_the_four_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"flux_dev.yaml", "flux_dev_r8_down4.yaml", "flux_dev_r32.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_validates_and_says_how_to_launch(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.data and recipe.window >= 1
    lines = path.read_text().splitlines()
    head = "\n".join(itertools.takewhile(lambda line: line.startswith("#") or not line.strip(), lines))
    assert lines[0].startswith("# ")  # what it is for, first
    assert "clear distill" in head or "-m clear_cli distill" in head  # then how to launch it
    assert "--set" in head and "--resume" in head  # how to override and continue


def test_flux_dev_is_the_authors_recipe():
    r = load_recipe(RECIPES[0].parent / "flux_dev.yaml")
    assert (r.model, r.window, r.down_factor, r.resolution) == ("black-forest-labs/FLUX.1-dev", 16, 1, 1024)
    t = r.train
    assert (t.steps, t.batch_size, t.optimizer, t.lr, t.schedule, t.mixed_precision, t.gradient_checkpointing) == \
        (10_000, 32, "prodigy", 1.0, "constant", "bf16", True)
    assert (t.timesteps, t.guidance) == ("uniform", 3.5)
    assert (r.loss.fm, r.loss.pred, r.loss.attn, r.loss.attn_layers) == (1.0, 0.5, 0.5, None)
    r8 = load_recipe(RECIPES[0].parent / "flux_dev_r8_down4.yaml")
    assert (r8.window, r8.down_factor) == (8, 4)
    assert load_recipe(RECIPES[0].parent / "flux_dev_r32.yaml").window == 32


def test_every_field_has_a_one_line_doc():
    for cls in (Recipe, TrainConfig, LossConfig, CheckpointConfig, ValidationConfig):
        for name, text in field_docs(cls).items():
            assert text and "\n" not in text, f"{cls.__name__}.{name}"


def test_every_problem_is_reported_at_once(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: d\nwindw: 4\nwindow: 0\ntrain:\n  steps: ten\n  optimzer: adamw\n  batch_size: 6\n"
                   "  gradient_accumulation: 4\nloss:\n  fm: -1\n")
    with pytest.raises(UsageError) as e:
        load_recipe(bad)
    msg = e.value.message
    for part in ("windw: unknown key (did you mean 'window'?)", "train.steps: expected an integer",
                 "train.optimzer: unknown key (did you mean 'optimizer'?)", "train.batch_size: 6 is not a multiple",
                 "loss.fm: must be >= 0", "window: must be >= 1"):
        assert part in msg, (part, msg)


def test_overrides_and_yaml11_traps():
    r = load_recipe(None, ["data=d", "train.mixed_precision=no", "train.lr=1e-4", "loss.attn_layers=[2, 3]"])
    assert r.train.mixed_precision == "no" and r.train.lr == pytest.approx(1e-4) and r.loss.attn_layers == [2, 3]
    with pytest.raises(UsageError, match="data: missing"):
        load_recipe(None, [])


def test_recipe_hash_and_resume_differences():
    a = load_recipe(None, ["data=d"])
    b = dataclasses.replace(a, out="elsewhere", train=dataclasses.replace(a.train, steps=5))
    assert recipe_hash(a) != recipe_hash(b)  # steps decide the weights
    assert resume_differences(to_dict(a), b) == []  # ... but may grow on resume
    c = dataclasses.replace(a, window=8, train=dataclasses.replace(a.train, lr=0.5))
    assert resume_differences(to_dict(a), c) == ["train.lr", "window"]
