"""Per-model and per-call state that the CLEAR processors of one transformer share.

A forward pre-hook on the transformer reads each call's geometry (text length from `txt_ids` /
`encoder_hidden_states`, the token layout from `img_ids`: `layout.read_layout`, the target grid and any reference
images) and hands it to every processor through `joint_attention_kwargs["clear_call"]`. Passing it as an argument, rather than through a global, means one model
serves any resolution, aspect ratio, batch and prompt length, and that gradient checkpointing recomputes a block
with the geometry and mode (teacher / student, capture) of the pass that built it, even if other passes ran since.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from clear_cli.attention.layout import TokenLayout, read_layout, single
from clear_cli.flux import TRAIN_SEQ_LEN as FLUX_TRAIN_SEQ_LEN  # FLUX.1-dev at 1024^2: 4096 image + 512 text tokens

CALL_KEY = "clear_call"  # the joint_attention_kwargs entry the processors receive


@dataclass
class ClearSettings:
    """What `linearize` was asked for (replaced wholesale by the next `linearize`)."""

    window: int = 16
    down_factor: int = 1
    backend: str = "auto"
    proportional_attention: bool = False
    train_seq_len: int = FLUX_TRAIN_SEQ_LEN
    log_scale_factor: float = 1.0
    ntk_factor: float | None = None
    reference_rule: str = "global"  # between a target and its reference images (layout.REFERENCE_RULES)


def proportional_scale(seq_len: int, train_seq_len: int, head_dim: int, log_scale_factor: float = 1.0) -> float:
    """Softmax scale sqrt(log(c N) / log(c N_train) / d_head), N = the joint length T + H*W (DESIGN.md §2).

    c = 1 is the plain rule; the authors' down-sampled checkpoints use c = 10.
    """
    c = float(log_scale_factor)
    if seq_len < 1 or train_seq_len < 1 or c * train_seq_len <= 1 or c * seq_len <= 1:
        raise ValueError(f"proportional attention needs c*N > 1 and c*N_train > 1, got N={seq_len}, "
                         f"N_train={train_seq_len}, c={c}")
    return math.sqrt(math.log(c * seq_len) / math.log(c * train_seq_len) / head_dim)


class Capture:
    """Attention outputs recorded during the passes that ran while a `capture_attention` block was open."""

    def __init__(self, layers: frozenset[int]):
        self.layers = layers
        self.outputs: dict[int, torch.Tensor] = {}


@dataclass
class CallContext:
    """One transformer call: its geometry and the mode it runs in (a snapshot, stable under recomputation)."""

    text_len: int
    grid: tuple[int, int]
    teacher: bool = False
    capture: Capture | None = None
    recorded: set[int] = field(default_factory=set)  # layers already recorded in this call (recompute skips them)
    layout: TokenLayout | None = None  # every image of the call; None = text then `grid` alone

    def __post_init__(self):
        if self.layout is None:
            self.layout = single(self.text_len, self.grid)

    @property
    def seq_len(self) -> int:
        return self.layout.seq_len


@dataclass
class ClearState:
    """Everything `linearize` attached to one transformer (stored as `transformer._clear_state`)."""

    settings: ClearSettings
    originals: list[Any]  # the processors that were installed before, in processor order
    teacher_depth: int = 0  # > 0 inside `teacher_mode`
    capture: Capture | None = None
    signature: inspect.Signature | None = None
    last_call: CallContext | None = None  # for models whose blocks drop joint_attention_kwargs (FluxControlNetModel)


def grid_from_img_ids(img_ids: torch.Tensor, n_image: int | None = None) -> tuple[int, int]:
    """The (H, W) token grid of FLUX image ids of one image (columns 1, 2 = row, column), laid out row-major.

    Rows and columns need only increase (positions may be offset or scaled), but every row must hold the same
    columns in the same order. ValueError, naming the numbers, when they are not an H x W row-major grid, hold
    several images (use `layout.read_layout`), or their count differs from `n_image`.
    """
    lay = read_layout(img_ids, 0, n_image)
    if lay.references:
        raise ValueError(f"img_ids hold {len(lay.grids)} images ({lay.describe()}): read them with "
                         "clear_cli.attention.layout.read_layout")
    return lay.target.shape


def _bound(module: torch.nn.Module, state: ClearState, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    if state.signature is None:
        state.signature = inspect.signature(module.forward)
    return state.signature.bind_partial(*args, **kwargs)


def geometry_pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook (with_kwargs): read the call's text length and grid, pass a CallContext to the processors.

    A module-level function reading `module._clear_state`, so a deep copy of the model carries its own state.
    """
    state: ClearState | None = getattr(module, "_clear_state", None)
    if state is None:
        return None
    bound = _bound(module, state, args, kwargs)
    a = bound.arguments
    img_ids, txt_ids = a.get("img_ids"), a.get("txt_ids")
    hidden, enc = a.get("hidden_states"), a.get("encoder_hidden_states")
    if img_ids is None:
        raise ValueError("the CLEAR transformer was called without img_ids: it reads the token grid from them")
    n_image = int(hidden.shape[1]) if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None
    if isinstance(enc, torch.Tensor):
        text_len = int(enc.shape[1])
        if txt_ids is not None:
            t_ids = int(txt_ids.shape[-2])
            if t_ids != text_len:
                raise ValueError(f"txt_ids hold {t_ids} positions but encoder_hidden_states has {text_len} tokens")
    elif txt_ids is not None:
        text_len = int(txt_ids.shape[-2])
    else:
        raise ValueError("the CLEAR transformer was called without encoder_hidden_states or txt_ids: "
                         "it needs the text length")
    layout = read_layout(img_ids, text_len, n_image)
    grid = layout.target.shape
    call = CallContext(text_len=text_len, grid=grid, teacher=state.teacher_depth > 0, capture=state.capture,
                       layout=layout)
    # For models whose blocks drop joint_attention_kwargs (FluxControlNetModel); no capture: holds no graph.
    state.last_call = CallContext(text_len=text_len, grid=grid, teacher=call.teacher, layout=layout)
    jak = dict(a.get("joint_attention_kwargs") or {})  # a copy: the pipeline's dict may be shared (ControlNet)
    jak[CALL_KEY] = call
    # Keep the caller's layout: decorators such as diffusers' apply_lora_scale read joint_attention_kwargs by keyword.
    names = list(state.signature.parameters)
    pos = names.index("joint_attention_kwargs") if "joint_attention_kwargs" in names else len(args)
    if pos < len(args):
        args = (*args[:pos], jak, *args[pos + 1:])
    else:
        kwargs = {**kwargs, "joint_attention_kwargs": jak}
    return args, kwargs
