"""The tiny trainer (seeded, resumable) and the shipped tiny weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clear_cli.errors import ClearError
from clear_cli.tiny.train import config_from_options, train

SMALL = dict(res=32, vae_steps=2, vae_batch=2, vae_crop=32, cache_size=8, steps=4, batch=2, warmup=2,
             decoder_steps=2, decoder_batch=1, ckpt_every=2, log_every=1, threads=1)


def _last_losses(path):
    rows = [json.loads(line) for line in open(path)]
    last = {}
    for r in rows:  # a resumed run repeats the steps after its checkpoint: keep the latest row of each
        if "loss" in r:
            last[(r["stage"], r["step"])] = r["loss"]
    return last


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    cfg = config_from_options(**SMALL)
    full = train(cfg, out=tmp_path / "a", progress=False)
    assert full.finished and full.weights.is_file()

    def stop(stage, step, loss):
        if stage == "flux" and step == 2:  # after the checkpoint at step 2 was written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "b", progress=False, on_step=stop)
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["stage"] == "flux" and state["step"] == 2
    with pytest.raises(ClearError, match="already holds") as err:
        train(cfg, out=tmp_path / "b", progress=False)
    assert "--resume auto" in err.value.hint
    resumed = train(cfg, out=tmp_path / "b", progress=False, resume="auto")
    assert resumed.finished
    la, lb = _last_losses(tmp_path / "a" / "train_log.jsonl"), _last_losses(tmp_path / "b" / "train_log.jsonl")
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k] == pytest.approx(lb[k], rel=1e-5, abs=1e-6), k
    from safetensors.torch import load_file

    wa, wb = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # a finished run resumed again is a no-op; other settings (or fewer steps) are refused
    assert train(cfg, out=tmp_path / "b", progress=False, resume="auto").finished
    with pytest.raises(ClearError, match="other settings"):
        train(config_from_options(**{**SMALL, "res": 48}), out=tmp_path / "b", progress=False, resume="auto")
    with pytest.raises(ClearError, match="fewer"):
        train(config_from_options(**{**SMALL, "steps": 3}), out=tmp_path / "b", progress=False, resume="auto")
    # more transformer steps continue the finished run's flux stage from its last checkpoint
    longer = train(config_from_options(**{**SMALL, "steps": 6}), out=tmp_path / "b", progress=False, resume="auto")
    assert longer.finished and longer.step == 6
    assert ("flux", 6) in _last_losses(tmp_path / "b" / "train_log.jsonl")
    wc = load_file(str(longer.weights))
    assert not torch.equal(wc["transformer.proj_out.weight"], wb["transformer.proj_out.weight"])
    torch.testing.assert_close(wc["vae.decoder.conv_out.weight"], wb["vae.decoder.conv_out.weight"])


def test_trained_file_loads_into_the_stock_pipeline(tmp_path):
    from diffusers import FluxPipeline

    from clear_cli.models import tiny

    cfg = config_from_options(**SMALL)
    res = train(cfg, out=tmp_path / "r", progress=False)
    comps = tiny.build_components(0)
    tiny.load_trained(comps, res.weights)
    log = [json.loads(line) for line in open(tmp_path / "r" / "train_log.jsonl")]
    stats = next(r for r in log if r["stage"] == "cache")
    # the measured latent statistics travel in the file into the VAE config
    assert comps["vae"].config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert comps["vae"].config.shift_factor == pytest.approx(stats["shift_factor"])
    pipe = FluxPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red circle in the center on a blue background", height=32, width=32, num_inference_steps=2,
               max_sequence_length=tiny.TEXT_LEN, output_type="np").images[0]
    assert img.shape == (32, 32, 3) and np.isfinite(img).all()


def test_text_encoders_train_only_when_asked(tmp_path):
    from safetensors.torch import load_file

    from clear_cli.models import tiny

    seeded = tiny.build_components(0)
    for train_text in (True, False):
        res = train(config_from_options(**SMALL, train_text=train_text), out=tmp_path / str(train_text), progress=False)
        w = load_file(str(res.weights))
        for name in ("text_encoder", "text_encoder_2"):
            ref = seeded[name].state_dict()
            moved = [k for k in ref if not torch.equal(w[f"{name}.{k}"], ref[k])]
            assert bool(moved) == train_text, (name, train_text, moved[:3])


def test_a_flux_checkpoint_can_be_checked_while_the_run_goes_on(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from clear_cli.errors import UsageError
    from clear_cli.tiny.checks import _pipe

    res = train(config_from_options(**SMALL), out=tmp_path / "r", progress=False)
    ckpt = tmp_path / "r" / "checkpoints" / "flux_000002.safetensors"
    pipe = _pipe(str(ckpt), "cpu")
    state = load_file(str(ckpt))
    for name, module in (("transformer", pipe.transformer), ("text_encoder_2", pipe.text_encoder_2)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, state[f"ema.{name}.{k}"]), (name, k)   # the EMA, as it would ship
    stats = next(json.loads(line) for line in open(tmp_path / "r" / "train_log.jsonl") if '"cache"' in line)
    assert pipe.vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    vae = load_file(str(tmp_path / "r" / "checkpoints" / "vae_final.safetensors"))
    assert all(torch.equal(v, vae[k]) for k, v in pipe.vae.state_dict().items())
    assert res.finished
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(ckpt, lonely)
    with pytest.raises(UsageError, match="vae_final.safetensors"):
        _pipe(str(lonely), "cpu")


def test_object_cover_counts_objects_not_textures():
    from dataclasses import replace

    from clear_cli.tiny import scenes
    from clear_cli.tiny.train import object_cover, token_weights

    seeds = np.arange(40)
    cover = object_cover(seeds, 64)                      # 4x4 packed tokens of 16x16 pixels
    assert cover.shape == (40, 16) and 0 < float(cover.mean()) < 0.5
    for i, s in enumerate(seeds):
        sc = scenes.sample_scene(int(s))
        img = scenes.render([sc], 64)[0]
        bare = scenes.render([replace(sc, objects=())], 64)[0]
        obj = (np.abs(img - bare).max(-1) > 0.05).reshape(4, 16, 4, 16).mean((1, 3)).reshape(-1)
        np.testing.assert_allclose(cover[i].numpy(), obj, atol=1e-6)
    w = token_weights(cover, 4.0)
    torch.testing.assert_close(w.mean(1), torch.ones(40))
    # within an image, weights go as 1 + 3 x cover: a fully covered token would weigh 4x a bare one
    torch.testing.assert_close(w / w[:, :1], (1 + 3 * cover) / (1 + 3 * cover[:, :1]))
    assert float(cover.max()) > 0.5 and (cover == 0).any()


def test_bad_options_are_usage_errors(tmp_path, capsys):
    from clear_cli.cli.app import run

    assert run(["tiny", "train", "--out", str(tmp_path / "x"), "--res", "100"]) == 2
    assert "--res" in capsys.readouterr().err
    assert run(["tiny", "train", "--out", str(tmp_path / "x"), "--resume", "latest"]) == 2


def test_shipped_weights_load_and_draw():
    from clear_cli.models import load_pipeline, text_len
    from clear_cli.models.tiny import TINY_WEIGHTS

    assert TINY_WEIGHTS.is_file(), "the trained tiny weights must ship in clear_cli/assets/"
    assert TINY_WEIGHTS.stat().st_size <= 10.5 * 2**20
    pipe = load_pipeline("tiny")
    assert text_len(pipe) == 32
    assert pipe.vae.config.scaling_factor != 1.0  # measured latent scale, not the default
    g = torch.Generator().manual_seed(0)
    img = pipe("a large red circle in the center on a blue background", height=128, width=128,
               num_inference_steps=4, generator=g, output_type="np").images[0]
    assert img.shape == (128, 128, 3) and np.isfinite(img).all()


def test_shipped_weights_follow_colour_prompts():
    """The issue's bar (>= 80% over 100 prompts; measured 95%) on the first 25 check prompts: guards the weights
    and everything that loads them (text encoders, latent statistics, tokenizers)."""
    from clear_cli.models import load_pipeline
    from clear_cli.tiny.checks import color_check

    pipe = load_pipeline("tiny")
    pipe.set_progress_bar_config(disable=True)
    c = color_check(pipe, n=25)
    assert c.rate >= 0.8
    assert c.background_hits >= 23  # colour words bound to the right thing (measured 100/100 over 100 prompts)
