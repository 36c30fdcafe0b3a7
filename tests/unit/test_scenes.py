"""The procedural scene generator: deterministic, and its captions say what it drew."""

from __future__ import annotations

import numpy as np
import pytest

from clear_cli.models import tiny, vocab
from clear_cli.tiny import scenes


def test_same_seed_same_scene_and_pixels():
    a, ca = scenes.make_batch([5, 6, 7], 64)
    b, cb = scenes.make_batch([5, 6, 7], 64)
    assert ca == cb
    np.testing.assert_array_equal(a, b)
    # an image does not depend on the batch it is drawn in
    c, cc = scenes.make_batch([7], 64)
    np.testing.assert_array_equal(c[0], a[2])
    assert cc[0] == ca[2]
    d, _ = scenes.make_batch([8, 9, 10], 64)
    assert not np.allclose(a, d)


def test_many_distinct_captions_and_any_size():
    caps = {scenes.caption(scenes.sample_scene(i)) for i in range(2000)}
    assert len(caps) > 1900
    img = scenes.render([scenes.sample_scene(1)], 200)
    assert img.shape == (1, 200, 200, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_every_caption_word_is_in_the_vocabulary_and_fits_the_text_length():
    words = set(vocab.words())
    tok = tiny.t5_tokenizer()
    unk = tok.unk_token_id
    for i in range(1500):
        cap = scenes.caption(scenes.sample_scene(i))
        assert set(cap.split()) <= words, cap
        ids = tok(cap).input_ids
        assert unk not in ids, cap
        assert len(ids) <= tiny.TEXT_LEN, cap  # one token per word plus </s>


@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_caption_matches_drawing(shape):
    """The named colour dominates the object's box, at the named 3x3 cell, on the named background."""
    size = 96
    for seed in range(6):
        sc = scenes.sample_scene(seed, n_objects=1, texture="plain")
        o = sc.objects[0]
        sc = scenes.Scene(objects=(scenes.Obj(shape, o.color, o.size, o.position, o.dx, o.dy, o.angle),),
                          background=sc.background)
        img = scenes.render([sc], size)[0]
        names = np.asarray(scenes.COLOR_NAMES)[scenes.nearest_color(img)]
        assert names[0, 0] == sc.background or o.position == "top left"
        obj = names == o.color
        assert obj.sum() > 20, (shape, o)
        cy, cx = np.argwhere(obj).mean(0) / size
        row, col = min(int(cy * 3), 2), min(int(cx * 3), 2)
        _, fx, fy = scenes.POSITIONS[o.position]
        assert (row, col) == (int(fy * 3), int(fx * 3)), (shape, o.position, cy, cx)
        # the drawn colours are the background and the object (antialiased edges aside)
        other = ~(obj | (names == sc.background))
        assert other.mean() < 0.02


def test_textured_backgrounds_keep_the_named_colour_dominant():
    for tex in scenes.TEXTURES:
        sc = scenes.Scene(objects=(scenes.Obj("circle", "red", "small", "center"),), background="blue",
                          texture=tex, seed=3)
        img = scenes.render([sc], 64)[0]
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        counts = np.bincount(scenes.nearest_color(border), minlength=len(scenes.COLORS))
        assert scenes.COLOR_NAMES[counts.argmax()] == "blue", tex
        assert "red" == scenes.COLOR_NAMES[scenes.nearest_color(img[32, 32])]
        assert scenes.caption(sc).endswith(("on a blue background" if tex == "plain" else f"on a {tex} blue background"))


def test_bad_arguments():
    with pytest.raises(ValueError):
        scenes.sample_scene(0, n_objects=4)
    with pytest.raises(ValueError):
        scenes.sample_scene(0, texture="plaid")
