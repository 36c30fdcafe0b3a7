"""`flux-dev-random`: FLUX.1-dev's real architecture with seeded random weights, built offline on the target device.

Every component has FLUX.1-dev's published configuration (the values of the hub's config files, written out below
as literal dicts): transformer 11.9B, T5-XXL encoder 4.76B, CLIP-L text model 123M, the 16-channel VAE 84M and the
flow-matching scheduler. Its images are noise; its memory and time are FLUX.1-dev's, so every command can be timed
and sized at the real scale without the hub (bench/commands.py does that on a GPU).

Construction never holds a second copy of the model: each component is built on the meta device, then every
parameter is allocated once on the target device in the target dtype and filled in place, chunk by chunk, from a
seeded generator (on CUDA when one is present, so a CPU-resident copy for `--offload` gets the same values as one
built on the GPU). Tokenizers are the built-in word-level ones (clear_cli/models/vocab.py); their ids are far below
the real vocabulary sizes, which the embedding tables keep so that the parameter counts stay exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch

NAME = "flux-dev-random"
TEXT_LEN = 512  # FLUX.1-dev's T5 length (tokenizer_2 model_max_length, the pipeline's max_sequence_length)
CLIP_LEN = 77

# black-forest-labs/FLUX.1-dev, transformer/config.json
TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# black-forest-labs/FLUX.1-dev, vae/config.json
VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, sample_size=1024,
    scaling_factor=0.3611, shift_factor=0.1159, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)
# black-forest-labs/FLUX.1-dev, text_encoder/config.json (openai/clip-vit-large-patch14's text model)
CLIP: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=CLIP_LEN, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
)
# black-forest-labs/FLUX.1-dev, text_encoder_2/config.json (google/t5-v1_1-xxl's encoder)
T5: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu", dense_act_fn="gelu_new",
    is_gated_act=True, tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)
# black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json
SCHEDULER: dict[str, Any] = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)
# Special token ids of the built-in tokenizers (clear_cli/models/vocab.py: <pad> 0, </s> 1, <unk> 2, <s> 3). CLIP's
# published ids (bos 0, eos 2) select pooling by argmax over the ids, which only works with CLIP's own vocabulary.
CLIP_TOKEN_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=3)

CONFIGS = {"transformer": TRANSFORMER, "vae": VAE, "text_encoder": CLIP, "text_encoder_2": T5}
COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae")  # build order (largest first)
INIT_CHUNK = 1 << 26  # elements filled per generator call (128 MiB in bf16): bounds any temporary on the GPU


def _module(name: str, cfg: dict[str, Any]) -> torch.nn.Module:
    """One component on the meta device (real CPU buffers, no parameter storage)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        if name == "transformer":
            from diffusers import FluxTransformer2DModel

            return FluxTransformer2DModel(**cfg)
        if name == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL(**cfg)
        if name == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig(**{**cfg, **CLIP_TOKEN_IDS}))
        if name == "text_encoder_2":
            from transformers import T5Config, T5EncoderModel

            model = T5EncoderModel(T5Config(**cfg))
            # FLUX.1-dev's checkpoint holds one embedding table (`shared`) that the encoder reads: tie them, as the
            # published 4.76B parameters count it (transformers 5 does not tie when tie_word_embeddings is false).
            model.encoder.embed_tokens = model.shared
            return model
    raise ValueError(f"unknown component {name!r}")


def meta_components(configs: dict[str, dict[str, Any]] | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """The four networks on the meta device (seconds, no memory): for counting and memory estimates."""
    cfgs = {**CONFIGS, **(configs or {})}
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta parameters take it; no float buffers are built (CLIP's ids are int64)
    try:
        return {name: _module(name, cfgs[name]) for name in COMPONENTS}
    finally:
        torch.set_default_dtype(prev)


def param_dtype(component: str, param_name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype `from_pretrained(dtype=...)` gives a parameter: T5's `wo` stays fp32 under fp16 (transformers'
    `_keep_in_fp32_modules`), everything else takes the requested dtype."""
    if dtype is torch.float16 and component == "text_encoder_2" and ".wo." in f".{param_name}":
        return torch.float32
    return dtype


def _init_rule(param_name: str, shape: torch.Size) -> tuple[str, float]:
    """('normal', std) for matrices and kernels (std 1/sqrt(fan_in): activations stay O(1) through the stacks),
    ('zeros', 0) for biases, ('ones', 0) for norm scales."""
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return "normal", 1.0 / math.sqrt(max(1, fan_in))
    if param_name.rsplit(".", 1)[-1] == "bias":
        return "zeros", 0.0
    return "ones", 0.0


def generator_device(device: torch.device) -> torch.device:
    """Random numbers come from CUDA whenever it is present (fast, and the same values on CPU and GPU copies)."""
    if device.type == "cuda":
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def materialize(module: torch.nn.Module, component: str, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator) -> torch.nn.Module:
    """Allocate every meta parameter once on `device` and fill it in place (shared parameters stay shared)."""
    gen_dev = torch.device(generator.device)
    same = gen_dev.type == device.type and (gen_dev.index or 0) == (device.index or 0)  # "cuda" is "cuda:0"
    done: dict[int, torch.nn.Parameter] = {}
    names = {id(p): n for n, p in module.named_parameters(remove_duplicate=True)}
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in done:
                mod._parameters[key] = done[id(p)]
                continue
            name = names.get(id(p), key)
            new = torch.empty(p.shape, device=device, dtype=param_dtype(component, name, dtype))
            kind, std = _init_rule(name, p.shape)
            with torch.no_grad():
                if kind == "zeros":
                    new.zero_()
                elif kind == "ones":
                    new.fill_(1.0)
                else:
                    flat = new.view(-1)
                    for start in range(0, flat.numel(), INIT_CHUNK):
                        part = flat[start:start + INIT_CHUNK]
                        if same:
                            part.normal_(0.0, std, generator=generator)
                        else:  # e.g. a CPU copy for --offload: draw on CUDA, copy over (no fp32 detour)
                            tmp = torch.empty(part.numel(), device=gen_dev, dtype=new.dtype)
                            part.copy_(tmp.normal_(0.0, std, generator=generator))
            param = torch.nn.Parameter(new, requires_grad=p.requires_grad)
            done[id(p)] = param
            mod._parameters[key] = param
    for name, b in module.named_buffers():
        if b.device.type == "meta":
            raise RuntimeError(f"{component}: buffer {name} was built on the meta device")
    module.to(device)  # the (CPU-built) buffers, e.g. CLIP's position ids
    return module


def weight_bytes(configs: dict[str, dict[str, Any]] | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of all weights in `dtype` (counted on the meta device)."""
    total = 0
    for name, m in meta_components(configs).items():
        for pn, p in m.named_parameters():
            total += p.numel() * torch.empty((), dtype=param_dtype(name, pn, dtype)).element_size()
    return total


def _eval_no_dropout(module: torch.nn.Module) -> torch.nn.Module:
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module.eval()


def build_components(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     configs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Pipeline components with FLUX.1-dev's architecture (or `configs` overriding some) and seeded random weights.

    device "meta" gives the structure only (no storage). Component k draws from a generator seeded with seed + k.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from clear_cli.models import tiny

    dev = torch.device(device)
    comps: dict[str, Any] = meta_components(configs, dtype if dev.type == "meta" else torch.float32)
    if dev.type != "meta":
        gdev = generator_device(dev)
        for k, name in enumerate(COMPONENTS):
            gen = torch.Generator(gdev).manual_seed(int(seed) * 1000 + k)
            comps[name] = materialize(comps[name], name, dev, dtype, gen)
    for name in COMPONENTS:
        comps[name] = _eval_no_dropout(comps[name])
    cfgs = {**CONFIGS, **(configs or {})}
    comps["tokenizer"] = tiny.word_tokenizer(int(cfgs["text_encoder"].get("max_position_embeddings", CLIP_LEN)),
                                             "<s> $A </s>")
    comps["tokenizer_2"] = tiny.word_tokenizer(TEXT_LEN, "$A </s>")
    comps["scheduler"] = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return comps
