"""The compiled step: `--compile auto|on|off`, one function for gen, eval, synth and distill.

FLUX is two block classes repeated (19 double-stream and 38 single-stream blocks). Regional compilation (diffusers'
`compile_repeated_blocks`) compiles each class once -- torch.compile of the block, whole graph, static shapes -- and
every block of the class runs that code, so a new resolution costs two compiles, not 57. The CLEAR processor traces
into the same graph without breaks: its block plans and masks are built outside the graph and enter it as constants
(`clear_cli.attention.tracing`), so each shape compiles once and later calls of that shape run without recompiling.

- `on`: every call of the transformer runs the compiled blocks (any device; on CPU, inductor's C++ backend).
- `auto`: on CUDA, calls whose image tokens reach `AUTO_MIN_IMAGE_TOKENS` (2K, 128 x 128 tokens) run compiled,
  smaller ones eager: a 1K step (~0.3 s on an H200) does not repay a compile of tens of seconds. On CPU: off.
  A compile that fails under `auto` is said once and the blocks run eager from then on.
- `off`: eager; also undoes an earlier `compile_transformer` on the same model.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from clear_cli.errors import ClearError, UsageError

COMPILE_MODES = ("auto", "on", "off")
AUTO_MIN_IMAGE_TOKENS = 128 * 128   # 2048^2 pixels: 16 px per token
RECOMPILE_LIMIT = 64                # shapes x processors (full / CLEAR, settings) per block class in one process
STATE_ATTR = "_clear_compile"


def check_compile(value: str) -> str:
    """The mode, or UsageError (exit 2) naming the choices."""
    mode = str(value).strip().lower()
    if mode not in COMPILE_MODES:
        raise UsageError(f"--compile {value!r} is not one of {', '.join(COMPILE_MODES)}",
                         "auto compiles the FLUX blocks on CUDA from 2K up")
    return mode


@dataclass
class CompileState:
    """What `compile_transformer` installed on one transformer (stored as `transformer._clear_compile`)."""

    mode: str
    min_tokens: int
    blocks: list[nn.Module]
    active: bool = False          # this call runs compiled (set per call by the pre-hook)
    failed: str | None = None     # under auto: why compiling failed (the blocks then run eager)
    calls: dict = field(default_factory=lambda: {"compiled": 0, "eager": 0})
    hook: object = None


def _transformer(model) -> nn.Module:
    module = model if isinstance(model, nn.Module) else getattr(model, "transformer", None)
    if not isinstance(module, nn.Module) or not getattr(module, "_repeated_blocks", None):
        raise ValueError(f"expected a FluxPipeline or a diffusers transformer with repeated blocks, "
                         f"got {type(model).__name__}")
    return module


def _device_type(tr: nn.Module) -> str:
    return next((p.device.type for p in tr.parameters() if p.device.type != "meta"), "cpu")


def _raise_recompile_limit(n: int) -> None:
    import torch._dynamo as dynamo
    for name in ("recompile_limit", "cache_size_limit"):   # the name changed in torch 2.6
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), n))


def _compile_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import TorchDynamoException
        errors.append(TorchDynamoException)
    except ImportError:  # pragma: no cover
        pass
    try:
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _tokens_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    state: CompileState | None = getattr(module, STATE_ATTR, None)
    if state is None:
        return
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    n = int(hidden.shape[1]) if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else 0
    state.active = state.failed is None and n >= state.min_tokens
    state.calls["compiled" if state.active else "eager"] += 1


def _gate(block: nn.Module, compiled: Callable, state: CompileState, errors: tuple, say: Callable[[str], None]):
    def call(*args, **kwargs):
        if state.active:
            try:
                return compiled(*args, **kwargs)
            except errors as e:   # raised while compiling, before the block ran: running it eager is safe
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                if state.mode == "on":
                    raise ClearError(f"torch.compile of the {type(block).__name__} blocks failed ({msg})",
                                     "run with --compile off") from e
                state.failed, state.active = msg, False
                say(f"torch.compile failed ({msg}); the blocks run eager (--compile off hides this)")
        return block._call_impl(*args, **kwargs)

    return call


def compile_transformer(model, mode: str = "auto", *, backend: str = "inductor", fullgraph: bool = True,
                        min_tokens: int | None = None, warn: Callable[[str], None] | None = None
                        ) -> CompileState | None:
    """Apply `--compile` to a FluxPipeline or FLUX transformer; return the installed state (None: nothing compiled).

    Idempotent: a later call replaces the previous one (`off` removes it). `min_tokens` overrides auto's threshold;
    `backend` / `fullgraph` go to torch.compile (tests use "eager" / "aot_eager" to check tracing alone); `warn`
    receives the one line said when compiling fails under auto (default: `warnings.warn`).
    """
    mode = check_compile(mode)
    tr = _transformer(model)
    uncompile_transformer(tr)
    if mode == "off" or (mode == "auto" and _device_type(tr) != "cuda"):
        return None
    say = warn or (lambda msg: warnings.warn(msg, stacklevel=3))
    _raise_recompile_limit(RECOMPILE_LIMIT)
    # dynamic=False: one graph per shape; a plan baked into the graph as a constant must not serve another shape
    tr.compile_repeated_blocks(fullgraph=fullgraph, dynamic=False, backend=backend)
    names = set(tr._repeated_blocks)
    blocks = [m for m in tr.modules() if type(m).__name__ in names]
    threshold = 0 if mode == "on" else (AUTO_MIN_IMAGE_TOKENS if min_tokens is None else int(min_tokens))
    state = CompileState(mode=mode, min_tokens=threshold, blocks=blocks)
    errors = _compile_errors()
    for b in blocks:
        b._compiled_call_impl = _gate(b, b._compiled_call_impl, state, errors, say)
    state.hook = tr.register_forward_pre_hook(_tokens_pre_hook, with_kwargs=True)
    setattr(tr, STATE_ATTR, state)
    return state


@contextlib.contextmanager
def compiled(model, mode: str = "auto", *, warn: Callable[[str], None] | None = None
             ) -> Iterator[CompileState | None]:
    """`compile_transformer` for the duration of a job; the model leaves as it came (a caller's own compile
    state, with the same mode, is kept as is)."""
    tr = _transformer(model)
    mode = check_compile(mode)
    prev: CompileState | None = getattr(tr, STATE_ATTR, None)
    if prev is not None and prev.mode == mode:
        yield prev
        return
    state = compile_transformer(tr, mode, warn=warn)
    try:
        yield state
    finally:
        if prev is None:
            uncompile_transformer(tr)
        else:
            compile_transformer(tr, prev.mode, min_tokens=prev.min_tokens, warn=warn)


def uncompile_transformer(model) -> None:
    """Remove what `compile_transformer` installed (the blocks run eager again); a no-op otherwise."""
    tr = _transformer(model)
    state: CompileState | None = getattr(tr, STATE_ATTR, None)
    if state is None:
        return
    for b in state.blocks:
        b._compiled_call_impl = None
    state.hook.remove()
    delattr(tr, STATE_ATTR)


def describe(state: CompileState | None) -> str:
    """One line for logs: what runs compiled."""
    if state is None:
        return "compile: off (eager)"
    if state.mode == "on":
        return f"compile: on ({len(state.blocks)} blocks, regional)"
    side = int(state.min_tokens ** 0.5)
    return f"compile: auto (calls from {state.min_tokens} image tokens, {side}x{side} = {side * 16} px, compiled)"
