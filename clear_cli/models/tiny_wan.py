"""The built-in tiny Wan: every component WanPipeline has (WanTransformer3DModel, AutoencoderKLWan, UMT5, a flow
scheduler), small enough for a CPU, built offline.

- `tiny-wan-random`: seeded random weights, for fast unit tests;
- `tiny-wan`: the same model trained here on drawn clips of one coloured shape moving in a straight line
  (`clear tiny video-train`, docs/tiny.md); weights in `clear_cli/assets/tiny_wan.safetensors`.

The VAE keeps Wan 2.1's x8 spatial and x4 temporal compression (frames = 4k + 1); at 64 px and 13 frames a
clip is a 4 x 8 x 8 latent, and patch (1, 1, 1) makes that 256 self-attention tokens on a (T, H, W) grid.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_WAN_WEIGHTS = ASSETS / "tiny_wan.safetensors"

TEXT_LEN = 16  # UMT5 tokens the tiny Wan is trained and sampled at (captions are at most 8 words)
FRAMES = 13  # default clip length (4k + 1 for the VAE's x4 temporal compression)
SIZE = 64  # default frame size in pixels

SPECIALS = ["<pad>", "</s>", "<unk>"]
# The video scenes' words first; only append (token ids are in the trained weights).
WORDS = """
a an the small large red orange yellow green cyan blue purple pink white gray
circle square triangle diamond moving left right up down on black background
""".split()

TRANSFORMER = dict(
    patch_size=(1, 1, 1), num_attention_heads=2, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=64, ffn_dim=128, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=256,
)
VAE = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
    latents_mean=[0.0] * 16, latents_std=[1.0] * 16,
)
UMT5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
SCHEDULER = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                 flow_shift=3.0, solver_order=2)  # Wan's own (UniPC, flow sigmas, shift 3 as at 480p)

COMPONENT_PREFIXES = ("transformer", "vae", "text_encoder")


def words() -> list[str]:
    seen: dict[str, None] = {}
    for w in SPECIALS + WORDS:
        seen.setdefault(w, None)
    return list(seen)


def tokenizer():
    """A word-level fast tokenizer (lower-cased, punctuation split off, `</s>` appended) over `words()`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(words())}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", ids["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=TEXT_LEN, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>", padding_side="right")


def _eval_no_dropout(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module.eval()


def build_components(seed: int = 0) -> dict[str, Any]:
    """All WanPipeline components with seeded random weights (CPU, fp32)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TRANSFORMER)
        vae = AutoencoderKLWan(**VAE)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(words()), **UMT5))
    return dict(transformer=_eval_no_dropout(transformer), vae=_eval_no_dropout(vae),
                text_encoder=_eval_no_dropout(text_encoder), tokenizer=tokenizer(),
                scheduler=UniPCMultistepScheduler(**SCHEDULER))


def load_trained(components: dict[str, Any], path: Path = TINY_WAN_WEIGHTS) -> dict[str, Any]:
    """Load one safetensors file (keys prefixed by component; VAE latent stats in its metadata) into `components`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    state = load_file(str(path))
    vae_extra = json.loads(meta.get("vae_config", "{}"))
    if vae_extra:
        components["vae"].register_to_config(**vae_extra)
    for name in COMPONENT_PREFIXES:
        sub = {k[len(name) + 1:]: v for k, v in state.items() if k.split(".", 1)[0] == name}
        if not sub:
            continue
        missing, unexpected = components[name].load_state_dict(sub, strict=False)
        if unexpected or missing:
            raise RuntimeError(f"{path}: {name} weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return components


def save_trained(components: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write all component weights to one safetensors file (atomically), the VAE latent stats in the metadata."""
    from clear_cli.files import save_safetensors

    state: dict[str, torch.Tensor] = {}
    for name in COMPONENT_PREFIXES:
        for k, v in components[name].state_dict().items():
            state[f"{name}.{k}"] = v.detach().to(torch.float32).contiguous().clone()
    cfg = components["vae"].config
    meta = {"vae_config": json.dumps({"latents_mean": [float(x) for x in cfg.latents_mean],
                                      "latents_std": [float(x) for x in cfg.latents_std]}), **(metadata or {})}
    save_safetensors(path, state, metadata=meta)


_PIPELINE_CLASS: list[type] = []


def pipeline_class() -> type:
    """`TinyWanPipeline` (built on first use: importing diffusers' Wan pipeline is slow)."""
    if _PIPELINE_CLASS:
        return _PIPELINE_CLASS[0]
    from diffusers import WanPipeline

    class TinyWanPipeline(WanPipeline):
        """Stock WanPipeline whose defaults are the tiny model's: its text length, 64 px, 13 frames.

        Stock defaults (512 tokens, 480 x 832, 81 frames) would sample the tiny model far from how it was trained.
        """

        def __call__(self, *args, **kwargs):
            kwargs.setdefault("max_sequence_length", TEXT_LEN)
            kwargs.setdefault("height", SIZE)
            kwargs.setdefault("width", SIZE)
            kwargs.setdefault("num_frames", FRAMES)
            return super().__call__(*args, **kwargs)

    _PIPELINE_CLASS.append(TinyWanPipeline)
    return TinyWanPipeline


def build_pipeline(random: bool = False, seed: int = 0):
    """The built-in tiny Wan on CPU in fp32 (`random=True`: untrained weights)."""
    import warnings

    comps = build_components(seed=seed)
    if not random:
        if TINY_WAN_WEIGHTS.is_file():
            load_trained(comps)
        else:
            warnings.warn("trained tiny Wan weights are not shipped in this build; using tiny-wan-random", stacklevel=2)
    pipe = pipeline_class()(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe
