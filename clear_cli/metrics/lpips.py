"""LPIPS through torchmetrics' network, with the backbone loadable from a local file.

torchmetrics' LPIPS downloads its ImageNet backbone (AlexNet by default) from the internet and reads its linear
heads from files it ships. Here:
- default (None): exactly that (needs the internet once; torchvision caches the backbone);
- `--lpips-weights FILE.safetensors`: the whole LPIPS network (backbone + heads, metadata ``net``) from a local
  file, nothing downloaded. `save_lpips_weights` writes one (on a connected machine from the pretrained network,
  in tests from a seeded random one).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from clear_cli.errors import UsageError
from clear_cli.metrics.loading import hub_failure, local_file, read_safetensors

NETS = ("alex", "vgg", "squeeze")


def build_lpips(net: str = "alex", pretrained: bool = False) -> nn.Module:
    """torchmetrics' LPIPS network; pretrained=False builds it without any download or file read, pretrained=True
    reads only the linear heads torchmetrics ships (the backbone stays random: `pretrained_alex` fills it)."""
    from clear_cli.extras import require

    _LPIPS = require("torchmetrics.functional.image.lpips", "the LPIPS metric")._LPIPS

    if net not in NETS:
        raise UsageError(f"LPIPS net {net!r} is not one of {', '.join(NETS)}")
    return _LPIPS(pretrained=pretrained, net=net, pnet_rand=True).eval()


def pretrained_alex() -> nn.Module:
    """LPIPS (AlexNet) with torchmetrics' shipped linear heads and the ImageNet AlexNet backbone read with
    `weights_only=True` (torchvision's own loader would unpickle the cached file)."""
    from torchvision.models import AlexNet_Weights, alexnet

    net = build_lpips("alex", pretrained=True)
    state = torch.hub.load_state_dict_from_url(AlexNet_Weights.IMAGENET1K_V1.url, map_location="cpu", progress=True,
                                               check_hash=True, weights_only=True)
    tv = alexnet(weights=None)
    tv.load_state_dict(state)
    for i in range(1, 6):
        for name, mod in getattr(net.net, f"slice{i}").named_children():
            mod.load_state_dict(tv.features[int(name)].state_dict())
    return net.eval()


def save_lpips_weights(module: nn.Module, path: str | Path, net: str = "alex") -> Path:
    """Write an LPIPS network (from `build_lpips`) as safetensors with metadata net=<net> (atomic)."""
    from clear_cli.models.weights import save_attention_weights

    return save_attention_weights(path, module.state_dict(), {"net": net})


class Lpips:
    """Per-image LPIPS distance between uint8 image batches (lower = closer)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        if weights is None:
            from clear_cli.metrics.loading import downloads_allowed, not_downloaded

            if not downloads_allowed():  # torchvision's AlexNet: a download, and a pickle even when cached
                raise not_downloaded("LPIPS AlexNet backbone", "--lpips-weights", "lpips")
            try:
                self.net = pretrained_alex()
            except Exception as e:
                raise hub_failure("LPIPS AlexNet backbone", "torchvision alexnet", "--lpips-weights", e) from e
        else:
            path = local_file(str(weights), "--lpips-weights")
            state, meta = read_safetensors(path)
            self.net = build_lpips(meta.get("net", "alex"), pretrained=False)
            try:
                self.net.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise UsageError(f"--lpips-weights {path}: the tensors do not fit an LPIPS {meta.get('net', 'alex')} "
                                 f"network ({str(e).splitlines()[0][:120]})") from e
        self.device = torch.device(device)
        self.net = self.net.to(self.device)

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = a.to(self.device, torch.float32) / 127.5 - 1
        y = b.to(self.device, torch.float32) / 127.5 - 1
        return self.net(x, y).reshape(-1).double().cpu()
