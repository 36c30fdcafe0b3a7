"""Fréchet distance between two sets of features (the "FID" once the features come from Inception).

Our own computation in float64: tr sqrt(S1 S2) is taken as the sum of square roots of the eigenvalues of the
symmetric matrix sqrt(S1) S2 sqrt(S1) (same spectrum as S1 S2), which stays real and stable when the
covariances are rank-deficient (fewer samples than feature dimensions) where a general `sqrtm` drifts complex.
"""

from __future__ import annotations

import torch


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D]; needs N >= 2."""
    x = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
    if x.shape[0] < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 feature vectors per set, got {x.shape[0]}")
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((s + s.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), clamped at 0 (rounding can make it -1e-12)."""
    mu1, mu2 = mu1.to(torch.float64), mu2.to(torch.float64)
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(value), 0.0)


def fid_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between feature sets a [N, D] and b [M, D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))
