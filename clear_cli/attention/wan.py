"""3-D CLEAR in Wan 2.x (diffusers' WanTransformer3DModel): the self-attention processor and linearize/unlinearize.

    from clear_cli.attention.wan import linearize_wan, unlinearize_wan
    linearize_wan(pipe_or_transformer, window=16, time_window=4)   # every self-attention (attn1) runs 3-D CLEAR
    unlinearize_wan(pipe_or_transformer)                           # the stock processors are back

(`clear_cli.linearize(model, window=r, time_window=r_t)` routes here for a Wan model.) Only the blocks'
self-attention (`attn1`) changes: Wan's self-attention holds video tokens only (no text), frame-major as the
transformer flattens its patchified latent; the cross-attention to the text (and I2V image context, `attn2`) keeps
its stock processor. The token grid comes from the latent each forward receives: a forward pre-hook on the
transformer reads hidden_states [B, C, F, H, W] and the patch size (p_t, p_h, p_w) -> (F/p_t, H/p_h, W/p_w), so
any clip length and size works without configuration. The processor computes q/k/v, RMSNorm and the 3-D RoPE as
the stock one does, then `clear_video_attention`; with a window that covers the whole volume it is stock attention.

`clear_cli.attention.adapters.wan.WanAdapter` is how the rest of `clear` reaches this module (the adapter registry).
`ntk_factor` rebuilds the 3-D RoPE tables with theta x factor on every axis (NTK, as the 2-D path does for FLUX)
and `unlinearize_wan` puts the stock tables back.
Not yet here: teacher copies for distillation, trainable-parameter selection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clear_cli.attention.video_geometry import check_video_geometry
from clear_cli.attention.video_kernels import VIDEO_BACKENDS, clear_video_attention

STATE_ATTR = "_clear_wan_state"


def wan_transformer(model) -> nn.Module | None:
    """The WanTransformer3DModel of a pipeline or the model itself (unwrapping DDP / compile wrappers), else None."""
    module = model if isinstance(model, nn.Module) else getattr(model, "transformer", None)
    while isinstance(module, nn.Module) and type(module).__name__ != "WanTransformer3DModel":
        inner = module._modules.get("_orig_mod")
        if inner is None:
            inner = module._modules.get("module")
        if inner is None:
            return None
        module = inner
    return module if isinstance(module, nn.Module) else None


def is_wan(model) -> bool:
    return wan_transformer(model) is not None


def self_attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """Every block's self-attention (`attn1`), in block order."""
    return [blk.attn1 for blk in transformer.blocks]


@dataclass
class WanClearState:
    """What every processor of one transformer shares: the settings and the token grid of the current forward."""

    window: int
    time_window: int
    backend: str
    originals: list = field(default_factory=list)
    grid: tuple[int, int, int] | None = None
    hook: object = None
    rope: tuple | None = None   # the stock (freqs_cos, freqs_sin) while an NTK factor is applied
    ntk_factor: float | None = None


