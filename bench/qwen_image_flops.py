"""Work counts and the end-to-end FLOP limit of CLEAR on Qwen-Image at 2K / 4K, from its published config.

    python bench/qwen_image_flops.py [--text-len 256]      # prints the BENCHMARKS.md table (no GPU, no weights)

The transformer is built on the meta device from Qwen-Image's published transformer config, so the per-token
linear FLOPs are counted from its real modules (2 x in x out per Linear per token: image tokens through the image
branch, text tokens through the text branch, 60 blocks). Attention per layer: 4 x d_model x pairs (QK^T and PV),
pairs exact (`clear_cli.attention.count_pairs`, circles cut at the border). One denoising step, one image; the
limit is (linear + full attention) / (linear + CLEAR attention): what a kernel at dense speed could reach.
"""

from __future__ import annotations

import argparse

import torch

from clear_cli.attention import attention_flops, count_pairs
from clear_cli.attention.counting import full_pairs

# Qwen/Qwen-Image transformer/config.json
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
IMAGE_MODULES = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp")
TEXT_MODULES = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "txt_mlp")


def per_token_flops() -> tuple[float, float, int, int]:
    """(linear FLOPs per image token, per text token, d_model, layers) over the whole transformer."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        tr = QwenImageTransformer2DModel(**QWEN_IMAGE)

    def flops(prefixes, extra=()) -> float:
        total = 0.0
        for name, m in tr.named_modules():
            if isinstance(m, torch.nn.Linear):
                inner = name.split(".", 2)[-1] if name.startswith("transformer_blocks.") else name
                if inner.startswith(prefixes) or name in extra:
                    total += 2.0 * m.in_features * m.out_features
        return total

    img = flops(IMAGE_MODULES, ("img_in", "proj_out"))
    txt = flops(TEXT_MODULES, ("txt_in",))
    return img, txt, tr.inner_dim, len(tr.transformer_blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text-len", type=int, default=256)
    args = ap.parse_args()
    t = args.text_len
    img, txt, d, layers = per_token_flops()
    print(f"Qwen-Image: d_model {d}, {layers} double-stream blocks; linear {img / 1e9:.2f} GFLOP per image token, "
          f"{txt / 1e9:.2f} per text token (T = {t})\n")
    print("| res | tokens | attention share (full) | r | full TFLOPs/layer | CLEAR exact | cut | end-to-end limit |")
    print("|---|---|---|---|---|---|---|---|")
    for res, label in ((2048, "2K"), (4096, "4K")):
        side = res // 16
        hw = side * side
        linear = img * hw + txt * t
        full = attention_flops(full_pairs((side, side), t), d)
        share = full * layers / (full * layers + linear)
        for r in (8, 16, 32):
            clear = attention_flops(count_pairs((side, side), t, r), d)
            limit = (linear + full * layers) / (linear + clear * layers)
            print(f"| {label} | {side}x{side} = {hw:,} | {100 * share:.1f}% | {r} | {full / 1e12:.2f} | "
                  f"{clear / 1e12:.3f} | {100 * (1 - clear / full):.1f}% | {limit:.2f}x |")


if __name__ == "__main__":
    main()
