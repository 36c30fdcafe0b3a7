"""The tiny Wan teacher: its clips draw what their captions say, the check scores clips right, the shipped weights
load into WanPipeline and make videos, and training resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clear_cli.errors import ClearError
from clear_cli.tiny import HELD_OUT_SEED
from clear_cli.tiny import video_checks as vc
from clear_cli.tiny import video_scenes as vs
from clear_cli.tiny.video_train import token_cover, train


def test_clips_draw_what_their_captions_say():
    clips = vs.held_out_clips(60)
    video = vs.render(clips)
    assert video.shape == (60, 13, 64, 64, 3) and video.dtype == np.float32
    for v, c in zip(video, clips):
        words = vs.caption(c).split()
        assert words == ["a", c.size, c.color, c.shape, "moving", c.direction]
        fg = v.max(-1) > 0.2
        assert fg.sum(axis=(1, 2)).min() > 10  # the whole shape shows in every frame: nothing leaves the frame
        assert not (fg[:, 0].any() or fg[:, -1].any() or fg[:, :, 0].any() or fg[:, :, -1].any())
        ys, xs = np.nonzero(fg[0])
        ye, xe = np.nonzero(fg[-1])
        move = np.array([xe.mean() - xs.mean(), ye.mean() - ys.mean()])
        dx, dy = vs.DIRECTIONS[c.direction]
        assert move @ np.array([dx, dy]) > 15 and abs(move @ np.array([dy, dx])) < 1.0  # a straight line
        pix = v[0][fg[0] & (v[0].max(-1) > 0.9 * v[0].max())]
        assert vs.COLOR_NAMES[np.bincount(vs.nearest_color(pix)).argmax()] == c.color
    # all directions, colours and shapes occur; seeds are deterministic
    assert {c.direction for c in clips} == set(vs.DIRECTIONS)
    assert {c.color for c in clips} == set(vs.COLOR_NAMES)
    np.testing.assert_array_equal(vs.render(vs.held_out_clips(3)), video[:3])


def _with(clip: vs.Clip, **kw) -> vs.Clip:
    return vs.Clip(**{**clip.__dict__, **kw})


def test_check_scores_synthetic_clips_right():
    clips = vs.held_out_clips(24)
    truth = vs.render(clips)
    assert all(vc.score_clip(v, c.color, c.direction).color_ok for v, c in zip(truth, clips))
    assert all(vc.score_clip(v, c.color, c.direction).direction_ok for v, c in zip(truth, clips))
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    for v, c in zip(truth, clips):
        back = vc.score_clip(v[::-1], c.color, c.direction)  # played backwards: the opposite direction
        assert back.color_ok and back.direction == opposite[c.direction] and not back.direction_ok
        still = vc.score_clip(np.repeat(v[:1], len(v), 0), c.color, c.direction)  # no motion
        assert still.color_ok and still.direction is None
    other = [_with(c, color=vs.COLOR_NAMES[(vs.COLOR_NAMES.index(c.color) + 3) % 8]) for c in clips]
    for v, c, o in zip(vs.render(other), clips, other):
        s = vc.score_clip(v, c.color, c.direction)
        assert s.color == o.color and not s.color_ok and s.direction_ok
    empty = vc.score_clip(np.zeros((13, 64, 64, 3), np.float32), "red", "left")
    assert (empty.color, empty.direction) == (None, None)
    # a grey background (not black) is found from the borders, the shape still scores
    grey = np.where(truth[0].max(-1, keepdims=True) > 0.2, truth[0], 0.5)
    assert vc.score_clip(grey, clips[0].color, clips[0].direction).color_ok


def test_window_rule_and_uniform_baseline():
    dt, dy, dx = vc.grid_distances(3, 4, 5)
    assert dt.shape == (60, 60)
    same = vc.window_mask(dt, dy, dx, 2, 0)
    torch.testing.assert_close(same, (dt == 0) & (dy <= 1) & (dx <= 1))  # r = 2: dy^2 + dx^2 < 4, one frame
    near = vc.window_mask(dt, dy, dx, 2, 2)  # r_t = 2 adds the neighbouring frames, not dt = 2
    torch.testing.assert_close(near, (dt <= 1) & (dt ** 2 / 4 + (dy ** 2 + dx ** 2) / 4 < 1))
    assert near[(dt == 1) & (dy == 0) & (dx == 0)].all() and not near[dt == 2].any()
    assert vc.window_mask(dt, dy, dx, 100, 100).all()  # a window larger than the volume is dense
    u = vc.uniform_locality((4, 8, 8))
    assert u["dt"] == pytest.approx(1.25) and 0 < u["2,0"] < u["3,0"] < u["3,2"] < 1


def _pipe(random: bool = True):
    from clear_cli.models import tiny_wan

    return tiny_wan.build_pipeline(random=random)


def test_probe_recomputes_the_real_attention():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    pipe = _pipe()
    tr = pipe.transformer
    z = torch.randn(1, 16, 2, 4, 4)
    rot = tr.rope(z)
    hidden = tr.patch_embedding(z).flatten(2).transpose(1, 2)
    attn = tr.blocks[0].attn1
    with torch.no_grad():
        real = WanAttnProcessor()(attn, hidden, None, None, rot)
        p = vc.attention_probs(attn, hidden, rot)  # [B, heads, N, N]
        v = attn.to_v(hidden).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        mine = attn.to_out[0]((p @ v).transpose(1, 2).flatten(2))
    torch.testing.assert_close(mine, real, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))


def test_shipped_weights_load_and_make_videos():
    from diffusers import WanPipeline

    from clear_cli.models import load_pipeline, tiny_wan

    assert tiny_wan.TINY_WAN_WEIGHTS.is_file()
    assert tiny_wan.TINY_WAN_WEIGHTS.stat().st_size < 8e6
    pipe = load_pipeline("tiny-wan")
    assert isinstance(pipe, WanPipeline)
    trained = load_pipeline("tiny-wan-random")
    assert not torch.equal(pipe.transformer.proj_out.weight, trained.transformer.proj_out.weight)
    assert pipe.vae.config.latents_std != [1.0] * 16  # measured statistics came with the file
    out = pipe(["a small red circle moving left", "a large blue square moving up"], num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert np.asarray(out).shape == (2, 13, 64, 64, 3) and np.isfinite(out).all()
    out = pipe("a small red circle moving left", num_frames=5, height=32, width=48, num_inference_steps=2,
               output_type="np").frames
    assert np.asarray(out).shape == (1, 5, 32, 48, 3)


def test_shipped_weights_keep_colour_and_motion_at_their_measured_level():
    """Below the issue's 80% bar (docs/tiny.md): guards the level the shipped weights reach, and everything that
    loads them. Measured: the VAE alone 6/16 colour, 16/16 direction (the weights before, 600 VAE steps: 2/16);
    sampled, the first 25 check prompts 24% colour, 40% direction (tiny-wan-random: 8%, 16%)."""
    from clear_cli.models import load_pipeline

    pipe = load_pipeline("tiny-wan")
    pipe.set_progress_bar_config(disable=True)
    rec = vc.reconstruction_check(pipe, n=16)
    assert rec.direction_rate >= 15 / 16 and rec.color_rate >= 4 / 16
    m = vc.motion_check(pipe, n=25)
    assert m.color_rate >= 0.16 and m.direction_rate >= 0.32


SMALL = dict(size=32, frames=5, vae_frames=5, vae_steps=2, vae_batch=2, vae_crop=16, cache_size=4, steps=4,
             batch_size=2, warmup=1, ckpt_every=2, log_every=1)


def test_training_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    full = train(out=tmp_path / "a", progress=False, **SMALL)
    assert full.finished and full.weights.is_file()

    def stop(stage, step, loss):
        if stage == "wan" and step == 2:  # after the checkpoint at step 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(out=tmp_path / "b", progress=False, on_step=stop, **SMALL)
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["stage"] == "wan"
    # the recipe only (how a call runs is not compared on resume), batch_size under the key runs first wrote
    assert not {"out", "minutes", "resume", "install", "batch_size"} & set(state["config"])
    assert state["config"]["batch"] == 2
    with pytest.raises(ClearError, match="already holds"):
        train(out=tmp_path / "b", progress=False, **SMALL)
    resumed = train(out=tmp_path / "b", progress=False, resume="auto", minutes=60, **SMALL)
    assert resumed.finished
    wa, wb = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = [json.loads(line) for line in open(tmp_path / "a" / "train_log.jsonl")]
    assert [r["step"] for r in rows if r["stage"] == "wan"] == [1, 2, 3, 4]
    with pytest.raises(ClearError, match="other settings"):
        train(out=tmp_path / "b", progress=False, resume="auto", **{**SMALL, "steps": 6})
    # the last checkpoint, exported, is the result (its EMA weights, the run's VAE and statistics)
    from clear_cli.tiny.video_train import export_checkpoint

    ex = load_file(str(export_checkpoint(tmp_path / "a" / "checkpoints" / "wan_000004.safetensors", tmp_path / "x.st")))
    assert ex.keys() == wa.keys() and all(torch.equal(ex[k], wa[k]) for k in wa)
    # the file loads back into the pipeline, with the run's latent statistics
    from clear_cli.models import tiny_wan

    comps = tiny_wan.load_trained(tiny_wan.build_components(), full.weights)
    assert comps["vae"].config.latents_std != [1.0] * 16


def test_token_cover_counts_the_shape():
    from clear_cli.tiny.video_train import to_video

    x = to_video(vs.render(vs.held_out_clips(2), 64, 13))
    cover = token_cover(x)
    assert cover.shape == (2, 4 * 8 * 8) and 0 < float(cover.max()) <= 1.0
    fg = (x.max(1).values > -0.6).float().mean(dim=(1, 2, 3))
    assert float(cover[:, 64:].mean()) == pytest.approx(float(fg.mean()), rel=0.2)


def test_bad_settings_and_models_are_refused(tmp_path):
    with pytest.raises(ClearError, match="4k"):
        train(out=tmp_path / "x", frames=12, progress=False)
    with pytest.raises(ClearError, match="neither"):
        vc.load(str(tmp_path / "missing.safetensors"))
    assert HELD_OUT_SEED > vs.TRAIN_SEEDS


def test_training_decode_is_the_pipeline_decode_unclamped():
    from clear_cli.models import tiny_wan
    from clear_cli.tiny.video_train import decode_unclamped

    vae = tiny_wan.build_components()["vae"]
    z = torch.randn(2, 16, 3, 4, 4)
    with torch.no_grad():
        stock, mine = vae.decode(z).sample, decode_unclamped(vae, z)
    assert mine.shape == stock.shape == (2, 3, 9, 32, 32)
    torch.testing.assert_close(mine.clamp(-1, 1), stock)
