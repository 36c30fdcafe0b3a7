"""Activation memory of FLUX.1-dev's blocks per token, measured on a CPU (the constants of clear_cli/models/fit.py).

A dispatch mode counts the bytes of every tensor the forward (and backward) allocates and frees them as they die;
the peak over two grid sizes gives the slope per joint token, printed in units of d_model elements of bf16:

    python bench/activation_peak.py                    # inference: one single block, then one double block
    python bench/activation_peak.py --train            # distill's student pass (attention projections trained)
    python bench/activation_peak.py --train --gc       # the same with gradient checkpointing

FLUX.1-dev's block sizes (3072 = 24 x 128, T5 width 4096), bf16, 64 text tokens, grids 32x32 and 48x48; a few
GB of RAM and a minute or two per line on 2 cores. CLEAR runs its CPU kernel here (tiled), not the CUDA one.
"""

from __future__ import annotations

import argparse
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by tensors allocated inside the mode (views and in-place results count once)."""

    def __init__(self):
        super().__init__()
        self.cur = self.peak = 0
        self.live: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t._base is None:
                key = t.untyped_storage().data_ptr()
                if key in self.live or key == 0:
                    continue
                n = t.untyped_storage().nbytes()
                self.live[key] = n
                self.cur += n
                self.peak = max(self.peak, self.cur)
                weakref.finalize(t, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)


def model(double: int, single: int, train: bool, gc: bool):
    from diffusers import FluxTransformer2DModel

    import clear_cli
    from clear_cli.attention.linearize import trainable_attention_parameters

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
                               attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                               pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    m = m.to(torch.bfloat16).requires_grad_(False)
    params = {}
    if train:
        clear_cli.linearize(m, window=8, backend="tiled")
        params = trainable_attention_parameters(m, freeze_others=True)
        for p in params.values():
            p.data = p.data.float()
        if gc:
            m.enable_gradient_checkpointing()
        m.train()
    else:
        m.eval()
    return m, params


def inputs(g: int, t: int) -> dict:
    dt = torch.bfloat16
    ids = torch.zeros(g, g, 3)
    ids[..., 1] = torch.arange(g)[:, None]
    ids[..., 2] = torch.arange(g)[None, :]
    return dict(hidden_states=torch.randn(1, g * g, 64, dtype=dt), encoder_hidden_states=torch.randn(1, t, 4096, dtype=dt),
                pooled_projections=torch.randn(1, 768, dtype=dt), timestep=torch.tensor([0.5], dtype=dt),
                guidance=torch.tensor([3.5], dtype=dt), img_ids=ids.reshape(-1, 3).to(dt),
                txt_ids=torch.zeros(t, 3, dtype=dt), return_dict=False)


def peak(m, params, g: int, t: int, train: bool) -> int:
    x = inputs(g, t)

    def run():
        if not train:
            with torch.no_grad():
                return m(**x)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(**x)[0]
        out.float().pow(2).mean().backward()
        for p in params.values():
            p.grad = None
        return None

    run()  # warm (lazy buffers, caches)
    mode = LiveBytes()
    with mode:
        out = run()
    del out
    return mode.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing (with --train)")
    ap.add_argument("--grids", default="32,48")
    ap.add_argument("--text", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(2)
    g1, g2 = (int(v) for v in args.grids.split(","))
    stacks = [("1 double + 2 single blocks", 1, 2)] if args.train else [("single block", 0, 1), ("double block", 1, 0)]
    for name, d, s in stacks:
        m, params = model(d, s, args.train, args.gc)
        p1, p2 = peak(m, params, g1, args.text, args.train), peak(m, params, g2, args.text, args.train)
        slope = (p2 - p1) / ((g2 * g2 - g1 * g1) * 3072 * 2)
        print(f"{name}{' (train' + (', gc' if args.gc else '') + ')' if args.train else ''}: peak {p1 / 2**20:.0f} "
              f"-> {p2 / 2**20:.0f} MiB, {slope:.1f} d_model units per token "
              f"({slope / (d + s):.1f} per block)", flush=True)


if __name__ == "__main__":
    main()
