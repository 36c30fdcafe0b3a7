"""Will a command fit the device's memory? Estimated before anything heavy runs, refused in one line if not.

    need = weights on the device + activations of the largest step + a reserve (CUDA context, allocator slack)

Weights are counted exactly: parameters x dtype bytes, from the meta device for `flux-dev-random` and FLUX.1-dev
(the same architecture, models/flux_dev.py), from the tensor headers of a local diffusers directory, or from a
loaded pipeline. Activations are counted per token of the joint sequence (text + image) in units of d_model
elements of the compute dtype:

- inference: FLUX.1-dev's single-stream block peaks at 14.2 units, the double-stream block at 9.9 (stock
  attention; measured on a CPU with a live-tensor tracker over FLUX.1-dev-sized blocks: `python
  bench/activation_peak.py`). CLEAR's CUDA kernel adds tile-major copies of q, k, v and the output (4 units,
  *estimate*);
- training (distill): per block, 26.7 units stay saved for the backward pass without gradient checkpointing, 1.4
  with (the block's inputs), plus 12 units while the backward pass runs (same tracker, CPU tiled kernel, the
  attention projections trained as distill trains them);
- VAE: ~1,024 elements per pixel of the largest (tile of the) image it encodes or decodes, *estimate*.

bench/commands.py prints these estimates beside the peaks it measures on a GPU; adjust the constants to them.
Checks run on CUDA devices (total memory of the card), on the CPU (physical RAM), or against a pretended size:
`CLEAR_DEVICE_MEMORY=24` (GiB) sizes any run for a 24 GB card. `CLEAR_SKIP_MEMORY_CHECK=1` runs anyway.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clear_cli.errors import UsageError

GiB = 1024 ** 3
UNITS_SINGLE = 14.2  # peak activation of a single-stream block, per joint token, in d_model elements (measured)
UNITS_DOUBLE = 9.9  # the same for a double-stream block (measured)
UNITS_CLEAR_CUDA = 4.0  # CLEAR's tile-major q/k/v/output copies on CUDA (estimate)
UNITS_SAVED = 26.7  # saved for backward per block, no gradient checkpointing (measured, CPU tiled kernel)
UNITS_SAVED_CKPT = 1.4  # saved per block with gradient checkpointing: the block's inputs (measured)
UNITS_BACKWARD = 12.0  # on top of the saved tensors while the backward pass runs (measured)
UNITS_ATTN_LOSS = 2.0  # teacher + student attention outputs kept per selected layer (L_attn)
VAE_ELEMS_PER_PIXEL = 1024  # VAE encoder/decoder peak per pixel of a tile, in elements (estimate)
TEXT_ACT_BYTES = GiB // 4  # T5-XXL at 512 tokens and CLIP: activations
RESERVE_BYTES = GiB  # CUDA context and allocator slack
METRIC_NET_BYTES = int(2.5 * GiB)  # CLIP ViT-L/14 + DINOv2-base + Inception + LPIPS in fp32 (clear eval)
OPTIMIZER_STATES = {"prodigy": 4, "adamw": 2}  # fp32 copies per trained parameter (Prodigy: exp_avg, exp_avg_sq, s, p0)
SKIP_ENV = "CLEAR_SKIP_MEMORY_CHECK"
MEMORY_ENV = "CLEAR_DEVICE_MEMORY"


@dataclass
class Arch:
    """What the estimates need to know about a model (no weights)."""

    name: str
    params: dict[str, int]  # component -> parameters (transformer, text_encoder_2, text_encoder, vae)
    d_model: int
    n_double: int
    n_single: int
    text_len: int
    vae_channels: int  # the VAE's widest full-resolution channel count (block_out_channels[0])
    vae_tile: int  # VAE tile side in pixels (sample_size): above 1024^2 the cascade decodes in tiles
    trained: int = 0  # attention parameters distillation trains
    teacher_copy: int = 0  # elements of the frozen teacher projections
    transformer: torch.nn.Module | None = field(default=None, repr=False)  # meta or real, for weight-file checks

    def weights(self, dtype_bytes: int, components: tuple[str, ...] | None = None) -> int:
        return sum(n for c, n in self.params.items() if components is None or c in components) * dtype_bytes


@dataclass
class Need:
    """An estimate: total bytes and its parts (for the one-line message)."""

    what: str
    total: int
    parts: dict[str, int]

    def text(self) -> str:
        return " + ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items() if v) + " GiB"


# ------------------------------------------------------------------------------------------------ architecture

def _from_transformer(name: str, tr: torch.nn.Module, params: dict[str, int], text_len: int, vae_cfg: Any) -> Arch:
    from clear_cli.models.memory import memory_figure

    cfg = tr.config
    fig = memory_figure(tr, 2)
    get = vae_cfg.get if hasattr(vae_cfg, "get") else (lambda k, d=None: getattr(vae_cfg, k, d))
    return Arch(name=name, params=params, d_model=int(cfg.num_attention_heads * cfg.attention_head_dim),
                n_double=int(cfg.num_layers), n_single=int(cfg.num_single_layers), text_len=int(text_len),
                vae_channels=int((get("block_out_channels", None) or [128])[0]),
                vae_tile=int(get("sample_size", 1024) or 1024), trained=fig.trained, teacher_copy=fig.teacher_copy,
                transformer=tr)


@functools.lru_cache(maxsize=2)
def flux_dev_arch(name: str = "flux-dev-random") -> Arch:
    """FLUX.1-dev's architecture counted on the meta device (about a second, cached)."""
    from clear_cli.models import flux_dev

    comps = flux_dev.meta_components()
    params = {c: sum(p.numel() for p in m.parameters()) for c, m in comps.items()}
    return _from_transformer(name, comps["transformer"], params, flux_dev.TEXT_LEN, flux_dev.VAE)


def _header_params(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                n += math.prod(h.get_slice(k).get_shape())
    return n


def _local_arch(path: Path) -> Arch | None:
    """A local diffusers FLUX directory: counts from the safetensors headers, the transformer from its config."""
    from diffusers import FluxTransformer2DModel

    from accelerate import init_empty_weights

    params = {c: _header_params(path / c) for c in ("transformer", "text_encoder_2", "text_encoder", "vae")
              if (path / c).is_dir()}
    if not params.get("transformer"):
        return None
    with init_empty_weights(include_buffers=False):
        tr = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(path / "transformer")))
    vae_cfg = json.loads((path / "vae" / "config.json").read_text()) if (path / "vae" / "config.json").is_file() else {}
    text_len = 512
    tok = path / "tokenizer_2" / "tokenizer_config.json"
    if tok.is_file():
        text_len = min(512, int(json.loads(tok.read_text()).get("model_max_length", 512) or 512))
    return _from_transformer(str(path), tr, params, text_len, vae_cfg)


def architecture(model: str, pipe=None) -> Arch | None:
    """The model's Arch without loading weights where possible; None when only loading would tell."""
    from clear_cli.flux import DEFAULT_MODEL, RANDOM_MODELS, TINY_MODELS
    from clear_cli.models.text import text_len

    if pipe is not None:
        params = {c: sum(p.numel() for p in getattr(pipe, c).parameters())
                  for c in ("transformer", "text_encoder_2", "text_encoder", "vae") if getattr(pipe, c, None) is not None}
        return _from_transformer(str(model), pipe.transformer, params, text_len(pipe), pipe.vae.config)
    name = str(model)
    if name in RANDOM_MODELS or name == DEFAULT_MODEL:
        return flux_dev_arch(name)
    if name in TINY_MODELS:
        return None  # a few MB: nothing to check
    path = Path(name).expanduser()
    if (path / "model_index.json").is_file():
        try:
            return _local_arch(path)
        except Exception:  # an unusual directory: loading it will say what is wrong
            return None
    return None


# ------------------------------------------------------------------------------------------------ estimates

def _dtype_bytes(dtype: torch.dtype | str | None) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    return 4 if str(dtype) in ("fp32", "float32", "no") else 2


