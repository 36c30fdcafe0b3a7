"""The built-in tiny FLUX: every component FLUX.1-dev has, small enough for a CPU, built offline.

Two variants share one architecture (2 double + 2 single blocks, 4 heads x 32, 16-channel VAE with the x8
scale, CLIP + T5 encoders with word-level tokenizers):
- `tiny-random`: seeded random weights, for fast unit tests;
- `tiny`: the same model trained here to draw simple scenes (weights shipped in `clear_cli/assets/`; see
  `clear tiny train` and docs/tiny.md). Until those weights exist it falls back to `tiny-random` with a warning.

Traps handled (DESIGN.md §8): eval() and zero dropout; a short text length (32) that the pipeline uses by
default; the VAE's `sample_size` as large as FLUX's so tiling thresholds behave alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clear_cli.models import vocab

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_WEIGHTS = ASSETS / "tiny_flux.safetensors"

TEXT_LEN = 32  # T5 tokens the tiny model is trained and sampled at
CLIP_LEN = 77

TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
    guidance_embeds=True, axes_dims_rope=(4, 14, 14),
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, act_fn="silu",
    sample_size=1024, scaling_factor=1.0, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False,
)
CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=CLIP_LEN, projection_dim=64, hidden_act="quick_gelu",
            attention_dropout=0.0, dropout=0.0)
T5 = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
          dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                 num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def word_tokenizer(max_len: int, template: str):
    """A word-level fast tokenizer over the built-in vocabulary (lower-cased, punctuation split off)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocab.words())}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, pad_token="<pad>", eos_token="</s>",
        unk_token="<unk>", bos_token="<s>", padding_side="right",
    )


def clip_tokenizer():
    return word_tokenizer(CLIP_LEN, "<s> $A </s>")


def t5_tokenizer():
    return word_tokenizer(TEXT_LEN, "$A </s>")


def _eval_no_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """Fresh transformers models start in train mode with dropout: switch both off."""
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module.eval()


def build_components(seed: int = 0, vae_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """All pipeline components with seeded random weights (CPU, fp32)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    n_vocab = len(vocab.words())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**TRANSFORMER)
        vae = AutoencoderKL(**{**VAE, **(vae_config or {})})
        clip_cfg = CLIPTextConfig(vocab_size=n_vocab, bos_token_id=3, eos_token_id=1, pad_token_id=0, **CLIP)
        text_encoder = CLIPTextModel(clip_cfg)
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=n_vocab, **T5))
    return dict(
        transformer=_eval_no_dropout(transformer), vae=_eval_no_dropout(vae),
        text_encoder=_eval_no_dropout(text_encoder), text_encoder_2=_eval_no_dropout(text_encoder_2),
        tokenizer=clip_tokenizer(), tokenizer_2=t5_tokenizer(),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
    )


COMPONENT_PREFIXES = ("transformer", "vae", "text_encoder", "text_encoder_2")


def load_trained(components: dict[str, Any], path: Path = TINY_WEIGHTS) -> dict[str, Any]:
    """Load the shipped tiny weights (one safetensors file, keys prefixed by component) into `components`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(path))
    from clear_cli.models.weights import check_finite_tensors

    check_finite_tensors(state, path)
    vae_extra = json.loads(meta.get("vae_config", "{}"))
    if vae_extra:
        components["vae"].register_to_config(**vae_extra)
    for name in COMPONENT_PREFIXES:
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.split(".", 1)[0] == name}
        if not sub:
            continue
        missing, unexpected = components[name].load_state_dict(sub, strict=False)
        if unexpected or (missing and name != "text_encoder_2"):
            raise RuntimeError(f"{path}: {name} weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return components


def save_trained(components: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write all component weights to one safetensors file (atomically), VAE latent stats in the metadata."""
    from clear_cli.files import save_safetensors

    state: dict[str, torch.Tensor] = {}
    for name in COMPONENT_PREFIXES:
        for k, v in components[name].state_dict().items():
            state[f"{name}.{k}"] = v.detach().to(torch.float32).contiguous().clone()
    vae_cfg = components["vae"].config
    meta = {"vae_config": json.dumps({"scaling_factor": float(vae_cfg.scaling_factor),
                                      "shift_factor": float(vae_cfg.shift_factor)}), **(metadata or {})}
    save_safetensors(path, state, metadata=meta)
