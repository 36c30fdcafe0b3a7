"""Image-quality metrics for `clear eval`: FID, CLIP text score / image similarity, DINO similarity, LPIPS,
SSIM, PSNR. Every network loads from the hub (real use) or a local path (offline and tests); see docs/eval.md.
"""

from clear_cli.metrics.frechet import feature_stats, fid_from_features, frechet_distance
from clear_cli.metrics.pixel import PSNR_CAP_DB, image_psnr, image_ssim, mean_psnr, psnr, ssim
from clear_cli.metrics.suite import (
    ALL_METRICS, FID_SMALL_N, Networks, image_features, load_images, load_networks, pair_metrics, parse_metrics,
)

__all__ = [
    "feature_stats", "fid_from_features", "frechet_distance", "PSNR_CAP_DB", "image_psnr", "image_ssim", "mean_psnr", "psnr", "ssim",
    "ALL_METRICS", "FID_SMALL_N", "Networks", "image_features", "load_images", "load_networks", "pair_metrics",
    "parse_metrics",
]