def _rope_tables(rope: nn.Module, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's per-axis RoPE tables (frames, rows, columns) rebuilt with theta x factor on every axis."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    cos, sin = [], []
    for dim in (rope.t_dim, rope.h_dim, rope.w_dim):
        c, s = get_1d_rotary_pos_embed(dim, rope.max_seq_len, 10000.0, use_real=True, repeat_interleave_real=True,
                                       freqs_dtype=rope.freqs_cos.dtype, ntk_factor=float(factor))
        cos.append(c)
        sin.append(s)
    dev = rope.freqs_cos.device
    return torch.cat(cos, dim=1).to(dev), torch.cat(sin, dim=1).to(dev)


def _set_rope(transformer: nn.Module, state: WanClearState, ntk_factor: float | None) -> None:
    rope = transformer.rope
    if state.rope is not None:   # back to the stock tables first
        rope.freqs_cos, rope.freqs_sin = state.rope
        state.rope = None
    state.ntk_factor = None
    if ntk_factor is not None:
        if not ntk_factor > 0:
            raise ValueError(f"ntk_factor must be > 0, got {ntk_factor!r}")
        state.rope = (rope.freqs_cos, rope.freqs_sin)
        rope.freqs_cos, rope.freqs_sin = _rope_tables(rope, ntk_factor)
        state.ntk_factor = float(ntk_factor)


def _grid_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    x = kwargs.get("hidden_states", args[0] if args else None)
    state: WanClearState = getattr(module, STATE_ATTR)
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        state.grid = None
        return
    p_t, p_h, p_w = module.config.patch_size
    state.grid = (x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE on [B, N, heads, D]: pairs (x[2i], x[2i+1]) rotated by the angle of frequency i (the freqs carry
    each angle twice, interleaved)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


class ClearWanAttnProcessor:
    """Wan self-attention with 3-D CLEAR attention (see the module docstring)."""

    def __init__(self, state: WanClearState):
        self._state = state

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        st = self._state
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the CLEAR Wan processor serves self-attention (attn1) only, without a mask")
        grid = st.grid
        n = hidden_states.shape[1]
        if grid is None or grid[0] * grid[1] * grid[2] != n:
            raise ValueError(f"CLEAR Wan attention: no token grid for {n} tokens (the grid comes from the "
                             "transformer's forward; call the WanTransformer3DModel, not its blocks)")
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))      # [B, N, heads, D]
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        out = clear_video_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), grid=grid,
                                    window=st.window, time_window=st.time_window, backend=st.backend)
        out = out.transpose(1, 2).flatten(2, 3).type_as(q)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def linearize_wan(model, window: int = 16, time_window: int = 4, backend: str = "auto",
                  ntk_factor: float | None = None):
    """Install 3-D CLEAR in every self-attention of a Wan transformer (or pipeline); return `model`. Calling it again
    replaces the settings. window: spatial radius in tokens (16 px each at Wan's VAE /8 and patch 2); time_window:
    temporal radius in latent frames (4 pixel frames each; 0 = the same frame only); ntk_factor: RoPE theta x
    factor on every axis (None: stock RoPE)."""
    transformer = wan_transformer(model)
    if transformer is None:
        raise ValueError(f"expected a Wan pipeline or WanTransformer3DModel, got {type(model).__name__}")
    check_video_geometry((1, 1, 1), window, time_window)
    if backend not in VIDEO_BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {', '.join(VIDEO_BACKENDS)}")
    state: WanClearState | None = getattr(transformer, STATE_ATTR, None)
    modules = self_attention_modules(transformer)
    if state is None:
        state = WanClearState(int(window), int(time_window), backend, originals=[m.processor for m in modules])
        state.hook = transformer.register_forward_pre_hook(_grid_pre_hook, with_kwargs=True)
        setattr(transformer, STATE_ATTR, state)
    state.window, state.time_window, state.backend = int(window), int(time_window), backend
    for attn in modules:
        if not isinstance(attn.processor, ClearWanAttnProcessor) or attn.processor._state is not state:
            attn.set_processor(ClearWanAttnProcessor(state))
    _set_rope(transformer, state, ntk_factor)
    return model


def unlinearize_wan(model):
    """Restore the processors installed before `linearize_wan`; a no-op on a stock model."""
    transformer = wan_transformer(model)
    state: WanClearState | None = getattr(transformer, STATE_ATTR, None) if transformer is not None else None
    if state is None:
        return model
    for attn, original in zip(self_attention_modules(transformer), state.originals):
        attn.set_processor(original)
    _set_rope(transformer, state, None)
    state.hook.remove()
    delattr(transformer, STATE_ATTR)
    return model


def is_wan_linearized(model) -> bool:
    t = wan_transformer(model)
    return t is not None and getattr(t, STATE_ATTR, None) is not None
