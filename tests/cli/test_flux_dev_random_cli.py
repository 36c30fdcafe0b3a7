"""`--model flux-dev-random` through the CLI, in-process: info from the meta device, refusals before any work."""

import pytest


def test_model_info_from_the_meta_device(cli):
    code, out, err = cli("model", "info", "--model", "flux-dev-random")
    assert code == 0, err
    assert "11901.41M parameters" in out and "T5 4.762B" in out and "meta" in out
    assert "gen --res 8k" in out and "GiB" in out


def test_gen_too_large_for_the_memory_is_one_line_exit_2(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "48")
    out = tmp_path / "imgs"
    code, _, err = cli("gen", "a lighthouse", "--model", "flux-dev-random", "--res", "8k", "--device", "cpu",
                       "--dtype", "bf16", "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "clear gen --res 8k needs ~" in lines[0] and "GiB" in lines[0]
    assert "--res 4k" in lines[0]
    assert not out.exists()  # nothing written


def test_gen_with_weights_of_another_model_is_one_line_exit_2(cli, tmp_path, tiny_random_pipe):
    from clear_cli.metrics.testing import write_student

    w = write_student(tmp_path / "tiny_attn.safetensors", tiny_random_pipe.transformer, window=8)
    out = tmp_path / "imgs"
    code, _, err = cli("gen", "a lighthouse", "--model", "flux-dev-random", "--weights", str(w), "--device", "cpu",
                       "--out", str(out))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "do not fit flux-dev-random" in lines[0] and "tiny_attn.safetensors" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("args", [("--res", "2k", "--batch-size", "8")])
def test_synth_too_large_is_refused_before_writing(cli, tmp_path, monkeypatch, args):
    monkeypatch.setenv("CLEAR_DEVICE_MEMORY", "40")
    out = tmp_path / "data"
    code, _, err = cli("synth", "--model", "flux-dev-random", "--n", "8", "--device", "cpu", "--dtype", "bf16",
                       "--out", str(out), *args)
    assert code == 2
    assert "clear synth --res 2k --batch-size 8 needs ~" in err and "--batch-size" in err.split("(", 1)[-1]
    assert not out.exists()
