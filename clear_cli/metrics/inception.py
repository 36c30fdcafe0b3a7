"""Image features for FID: the FID Inception-v3 (pt_inception-2015-12-05 weights) or a stand-in from a file.

Every feature network takes uint8 images [B, 3, H, W] and returns float features [B, D] (`num_features` = D).

- Default: the Inception-v3 that FID is defined with (TF-slim port used by pytorch-fid / torch-fidelity), built on
  torchvision's blocks with FID's pooling changes, weights downloaded once from the pytorch-fid release into the torch
  hub cache (a known file, read with weights_only).
- `--inception-weights FILE.safetensors`: the same network from a local file (the .pth converted once, see
  docs/eval.md); or, when the file's metadata says ``arch: small-conv``, a small conv net with the same interface
  (what tests use: `SmallConvFeatures` + `save_feature_net`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clear_cli.metrics.loading import hub_failure, local_file, read_safetensors

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")


def _fid_blocks():
    from torchvision.models import inception as tv

    def avg_pooled(base):
        class Block(base):
            def _forward(self, x):  # average pooling without the zero padding in the count (TF behaviour)
                out = super()._forward(x)
                out[3] = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
                return out

        Block.__name__ = Block.__qualname__ = f"FID{base.__name__}"
        return Block

    FIDInceptionA, FIDInceptionC = avg_pooled(tv.InceptionA), avg_pooled(tv.InceptionC)
    FIDInceptionE1 = avg_pooled(tv.InceptionE)

    class FIDInceptionE2(tv.InceptionE):
        def _forward(self, x):  # the last block max-pools (a bug in the original graph that FID keeps)
            out = super()._forward(x)
            out[3] = self.branch_pool(F.max_pool2d(x, 3, stride=1, padding=1))
            return out

    return tv, FIDInceptionA, FIDInceptionC, FIDInceptionE1, FIDInceptionE2


class FIDInceptionV3(nn.Module):
    """Inception-v3 as FID defines it; 2048-d pool features of images resized to 299x299 bilinear."""

    num_features = 2048

    def __init__(self) -> None:
        super().__init__()
        tv, block_a, block_c, block_e1, block_e2 = _fid_blocks()
        net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
        net.Mixed_5b = block_a(192, pool_features=32)
        net.Mixed_5c = block_a(256, pool_features=64)
        net.Mixed_5d = block_a(288, pool_features=64)
        net.Mixed_6b = block_c(768, channels_7x7=128)
        net.Mixed_6c = block_c(768, channels_7x7=160)
        net.Mixed_6d = block_c(768, channels_7x7=160)
        net.Mixed_6e = block_c(768, channels_7x7=192)
        net.Mixed_7b = block_e1(1280)
        net.Mixed_7c = block_e2(2048)
        self.net = net.eval()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        state = {k.removeprefix("net."): v for k, v in state.items()}
        self.net.load_state_dict(state, strict=True)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = images.to(next(self.parameters()).device, torch.float32) / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class SmallConvFeatures(nn.Module):
    """A small conv net with the feature interface: stands in for Inception in tests and quick checks."""

    def __init__(self, channels: tuple[int, ...] = (8, 16), dim: int = 32, image_size: int = 64) -> None:
        super().__init__()
        self.config = {"channels": list(channels), "dim": int(dim), "image_size": int(image_size)}
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, dim)
        self.num_features = int(dim)
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config["image_size"]
        x = images.to(self.head.weight.device, torch.float32) / 255.0
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return self.head(F.adaptive_avg_pool2d(self.body(2 * x - 1), 1).flatten(1))


def save_feature_net(net: nn.Module, path: str | Path) -> Path:
    """Write a feature net as safetensors with the metadata `load_inception` reads (atomic)."""
    from clear_cli.models.weights import save_attention_weights  # the project's one atomic safetensors writer

    arch = "small-conv" if isinstance(net, SmallConvFeatures) else "fid-inception-v3"
    meta = {"arch": arch}
    if isinstance(net, SmallConvFeatures):
        meta["config"] = json.dumps(net.config)
    return save_attention_weights(path, net.state_dict(), meta)


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """The FID feature network: downloaded FID Inception (None) or from a local .safetensors file."""
    if weights is None:
        from clear_cli.metrics.loading import downloads_allowed, not_downloaded

        cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_URL.rsplit("/", 1)[-1]
        if not downloads_allowed() and not cached.is_file():
            raise not_downloaded("FID Inception network", "--inception-weights", "fid")
        net = FIDInceptionV3()
        try:
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", progress=True,
                                                       weights_only=True)
        except Exception as e:  # offline: URLError / HTTPError / OSError
            raise hub_failure("FID Inception weights", FID_WEIGHTS_URL.rsplit("/", 1)[-1], "--inception-weights",
                              e) from e
        net.load_weights(state)
        return net.to(device)
    path = local_file(str(weights), "--inception-weights")
    state, meta = read_safetensors(path)
    arch = meta.get("arch", "fid-inception-v3")
    from clear_cli.errors import UsageError

    try:
        if arch == "small-conv":
            cfg = json.loads(meta.get("config", "{}"))
            net = SmallConvFeatures(tuple(cfg.get("channels", (8, 16))), cfg.get("dim", 32), cfg.get("image_size", 64))
            net.load_state_dict(state, strict=True)
        elif arch == "fid-inception-v3":
            net = FIDInceptionV3()
            net.load_weights(state)
        else:
            raise UsageError(f"--inception-weights {path}: unknown arch {arch!r} in its metadata",
                             "expected fid-inception-v3 or small-conv")
    except RuntimeError as e:
        raise UsageError(f"--inception-weights {path}: the tensors do not fit a {arch} network "
                         f"({str(e).splitlines()[0][:120]})", "pass the pt_inception-2015-12-05 weights") from e
    return net.eval().to(device)
