"""`linearize` / `unlinearize` a diffusion transformer of any family with a model adapter (FLUX first), and the hooks distillation uses (teacher pass, attention capture).

    import clear_cli
    pipe = clear_cli.load_pipeline("tiny")
    clear_cli.linearize(pipe, window=16)          # every FluxAttention now runs CLEAR attention
    image = pipe("a red circle").images[0]        # any resolution / aspect ratio / batch / prompt length
    clear_cli.unlinearize(pipe)                   # the stock processors (and RoPE) are back

Distillation (DESIGN.md §4) keeps one transformer: `linearize(..., keep_teacher=True)` stores frozen copies of the
original image-branch projections in the processors; inside `teacher_mode(model)` a pass computes the original
model; `capture_attention(model, layers)` records the selected processors' outputs for the attention loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from clear_cli.attention.adapters import ModelAdapter, adapter_for, families, video_families
from clear_cli.attention.context import (
    FLUX_TRAIN_SEQ_LEN, Capture, ClearSettings, ClearState, geometry_pre_hook, proportional_scale,
)
from clear_cli.attention.layout import KERNEL_RULE, REFERENCE_RULES
from clear_cli.attention.processors import ClearProcessorBase

__all__ = [
    "linearize", "unlinearize", "is_linearized", "teacher_mode", "capture_attention", "attention_modules",
    "clear_processors", "default_attention_layers", "trainable_attention_parameters", "proportional_scale",
    "model_adapter",
]

STATE_ATTR = "_clear_state"


SUPPORTED = ("FluxPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline, FluxControlNetPipeline "
             "(and its img2img / inpaint variants), FluxKontextPipeline, or a FLUX "
             "transformer with FluxAttention modules (FluxTransformer2DModel, FluxControlNetModel)")


def _unwrap(module):
    # Wrappers (DDP / FSDP `.module`, torch.compile `._orig_mod`) call the inner model, which holds the hook.
    while isinstance(module, nn.Module):
        inner = module._modules.get("_orig_mod")
        if inner is None and "pos_embed" not in module._modules:
            inner = module._modules.get("module")
        if inner is None:
            break
        module = inner
    return module


def _transformer(model) -> nn.Module:
    """The transformer of a pipeline, or the model itself when it holds FluxAttention modules."""
    module = _unwrap(model if isinstance(model, nn.Module) else getattr(model, "transformer", None))
    if not isinstance(module, nn.Module) or not attention_modules(module):
        found = type(model).__name__
        if type(model).__name__ == "FluxPriorReduxPipeline":
            raise ValueError("linearize found a FluxPriorReduxPipeline, which has no transformer (it turns an image "
                             "into prompt embeddings): linearize the FluxPipeline you pass its output to")
        if not isinstance(model, nn.Module):
            inner = getattr(model, "transformer", None)
            found += f" whose transformer is {type(inner).__name__}" if inner is not None else " without a transformer"
        raise ValueError(f"linearize found a {found} (no FluxAttention modules); it supports {SUPPORTED}; other "
                         f"families with a model adapter: {', '.join(f for f in families() if f != 'flux')}; video: "
                         f"{', '.join(video_families())}")
    return module


def model_adapter(model) -> ModelAdapter:
    """The adapter of the model's family (attention/adapters/): how CLEAR reads and replaces its attention."""
    return adapter_for(_transformer(model))


def _controlnets(model) -> list[nn.Module]:
    """The ControlNet(s) of a pipeline that hold FluxAttention (linearized with its transformer: same cost)."""
    if isinstance(model, nn.Module):
        return []
    cn = _unwrap(getattr(model, "controlnet", None))
    if not isinstance(cn, nn.Module):
        return []
    nets = list(cn.nets) if hasattr(cn, "nets") else [cn]  # FluxMultiControlNetModel holds several
    return [_unwrap(n) for n in nets if attention_modules(_unwrap(n))]


def attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """The attention modules CLEAR replaces, in processor order (FLUX: every FluxAttention, double blocks first,
    then single blocks, as registered; other families: their adapter's order)."""
    adapter = adapter_for(transformer)
    return adapter.attention_modules(transformer) if adapter is not None else []


def clear_processors(model) -> list[ClearProcessorBase]:
    """The installed CLEAR processors in order (index i = the i-th attention module)."""
    return [m.processor for m in attention_modules(_transformer(model))
            if isinstance(m.processor, ClearProcessorBase)]


def is_linearized(model) -> bool:
    transformer = _transformer(model)
    adapter = adapter_for(transformer)
    if adapter.video:
        return adapter.is_installed(transformer)
    return getattr(transformer, STATE_ATTR, None) is not None


def _settings(window: int, down_factor: int, backend: str, proportional_attention: bool,
              train_seq_len: int | None, ntk_factor: float | None, log_scale_factor: float | None,
              reference_rule: str = "global") -> ClearSettings:
    from clear_cli.attention import BACKENDS

    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValueError(f"window must be an integer >= 1 (radius in tokens), got {window!r}")
    if isinstance(down_factor, bool) or int(down_factor) != down_factor or down_factor < 1:
        raise ValueError(f"down_factor must be an integer >= 1, got {down_factor!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    n_train = FLUX_TRAIN_SEQ_LEN if train_seq_len is None else int(train_seq_len)
    if n_train < 2:
        raise ValueError(f"train_seq_len must be >= 2 (text + image tokens at training resolution), "
                         f"got {train_seq_len}")
    if ntk_factor is not None and not ntk_factor > 0:
        raise ValueError(f"ntk_factor must be > 0, got {ntk_factor!r}")
    # The authors' down-sampled checkpoints use log(10 N) in the proportional scale (DESIGN.md §2).
    c = (10.0 if down_factor > 1 else 1.0) if log_scale_factor is None else float(log_scale_factor)
    if not c > 0:
        raise ValueError(f"log_scale_factor must be > 0, got {log_scale_factor!r}")
    if reference_rule not in REFERENCE_RULES:
        raise ValueError(f"reference_rule {reference_rule!r} is not one of {', '.join(REFERENCE_RULES)}")
    if reference_rule != KERNEL_RULE and (backend != "reference" or down_factor > 1):
        raise ValueError(f"reference_rule {reference_rule!r} is for measuring the choice: it runs on "
                         f"backend='reference' with down_factor 1 only; use reference_rule='{KERNEL_RULE}'")
    return ClearSettings(reference_rule=reference_rule, window=int(window), down_factor=int(down_factor), backend=backend,
                         proportional_attention=bool(proportional_attention), train_seq_len=n_train,
                         log_scale_factor=c, ntk_factor=None if ntk_factor is None else float(ntk_factor))


def linearize(model, window: int = 16, down_factor: int = 1, backend: str = "auto", *,
              proportional_attention: bool = False, train_seq_len: int | None = None, ntk_factor: float | None = None,
              log_scale_factor: float | None = None, keep_teacher: bool = False, reference_rule: str = "global",
              time_window: int | None = None):
    """Install CLEAR processors in every FluxAttention of `model` (a FluxPipeline or FLUX transformer); return it.

    window: circle radius in image tokens (16 px each for FLUX); down_factor: f > 1 adds (H/f)(W/f) pooled keys with
    learnable f x f weights (`...attn.processor.spatial_weight`); backend: auto|reference|tiled|flex|triton
    (checked against the device at the first call: `kernels.check_backend`).
    proportional_attention: scale sqrt(log(cN)/log(cN_train)/d_head) with N the joint length, N_train =
    `train_seq_len` (default FLUX's 64*64 + 512), c = `log_scale_factor` (default 10 when down_factor > 1, as the
    authors' pooled checkpoints, else 1). ntk_factor: RoPE theta x factor on every axis (authors: 10 at high res).
    keep_teacher: keep frozen copies of the current image-branch projections for `teacher_mode` (distillation).
    reference_rule: how a target sees its reference images (Kontext; `layout.REFERENCE_RULES`): `global` (every
    backend) or, to measure the choice, `shared` / `own` (dense mask, small sizes only).
    A pipeline's ControlNet (FluxControlNetPipeline) is linearized with the same settings.
    Calling it again replaces every setting; pooling weights survive when f is unchanged, teacher copies always.
    time_window: for a video family (`adapter.video`, Wan: adapters/wan.py), the temporal radius in latent frames
    (0 = same frame); required there, refused on an image model.
    """
    transformer = _transformer(model)
    adapter = adapter_for(transformer)
    if _video_model(adapter, time_window, down_factor, proportional_attention, keep_teacher):
        adapter.install(transformer, window, time_window, backend, ntk_factor)
        return model
    if train_seq_len is None:
        train_seq_len = adapter_for(transformer).facts.train_seq_len
    settings = _settings(window, down_factor, backend, proportional_attention, train_seq_len, ntk_factor,
                         log_scale_factor, reference_rule)
    for module in [transformer, *_controlnets(model)]:
        _install(module, settings, keep_teacher and module is transformer)  # teacher_mode is the transformer's
    return model


def _install(transformer: nn.Module, settings: ClearSettings, keep_teacher: bool) -> None:
    adapter = adapter_for(transformer)
    modules = adapter.attention_modules(transformer)
    state: ClearState | None = getattr(transformer, STATE_ATTR, None)
    if state is None:
        state = ClearState(settings=settings, originals=[m.processor for m in modules], adapter=adapter)
        transformer.register_forward_pre_hook(geometry_pre_hook, with_kwargs=True)
        setattr(transformer, STATE_ATTR, state)
    state.settings = settings
    state.adapter = adapter
    for i, attn in enumerate(modules):
        proc = attn.processor
        if not isinstance(proc, ClearProcessorBase) or proc._state is not state:
            if i >= len(state.originals):
                state.originals.append(proc)
            elif not isinstance(proc, ClearProcessorBase):
                state.originals[i] = proc  # someone installed another processor since: that is the one to restore
            proc = adapter.make_processor(i, attn, state)
            attn.set_processor(proc)  # diffusers registers a Module processor as the submodule `processor`
        proc.configure(attn)
        if keep_teacher:
            proc.keep_teacher(attn)
        else:
            proc.drop_teacher()
    if settings.ntk_factor is None:
        adapter.restore_rope(transformer)
    else:
        adapter.scale_rope(transformer, settings.ntk_factor)


def _video_model(adapter: ModelAdapter, time_window, down_factor, proportional_attention, keep_teacher) -> bool:
    """True for a video family (after checking the options it takes); ValueError for time_window on an image one."""
    if not adapter.video:
        if time_window is not None:
            raise ValueError("time_window is for video models (Wan); an image model takes window alone")
        return False
    if time_window is None:
        raise ValueError("a video model needs time_window too (temporal radius in latent frames; 0 = same frame), "
                         "e.g. linearize(pipe, window=16, time_window=4)")
    if down_factor != 1 or proportional_attention or keep_teacher:
        raise ValueError(f"{adapter.family} takes window, time_window, backend and ntk_factor only so far (no "
                         "down_factor, proportional attention or keep_teacher)")
    return True


def unlinearize(model):
    """Restore the processors (and RoPE) that were installed before `linearize`; a no-op on a stock model."""
    transformer = _transformer(model)
    adapter = adapter_for(transformer)
    if adapter.video:
        adapter.uninstall(transformer)
        return model
    for module in [_transformer(model), *_controlnets(model)]:
        _uninstall(module)
    return model


def _uninstall(transformer: nn.Module) -> None:
    state: ClearState | None = getattr(transformer, STATE_ATTR, None)
    if state is None:
        return
    for attn, original in zip(attention_modules(transformer), state.originals):
        if isinstance(attn.processor, ClearProcessorBase):
            attn.set_processor(original)
    _remove_hook(transformer)
    adapter_for(transformer).restore_rope(transformer)
    delattr(transformer, STATE_ATTR)


def _remove_hook(transformer: nn.Module) -> None:
    # Found by value, not through a stored handle: a deep copy of the model copies the handle too, and removing
    # through it would remove the hook of the model it was copied from.
    for key, fn in list(transformer._forward_pre_hooks.items()):
        if fn is geometry_pre_hook:
            del transformer._forward_pre_hooks[key]
            transformer._forward_pre_hooks_with_kwargs.pop(key, None)


def _state(model) -> ClearState:
    state = getattr(_transformer(model), STATE_ATTR, None)
    if state is None:
        raise ValueError("the model is not linearized: call clear_cli.linearize(model, ...) first")
    return state


@contextlib.contextmanager
def teacher_mode(model) -> Iterator[None]:
    """Passes started inside compute the original model: frozen original projections, full attention.

    Needs `linearize(..., keep_teacher=True)`. The mode is fixed when a pass starts, so gradient checkpointing
    recomputes each block in the mode its pass ran in, whatever the mode is at backward time.
    """
    state = _state(model)
    missing = [p.index for p in clear_processors(model) if not p.has_teacher]
    if missing:
        raise ValueError(f"teacher_mode needs the original projections, which processors {missing[:5]} lack: "
                         "call linearize(..., keep_teacher=True) before training")
    state.teacher_depth += 1
    try:
        yield
    finally:
        state.teacher_depth -= 1


@contextlib.contextmanager
def capture_attention(model, layers: Iterable[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record the attention output of the selected processors (default: the authors' layers) during passes inside.

    Yields a dict {processor index: output}; the output is the processor's return before the block's gating:
    [batch, T + H*W, dim] for single blocks, and for double blocks the (text, image) outputs after to_add_out /
    to_out joined in the same [text, image] order. Tensors keep their graph (for the attention loss). A later pass
    inside the same block overwrites earlier entries.
    """
    state = _state(model)
    n = len(attention_modules(_transformer(model)))
    chosen = frozenset(default_attention_layers(model) if layers is None else (int(i) for i in layers))
    bad = sorted(i for i in chosen if not 0 <= i < n)
    if bad:
        raise ValueError(f"attention layers {bad} do not exist: this model has processors 0..{n - 1}")
    previous, state.capture = state.capture, Capture(chosen)
    try:
        yield state.capture.outputs
    finally:
        state.capture = previous


def default_attention_layers(model) -> list[int]:
    """The attention-loss layers of the model's family (its adapter). FLUX, the authors' rule (DESIGN.md §4):
    processor index % 4 == 0 among single-stream blocks, 20, 24, ..., 56 = single blocks 1, 5, ..., 37 of 19 double
    + 38 single. Small models may get none.
    """
    transformer = _transformer(model)
    adapter = adapter_for(transformer)
    return adapter.attention_loss_layers(adapter.attention_modules(transformer))


def trainable_attention_parameters(model, *, freeze_others: bool = False) -> dict[str, nn.Parameter]:
    """The parameters distillation trains (DESIGN.md §4), by state-dict name.

    Double blocks: image-branch to_q, to_k, to_v, to_out.0 (weight and bias); single blocks: to_q, to_k, to_v;
    plus every `processor.spatial_weight`. freeze_others: also set requires_grad so that only these train.
    """
    transformer = _transformer(model)
    adapter = adapter_for(transformer)
    wanted: set[int] = set()
    for attn in adapter.attention_modules(transformer):
        for proj in adapter.image_projections(attn):
            lin = attn.get_submodule(proj)
            lin = getattr(lin, "base_layer", lin)  # under a PEFT LoRA wrapper the weights sit in base_layer
            wanted.update(id(p) for p in lin.parameters(recurse=False))
        sw = getattr(attn.processor, "spatial_weight", None)
        if isinstance(sw, nn.Parameter):
            wanted.add(id(sw))
    chosen = {name: p for name, p in transformer.named_parameters() if id(p) in wanted}
    if freeze_others:
        for p in transformer.parameters():
            p.requires_grad_(id(p) in wanted)
    return chosen
