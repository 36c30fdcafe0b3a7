"""The built-in `wan-tiny-random`: Wan 2.1's architecture at test size, seeded random weights, offline.

Built from config dicts as diffusers' own WanPipeline tests build it: WanTransformer3DModel (2 blocks, 2 heads x
12, patch (1, 2, 2), 3-D RoPE), AutoencoderKLWan with Wan's x8 spatial / x4 temporal factors (one token is 16 px
and 4 frames apart from the first), a 2-layer umT5 text encoder over the built-in word vocabulary (the in-memory
tokenizer of the tiny FLUX: no download) and the flow-match scheduler with Wan's fixed shift. Untrained: it checks
that `clear` runs Wan's code paths (gen, linearize), not what a video looks like.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanPipeline as _StockWanPipeline

from clear_cli.models import vocab

NAME = "wan-tiny-random"
TEXT_LEN = 32          # prompt tokens (Wan pads to max_sequence_length; zeros past the prompt)
BASE_RES = 64          # the size tests sample at (4 x 4 tokens per frame)
FRAMES = 9             # default clip length: 9 pixel frames -> 3 latent frames

TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                   out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
SCHEDULER = dict(num_train_timesteps=1000, shift=5.0, use_dynamic_shifting=False)


def _text_encoder(n_vocab: int):
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=n_vocab, d_model=32, d_kv=8, d_ff=32, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return UMT5EncoderModel(cfg)


def build_components(seed: int = 0) -> dict[str, Any]:
    """All WanPipeline components with seeded random weights (CPU, fp32, eval, no dropout)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from clear_cli.models.tiny import _eval_no_dropout, word_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TRANSFORMER)
        vae = AutoencoderKLWan(**VAE)
        text_encoder = _text_encoder(len(vocab.words()))
    return dict(transformer=_eval_no_dropout(transformer), vae=_eval_no_dropout(vae),
                text_encoder=_eval_no_dropout(text_encoder), tokenizer=word_tokenizer(TEXT_LEN, "$A </s>"),
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


class WanPipeline(_StockWanPipeline):
    """Stock WanPipeline whose text length defaults to the tiny tokenizer's. Saved, it is a plain WanPipeline."""

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("max_sequence_length", TEXT_LEN)
        return super().__call__(*args, **kwargs)


def build(seed: int = 0) -> WanPipeline:
    pipe = WanPipeline(**build_components(seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
