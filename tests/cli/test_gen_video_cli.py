"""`clear gen --frames` on `wan-tiny-random`: an animated WebP per video, written atomically; bad combinations of
the video options are one line, exit 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageSequence


def test_gen_writes_an_animated_webp_of_the_sampled_frames(cli, tmp_path):
    from clear_cli.jobs.gen_video import sample_video
    from clear_cli.models import load_pipeline

    import clear_cli

    out = tmp_path / "clip.webp"
    code, stdout, err = cli("gen", "--model", "wan-tiny-random", "a red square moving left", "--frames", "9",
                            "--window", "2", "--time-window", "1", "--steps", "2", "--out", str(out))
    assert code == 0, err
    assert "9 frames at 64x64, window 2, time_window 1" in stdout + err
    assert [p.name for p in tmp_path.iterdir()] == ["clip.webp"]   # no temporary file left beside it
    got = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(out))])
    pipe = load_pipeline("wan-tiny-random")
    clear_cli.linearize(pipe, window=2, time_window=1)
    want = sample_video(pipe, "a red square moving left", seed=0, frames=9, width=64, height=64, steps=2,
                        guidance=3.5)
    assert got.shape == (9, 64, 64, 3)
    assert np.array_equal(got, (np.clip(want, 0, 1) * 255).round().astype(np.uint8))   # lossless
    code, _, err = cli("gen", "--model", "wan-tiny-random", "x", "--frames", "9", "--out", str(out))
    assert code == 2 and "already exists" in err


@pytest.mark.parametrize("args, says", [
    (["--model", "tiny-random", "--frames", "9"], "--frames is for video models"),
    (["--model", "wan-tiny-random", "--time-window", "2"], "--time-window is the temporal radius"),
    (["--model", "tiny-random", "--time-window", "2"], "needs --frames"),
    (["--model", "wan-tiny-random"], "is a video model: pass --frames"),
    (["--model", "wan-tiny-random", "--frames", "8"], "must be 4k + 1"),
    (["--model", "wan-tiny-random", "--frames", "9", "--time-window", "-1"], "must be >= 0"),
    (["--model", "wan-tiny-random", "--frames", "9", "--compare"], "not with --frames (video) yet: --compare"),
    (["--model", "wan-tiny-random", "--frames", "9", "--res", "72"], "not a multiple of 16"),
    (["--model", "wan-tiny-random", "--frames", "9", "--out", "x.png"], "animated WebP"),
])
def test_bad_video_combinations_are_one_line_exit_2(cli, tmp_path, args, says):
    if "--out" in args:
        args = [a if a != "x.png" else str(tmp_path / "x.png") for a in args]
    else:
        args = [*args, "--out", str(tmp_path / "o")]
    code, _, err = cli("gen", "a cat", *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1, err
    assert says in lines[0]
    assert not (tmp_path / "o").exists()


def test_model_info_on_wan(cli):
    code, out, err = cli("model", "info", "--model", "wan-tiny-random")
    assert code == 0, err
    assert "family wan: WanPipeline" in out and "2 attention blocks, 2 heads x 12" in out
    assert "cross-attention" in out and "image branch" not in out


def test_synth_refuses_wan_in_one_line(cli, tmp_path):
    code, _, err = cli("synth", "--model", "wan-tiny-random", "--n", "2", "--out", str(tmp_path / "d"))
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "does not run on wan models yet" in lines[0], err
    assert not any((tmp_path / "d").glob("*"))   # synth may have made the (empty) folder, nothing in it


def test_gen_frames_on_the_tiny_wan_teacher_random(cli, tmp_path):
    code, _, err = cli("gen", "--model", "tiny-wan-random", "a red square moving left", "--frames", "5", "--steps",
                       "1", "--window", "2", "--time-window", "0", "--out", str(tmp_path))
    assert code == 0, err
    (out,) = tmp_path.glob("*.webp")
    assert Image.open(out).n_frames == 5 and Image.open(out).size == (64, 64)
