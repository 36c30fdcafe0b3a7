"""Metric code against independent computations, with small seeded networks (no downloads)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clear_cli.errors import UsageError
from clear_cli.metrics import fid_from_features, mean_psnr, parse_metrics, psnr, ssim


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_matches_scipy_sqrtm():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g, dtype=torch.float64)
    b = 0.7 * torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g,
                                                                                    dtype=torch.float64) + 0.3
    ours = fid_from_features(a, b)
    ref = _scipy_fid(a.numpy(), b.numpy())
    assert ours == pytest.approx(ref, rel=1e-8)
    assert ours > 1.0


def test_fid_identical_sets_is_zero_even_rank_deficient():
    feats = torch.randn(6, 64, generator=torch.Generator().manual_seed(1))  # n < D: singular covariance
    assert fid_from_features(feats, feats.clone()) == pytest.approx(0.0, abs=1e-9)
    assert fid_from_features(feats, feats + 1.0) == pytest.approx(64.0, rel=1e-6)  # mean shift only


def test_fid_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(torch.randn(1, 4), torch.randn(3, 4))


def test_psnr_ssim_identical_and_known_error():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.isinf(psnr(x, x)).all()
    assert ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    y = x.clone()
    y[0] = (y[0].int() ^ 1).to(torch.uint8)  # every pixel off by exactly one level: MSE = (1/255)^2
    p = psnr(x, y)
    assert p[0].item() == pytest.approx(20 * math.log10(255), rel=1e-9)
    mean, n_inf = mean_psnr(p)
    assert n_inf == 1 and mean == pytest.approx((48.1308036 + 100.0) / 2, rel=1e-6)
    assert ssim(x, torch.flip(x, dims=[3]))[0] < 0.5


def test_one_psnr_ssim_for_eval_gen_and_checks():
    """Eval's batches, gen's PIL images and the checks' float arrays get the same numbers (torchmetrics' SSIM)."""
    from PIL import Image

    from clear_cli.metrics import image_psnr, image_ssim

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (3, 3, 40, 56), generator=g, dtype=torch.uint8)
    b = (a.int() + torch.randint(-30, 30, a.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    pa, pb = (Image.fromarray(t[1].permute(1, 2, 0).numpy()) for t in (a, b))
    assert image_psnr(pa, pb) == pytest.approx(float(psnr(a, b)[1]), rel=1e-12)
    assert image_ssim(pa, pb) == pytest.approx(float(ssim(a, b)[1]), rel=1e-12)
    fa, fb = (t.permute(0, 2, 3, 1).numpy().astype(np.float32) / 255 for t in (a, b))  # HxWxC floats, as checks
    assert image_psnr(fa[2], fb[2]) == pytest.approx(float(psnr(a, b)[2]), rel=1e-6)
    tm = pytest.importorskip("torchmetrics.functional.image")
    ref = tm.structural_similarity_index_measure(a.double() / 255, b.double() / 255, data_range=1.0,
                                                  reduction="none")
    assert torch.allclose(ssim(a, b), ref, atol=1e-12, rtol=0)


def test_parse_metrics():
    assert parse_metrics(None) == (["fid", "clip", "lpips", "ssim", "psnr", "dino", "speed"], False)
    assert parse_metrics("psnr, ssim") == (["ssim", "psnr"], True)
    with pytest.raises(UsageError) as e:
        parse_metrics("ssim,lpip")
    assert "unknown metric 'lpip'" in e.value.one_line() and "did you mean 'lpips'" in e.value.one_line()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    from clear_cli.metrics.testing import write_small_networks

    return write_small_networks(tmp_path_factory.mktemp("nets"))


def test_small_networks_load_through_the_real_paths(nets):
    from clear_cli.metrics import load_networks, pair_metrics

    n = load_networks(["fid", "clip", "lpips", "dino"], explicit=True, device=torch.device("cpu"), **nets)
    assert not n.skipped
    x = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    f = n.inception(x)
    assert f.shape == (3, 32)
    emb = n.clip.image_embeds(x)
    txt = n.clip.text_embeds(["a red circle", "two blue squares on the left", "a cat"])
    assert emb.shape == txt.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    d = n.dino(x)
    assert d.shape == (3, 32) and torch.allclose((d * n.dino(x)).sum(-1), torch.ones(3), atol=1e-5)
    assert n.lpips(x, x).abs().max() < 1e-6
    assert (n.lpips(x, x.flip(0)) - n.lpips(x, x)).abs().max() > 1e-6


def test_network_load_errors_are_one_line(nets, tmp_path):
    from clear_cli.metrics import load_networks

    cpu = torch.device("cpu")
    with pytest.raises(UsageError, match="--clip-model .*no such local directory"):
        load_networks(["clip"], explicit=False, device=cpu, clip_model=str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="--inception-weights .*file not found"):
        load_networks(["fid"], explicit=False, device=cpu, inception_weights=str(tmp_path / "x.safetensors"))
    pth = tmp_path / "pt_inception.pth"
    pth.write_bytes(b"\x80pickle")
    with pytest.raises(UsageError, match="expected a .safetensors file"):
        load_networks(["fid"], explicit=False, device=cpu, inception_weights=str(pth))
    # an LPIPS file given as Inception weights: named, not a traceback
    with pytest.raises(UsageError, match="do not fit"):
        load_networks(["fid"], explicit=False, device=cpu, inception_weights=nets["lpips_weights"])


def test_fid_inception_architecture_shape():
    from clear_cli.metrics.inception import FIDInceptionV3

    net = FIDInceptionV3()
    keys = net.net.state_dict().keys()
    # the pt_inception-2015-12-05 layout: torchvision names, 1008-way fc, no aux head
    assert "Mixed_7c.branch3x3dbl_3b.conv.weight" in keys and "AuxLogits.fc.weight" not in keys
    assert net.net.fc.weight.shape == (1008, 2048)
