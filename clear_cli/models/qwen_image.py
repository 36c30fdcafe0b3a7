"""The built-in `qwen-image-tiny-random`: Qwen-Image's architecture at test size, seeded random weights, offline.

Built from config dicts as diffusers' own QwenImagePipeline tests build it: QwenImageTransformer2DModel (2 double-
stream blocks, 3 heads x 16, RoPE axes (4, 6, 6)), AutoencoderKLQwenImage with Qwen-Image's x8 spatial factor (so
one token is 16 px, as in Qwen-Image), a 2-layer Qwen2.5-VL text encoder over the built-in word vocabulary (the
same in-memory tokenizer approach as the tiny FLUX: no download) and the flow-match scheduler with Qwen-Image's
shift settings. The stock pipeline wraps its prompt in a chat template and drops its first 34 tokens; the tiny
tokenizer has no chat template, so `QwenImagePipeline` here encodes the prompt alone (template "{}", drop 0).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImagePipeline as _StockQwenImagePipeline

from clear_cli.models import vocab

NAME = "qwen-image-tiny-random"
TEXT_LEN = 32        # prompt tokens at most (the pipeline pads per batch and masks the padding)
BASE_RES = 128       # the size tests sample at (8 x 8 tokens)

TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6))
VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True],
           latents_mean=[0.0] * 16, latents_std=[1.0] * 16)
# Qwen-Image's scheduler (dynamic shift over 256 .. 8192 tokens, 0.5 .. 0.9, terminal 0.02)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                 num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                 time_shift_type="exponential")


def _text_encoder(n_vocab: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    specials = dict(bos_token_id=3, eos_token_id=1, pad_token_id=0)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, rope_theta=1e6, vocab_size=n_vocab, max_position_embeddings=1024,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, **specials)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16,
                                                                num_heads=2, out_hidden_size=16),
                           hidden_size=16, vocab_size=n_vocab, image_token_id=n_vocab - 1,
                           video_token_id=n_vocab - 2, vision_start_token_id=n_vocab - 3, **specials)
    return Qwen2_5_VLForConditionalGeneration(cfg)


def build_components(seed: int = 0) -> dict[str, Any]:
    """All QwenImagePipeline components with seeded random weights (CPU, fp32, eval, no dropout)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    from clear_cli.models.tiny import _eval_no_dropout, word_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**TRANSFORMER)
        vae = AutoencoderKLQwenImage(**VAE)
        text_encoder = _text_encoder(len(vocab.words()))
    return dict(transformer=_eval_no_dropout(transformer), vae=_eval_no_dropout(vae),
                text_encoder=_eval_no_dropout(text_encoder), tokenizer=word_tokenizer(TEXT_LEN, "$A </s>"),
                scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER))


class QwenImagePipeline(_StockQwenImagePipeline):
    """Stock QwenImagePipeline for a tokenizer without a chat template: the prompt is encoded alone (`adopt`) and
    the text length defaults to the tiny one. Saved, it is a plain QwenImagePipeline directory."""

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("max_sequence_length", TEXT_LEN)
        return super().__call__(*args, **kwargs)


def is_tiny_tokenizer(pipe) -> bool:
    """True for a QwenImagePipeline whose tokenizer is the built-in word tokenizer (no chat-template tokens)."""
    tok = getattr(pipe, "tokenizer", None)
    return isinstance(pipe, _StockQwenImagePipeline) and tok is not None and "<|im_start|>" not in tok.get_vocab()


def adopt(pipe: _StockQwenImagePipeline) -> QwenImagePipeline:
    """The tiny tokenizer's conventions on a pipeline: no chat template, nothing dropped, TEXT_LEN tokens."""
    pipe.__class__ = QwenImagePipeline
    pipe.prompt_template_encode = "{}"
    pipe.prompt_template_encode_start_idx = 0
    pipe.tokenizer_max_length = TEXT_LEN
    return pipe


def build(seed: int = 0):
    pipe = adopt(QwenImagePipeline(**build_components(seed=seed)))
    pipe.set_progress_bar_config(disable=True)
    return pipe