def tokens(arch: Arch, width: int, height: int) -> int:
    return arch.text_len + (height // 16) * (width // 16)


def transformer_activations(arch: Arch, width: int, height: int, dtype_bytes: int, *, clear: bool, cuda: bool,
                            batch: int = 1) -> int:
    units = max(UNITS_SINGLE if arch.n_single else 0.0, UNITS_DOUBLE if arch.n_double else 0.0)
    if clear and cuda:
        units += UNITS_CLEAR_CUDA
    return int(units * tokens(arch, width, height) * arch.d_model * dtype_bytes * batch)


def vae_activations(arch: Arch, width: int, height: int, dtype_bytes: int, *, tiled: bool, batch: int = 1) -> int:
    """Peak of one VAE encode or decode: the network over a tile (or the image), plus the image and its tiles."""
    px = width * height
    net_px = min(px, arch.vae_tile ** 2) if tiled else px
    scale = arch.vae_channels / 128
    net = VAE_ELEMS_PER_PIXEL * scale * net_px * dtype_bytes * batch
    images = 3 * px * (2 * dtype_bytes + 8) * batch  # decoded tiles + blended image, fp32 copy for postprocessing
    return int(net + images)


def gen_need(arch: Arch, width: int, height: int, *, dtype_bytes: int = 2, offload: bool = False, cuda: bool = True,
             clear: bool = True, batch: int = 1, what: str = "") -> Need:
    """`clear gen` / the sampling of synth and eval at width x height (the largest stage of a cascade)."""
    tiled = width * height > 1024 * 1024
    tr_w = arch.weights(dtype_bytes, ("transformer",))
    text_w = arch.weights(dtype_bytes, ("text_encoder_2", "text_encoder"))
    vae_w = arch.weights(dtype_bytes, ("vae",))
    tr_a = transformer_activations(arch, width, height, dtype_bytes, clear=clear, cuda=cuda, batch=batch)
    vae_a = vae_activations(arch, width, height, dtype_bytes, tiled=tiled, batch=batch)
    reserve = RESERVE_BYTES if cuda else 0
    if offload:  # one component on the device at a time
        phases = {"transformer": tr_w + tr_a, "text encoders": text_w + TEXT_ACT_BYTES, "vae": vae_w + vae_a}
        big = max(phases, key=phases.get)
        parts = {f"{big} weights": phases[big] - {"transformer": tr_a, "text encoders": TEXT_ACT_BYTES,
                                                    "vae": vae_a}[big],
                 "activations": {"transformer": tr_a, "text encoders": TEXT_ACT_BYTES, "vae": vae_a}[big],
                 "reserve": reserve}
    else:
        parts = {"weights": tr_w + text_w + vae_w, "activations": max(tr_a, vae_a, TEXT_ACT_BYTES), "reserve": reserve}
    return Need(what, sum(parts.values()), parts)


def distill_need(arch: Arch, resolution: int, *, micro_batch: int, checkpointing: bool, optimizer: str,
                 mixed_precision: str, attn_layers: int = 10, world: int = 1, zero_stage: int = 0,
                 cuda: bool = True, what: str = "") -> Need:
    """One process of `clear distill`: frozen + trained weights, teacher copies, gradients, optimizer, activations."""
    b = 2 if mixed_precision in ("bf16", "fp16") else 4
    frozen = (arch.params["transformer"] - arch.trained) * b
    trained = arch.trained * 4
    teacher = arch.teacher_copy * b
    grads = arch.trained * 4 // (world if zero_stage >= 2 else 1)
    opt = OPTIMIZER_STATES.get(optimizer, 2) * arch.trained * 4 // (world if zero_stage >= 1 else 1)
    n_blocks = arch.n_double + arch.n_single
    unit = tokens(arch, resolution, resolution) * arch.d_model * b * micro_batch
    saved = (UNITS_SAVED_CKPT if checkpointing else UNITS_SAVED) * n_blocks
    act = int((saved + UNITS_BACKWARD + UNITS_ATTN_LOSS * attn_layers) * unit)
    others = arch.weights(b, ("vae",))  # the text encoders are freed after encoding the validation prompts
    reserve = RESERVE_BYTES if cuda else 0
    parts = {"weights": frozen + trained + teacher + others, "gradients": grads, "optimizer": opt,
             "activations": act, "reserve": reserve}
    train = sum(parts.values())
    load = arch.weights(b) + teacher + arch.trained * 2 + reserve  # while loading: every component, bf16 -> fp32
    if load > train:
        parts = {"weights while loading": load - reserve, "reserve": reserve}
    return Need(what, max(train, load), parts)


# ------------------------------------------------------------------------------------------------ devices

def _parse_gib(text: str) -> float:
    t = text.strip().lower().replace(" ", "")
    for suffix in ("gib", "gb", "g"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    return float(t)


def device_capacity(device: torch.device | str) -> tuple[int, str] | None:
    """(bytes, description) of the memory a run on `device` may use; None when nothing can be said."""
    env = os.environ.get(MEMORY_ENV, "").strip()
    if env:
        try:
            return int(_parse_gib(env) * GiB), f"{MEMORY_ENV}={env}"
        except ValueError:
            raise UsageError(f"{MEMORY_ENV}={env!r} is not a size", f"e.g. {MEMORY_ENV}=24 (GiB)") from None
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev.index or 0)
        return int(props.total_memory), f"{props.name}, {props.total_memory / GiB:.1f} GiB"
    if dev.type == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        return int(ram), f"{ram / GiB:.1f} GiB of RAM"
    return None


def _skip() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes")


def refuse_if_over(need: Need, device: torch.device | str, fixes: list[tuple[str, Need]]) -> None:
    """UsageError (exit 2) with the number and the first fix that fits, when `need` exceeds the device."""
    if _skip():
        return
    cap = device_capacity(device)
    if cap is None or need.total <= cap[0]:
        return
    limit, where = cap
    dev = torch.device(device)
    ok = [(label, n) for label, n in fixes if n.total <= limit]
    if ok:
        label, n = ok[0]
        hint = f"{label} needs ~{n.total / GiB:.1f} GiB"
    elif dev.type == "cpu":
        hint = "use a GPU (--device cuda) or the built-in tiny model (--model tiny)"
    else:
        hint = "no smaller setting fits either: use a GPU with more memory"
    raise UsageError(f"{need.what} needs ~{need.total / GiB:.1f} GiB on {dev} ({where}): {need.text()} (estimate)",
                     f"{hint}; {SKIP_ENV}=1 runs it anyway")


def _res_label(w: int, h: int) -> str:
    names = {1024: "1k", 2048: "2k", 4096: "4k", 8192: "8k"}
    return names[w] if w == h and w in names else f"{w}x{h}"


def _smaller(width: int, height: int, floor: int = 1024) -> list[tuple[int, int]]:
    out = []
    w, h = width, height
    while w * h > floor * floor:
        w, h = max(16, (w // 2) // 16 * 16), max(16, (h // 2) // 16 * 16)
        out.append((w, h))
    return out


def check_load(model: str, device: torch.device, dtype: torch.dtype) -> None:
    """Before a built-in model is allocated: do its weights alone fit the device (or the RAM)?"""
    arch = architecture(model)
    if arch is None:
        return
    b = _dtype_bytes(dtype)
    need = Need(f"{model} in {str(dtype).replace('torch.', '')}", arch.weights(b) + (RESERVE_BYTES if device.type ==
                                                                                     "cuda" else 0),
                {"weights": arch.weights(b)})
    fixes = [("--dtype bf16", Need("", arch.weights(2), {}))] if b == 4 else []
    refuse_if_over(need, device, fixes)


# ------------------------------------------------------------------------------------------------ the jobs

def check_weights(weights, arch: Arch | None, model: str) -> None:
    """An attention-weight file made for another architecture: one UsageError before anything runs."""
    if weights is None or arch is None or arch.transformer is None:
        return
    from clear_cli.models.weights import POOL_SUFFIX

    state = {k: tuple(v.shape) for k, v in arch.transformer.state_dict().items()}
    modules = dict(arch.transformer.named_modules())
    bad: list[str] = []
    for k, v in {**weights.tensors, **getattr(weights, "deltas", {})}.items():
        if k.endswith(POOL_SUFFIX):
            continue  # pooling weights live in the CLEAR processors; their shape follows down_factor
        if k not in state:
            bad.append(f"{k} (not in the model)")
        elif tuple(v.shape) != state[k]:
            bad.append(f"{k} (file {list(v.shape)}, model {list(state[k])})")
    for name, d in getattr(weights, "lora", {}).items():
        w = getattr(modules.get(name), "weight", None)
        if w is None:
            bad.append(f"{name} (not in the model)")
        elif tuple(w.shape) != (d.B.shape[0], d.A.shape[1]):
            bad.append(f"{name} (LoRA {[d.B.shape[0], d.A.shape[1]]}, model {list(w.shape)})")
    if bad:
        made = f" (made for {weights.base_model})" if getattr(weights, "base_model", None) else ""
        raise UsageError(f"weights {weights.path.name}{made} do not fit {model}: {len(bad)} tensor(s) differ, e.g. "
                         f"{bad[0]}", f"pass attention weights made for {model}'s architecture")


def check_gen(cfg, device: torch.device, target: tuple[int, int], weights=None, pipe=None) -> None:
    """`clear gen`: the weight file fits the architecture and the largest stage fits the device."""
    arch = architecture(cfg.model, pipe)
    check_weights(weights, arch, cfg.model)
    if arch is None or getattr(cfg, "parallel", "none") == "patch":  # patch parallelism splits the activations
        return
    from clear_cli.devices import resolve_dtype

    b = _dtype_bytes(resolve_dtype(cfg.dtype, device))
    w, h = target
    cuda = device.type == "cuda"
    kw = dict(dtype_bytes=b, cuda=cuda)
    need = gen_need(arch, w, h, offload=cfg.offload, what=f"clear gen --res {_res_label(w, h)}"
                    + (" --offload" if cfg.offload else ""), **kw)
    fixes = [] if cfg.offload or not cuda else [("--offload", gen_need(arch, w, h, offload=True, **kw))]
    for sw, sh in _smaller(w, h):
        fixes.append((f"--res {_res_label(sw, sh)}", gen_need(arch, sw, sh, offload=cfg.offload, **kw)))
        if cuda and not cfg.offload:
            fixes.append((f"--res {_res_label(sw, sh)} --offload", gen_need(arch, sw, sh, offload=True, **kw)))
    refuse_if_over(need, device, fixes)


def check_synth(cfg, device: torch.device, width: int, height: int) -> None:
    """`clear synth`: a batch of `batch_size` images at the resolution (sampling, decoding, latent caching)."""
    arch = architecture(cfg.model)
    if arch is None or cfg.from_images is not None and not cfg.cache_embeddings and not cfg.cache_latents:
        return
    from clear_cli.devices import resolve_dtype

    b = _dtype_bytes(resolve_dtype(cfg.dtype, device))
    cuda = device.type == "cuda"

    def need(batch: int, w: int, h: int) -> Need:
        return gen_need(arch, w, h, dtype_bytes=b, cuda=cuda, clear=False, batch=batch,
                        what=f"clear synth --res {_res_label(w, h)} --batch-size {batch}")

    fixes = [(f"--batch-size {k}", need(k, width, height)) for k in (2, 1) if k < cfg.batch_size]
    fixes += [(f"--res {_res_label(sw, sh)} --batch-size 1", need(1, sw, sh)) for sw, sh in _smaller(width, height)]
    refuse_if_over(need(cfg.batch_size, width, height), device, fixes)


def check_distill(recipe, accelerator) -> None:
    """`clear distill`: one process's weights, gradients, optimizer state and activations at the recipe's size."""
    arch = architecture(recipe.model)
    if arch is None:
        return
    t = recipe.train
    world = int(getattr(accelerator, "num_processes", 1) or 1)
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    zero = int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0
    micro = max(1, t.batch_size // (world * t.gradient_accumulation))
    res = int(recipe.resolution or 1024)
    device = accelerator.device
    layers = len(recipe.loss.attn_layers) if recipe.loss.attn_layers is not None else (arch.n_single + 3) // 4
    kw = dict(optimizer=t.optimizer, mixed_precision=t.mixed_precision, attn_layers=layers if recipe.loss.attn else 0,
              world=world, zero_stage=zero, cuda=device.type == "cuda")

    def need(ckpt: bool, mb: int, opt: str | None = None) -> Need:
        args = {**kw, "optimizer": opt or t.optimizer}
        return distill_need(arch, res, micro_batch=mb, checkpointing=ckpt, what=f"clear distill at {res}^2, micro "
                            f"batch {mb}{', gradient checkpointing' if ckpt else ''}", **args)

    fixes = []
    if not t.gradient_checkpointing:
        fixes.append(("--set train.gradient_checkpointing=true", need(True, micro)))
    if micro > 1:
        fixes.append((f"micro batch 1 (--set train.gradient_accumulation={t.batch_size // world})", need(True, 1)))
    if t.optimizer == "prodigy":
        fixes.append(("--set train.optimizer=adamw", need(True, 1, "adamw")))
    if zero < 2:
        fixes.append(("DeepSpeed ZeRO-2 over 4 GPUs (recipes/accelerate/zero2.yaml)",
                      distill_need(arch, res, micro_batch=1, checkpointing=True,
                                   **{**kw, "world": max(4, world), "zero_stage": 2})))
    refuse_if_over(need(t.gradient_checkpointing, micro), device, fixes)


def check_eval(cfg, device: torch.device, width: int, height: int, metrics: list[str]) -> None:
    """`clear eval`: sampling at the resolution (full attention for the teacher) plus the metric networks."""
    arch = architecture(cfg.model)
    if arch is None:
        return
    from clear_cli.devices import resolve_dtype

    b = _dtype_bytes(resolve_dtype(cfg.dtype, device))
    nets = METRIC_NET_BYTES if set(metrics) & {"fid", "clip", "dino", "lpips"} else 0
    need = gen_need(arch, width, height, dtype_bytes=b, cuda=device.type == "cuda",
                    what=f"clear eval --res {_res_label(width, height)}")
    need.parts["metric networks"] = nets
    need.total += nets
    fixes = [(f"--res {_res_label(sw, sh)}", gen_need(arch, sw, sh, dtype_bytes=b, cuda=device.type == "cuda"))
             for sw, sh in _smaller(width, height)]
    refuse_if_over(need, device, fixes)


def summary(arch: Arch, dtype_bytes: int = 2, device_type: str = "cuda") -> list[str]:
    """Lines for `clear model info`: the estimated peak of the main commands on one GPU."""
    cuda = device_type == "cuda"
    lines = []
    for side, name in ((1024, "1k"), (2048, "2k"), (4096, "4k"), (8192, "8k")):
        plain = gen_need(arch, side, side, dtype_bytes=dtype_bytes, cuda=cuda)
        off = gen_need(arch, side, side, dtype_bytes=dtype_bytes, cuda=cuda, offload=True)
        lines.append(f"gen --res {name:<3}      ~{plain.total / GiB:6.1f} GiB  (--offload ~{off.total / GiB:.1f} GiB)")
    for ckpt in (True, False):
        n = distill_need(arch, 1024, micro_batch=1, checkpointing=ckpt, optimizer="prodigy", mixed_precision="bf16",
                         attn_layers=(arch.n_single + 3) // 4, cuda=cuda)
        lines.append(f"distill 1024^2    ~{n.total / GiB:6.1f} GiB  (one GPU, micro batch 1, Prodigy, "
                     f"{'with' if ckpt else 'no'} gradient checkpointing)")
    return lines
