"""Missing optional packages (simulated: the module is blocked in sys.modules) and the network: one line with
the pip install line; the base install runs what the demo needs; nothing reaches the network unasked."""

from __future__ import annotations

import json
import socket
import sys

import pytest
from conftest import eval_args, one_error

from clear_cli.extras import MissingExtra, require


def _block(monkeypatch, *modules: str) -> None:
    for m in list(sys.modules):
        if m.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, m)
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # import raises ImportError, as when not installed


def test_require_answers_with_the_pip_line(monkeypatch):
    _block(monkeypatch, "torchmetrics")
    with pytest.raises(MissingExtra) as e:
        require("torchmetrics.functional.image.lpips", "the LPIPS metric")
    assert e.value.one_line() == ("error: the LPIPS metric needs the optional package torchmetrics, which is not "
                                  "installed (pip install 'clear-dit[eval]')")


def test_a_named_metric_without_its_extra_is_one_line(cli, monkeypatch, tmp_path, tiny_weights):
    from clear_cli.metrics.lpips import build_lpips, save_lpips_weights

    lp = save_lpips_weights(build_lpips("alex", pretrained=False), tmp_path / "lpips.safetensors")
    _block(monkeypatch, "torchmetrics")
    status, _, err = cli(*eval_args(tiny_weights, tmp_path / "e", "--metrics", "lpips", "--lpips-weights", str(lp)))
    assert status == 1
    one_error(err, "pip install 'clear-dit[eval]'")


def test_the_demo_metrics_run_on_the_base_install(cli, monkeypatch, tmp_path, tiny_weights):
    """The demo evaluates ssim, psnr and speed: none needs an extra."""
    _block(monkeypatch, "torchmetrics", "scipy")
    status, out, err = cli(*eval_args(tiny_weights, tmp_path / "e", "--metrics", "ssim,psnr,speed", "--json"))
    assert status == 0, err
    assert set(json.loads(out)["metrics"]) == {"ssim", "psnr", "speed"}


def test_prodigy_without_its_extra(cli, monkeypatch, tmp_path, tiny_data):
    from conftest import distill_args

    _block(monkeypatch, "prodigyopt")
    status, _, err = cli(*distill_args(tiny_data, "--set", "train.optimizer=prodigy"), "--out", str(tmp_path / "d"))
    assert status == 2
    one_error(err, "pip install 'clear-dit[prodigy]'")


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to resolve or connect is recorded and fails."""
    tried: list = []

    def refuse(*a, **k):
        tried.append(a[:2])
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: refuse(addr))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the code itself must not reach out
    return tried


def test_eval_default_metrics_never_touch_the_network(cli, tmp_path, tiny_weights, no_network, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached metric networks
    args = [a for a in eval_args(tiny_weights, tmp_path / "e") if a not in ("--metrics", "ssim,psnr", "--quiet")]
    status, out, err = cli(*args, "--json")
    assert status == 0, err
    assert no_network == []
    result = json.loads(out)  # stdout holds the JSON and nothing else
    assert {"fid", "lpips", "clip", "dino"} <= set(result["skipped"])
    assert "--inception-weights" in result["skipped"]["fid"] and "--lpips-weights" in result["skipped"]["lpips"]
    skips = [ln for ln in err.splitlines() if ln.startswith("warning: skipping")]
    assert len(skips) == 4 and all("pass a local copy with --" in ln for ln in skips), err


def test_progress_bars_are_sparse_off_a_terminal():
    import io

    from clear_cli.logs import NOT_A_TERMINAL_INTERVAL, progress_bar

    buf = io.StringIO()
    bar = progress_bar(total=1000, file=buf)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert bar.mininterval == NOT_A_TERMINAL_INTERVAL
    assert buf.getvalue().count("\r") <= 3  # start, end (and maybe one in between), not a frame per update


def test_hub_weights_offline_fail_at_once_in_one_line(cli, tmp_path, no_network):
    from conftest import GEN

    status, _, err = cli(*GEN, "--weights", "someone/repo:file.safetensors", "--out", str(tmp_path / "g"))
    assert status == 1
    one_error(err, "cannot be reached", "pass its local path")
    assert "Retrying" not in err and len(no_network) <= 2  # a probe or two, never the client's retries


def test_lpips_backbone_is_read_without_unpickling(monkeypatch):
    """The AlexNet backbone (a download) is loaded with weights_only=True into torchmetrics' LPIPS network."""
    import torch
    from torchvision.models import alexnet

    from clear_cli.metrics.lpips import pretrained_alex

    torch.manual_seed(0)
    state = alexnet(weights=None).state_dict()
    seen = {}

    def fake_download(url, **kw):
        seen.update(kw, url=url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    net = pretrained_alex()
    assert seen["weights_only"] is True and seen["url"].endswith(".pth")
    torch.testing.assert_close(net.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(net.net.slice5, "10").weight, state["features.10.weight"])
