"""Plans built outside the torch.compile graph: how the kernels stay traceable with `fullgraph=True`.

A kernel's index tensors and block masks depend only on the geometry (grid, text length, window, factor, layout,
device), and building them needs Python control flow on tensor values (`int(x.sum())`, caches). Inside a graph
that would break it. `outside_graph(builder)` marks a builder whose arguments are plain Python values:

- called eagerly, it is a plain call (the builder keeps its own cache);
- traced by dynamo, dynamo runs it *at trace time* on the constant arguments and bakes the result into the graph
  as constants (`torch.compiler.assume_constant_result`): no graph break, no guard on the tensors. The geometry
  reaches the kernel as Python values that dynamo guards already (shapes, the call's grid), so a new geometry
  recompiles and calls the builder again.

Results may be tensors, tuples of tensors and Python values, or plain objects holding them, but not objects that
dynamo must inspect as such (a `BlockMask` is rebuilt in the graph from its tensors: see `flex`). Builders must
not mutate anything the graph reads later. The result travels boxed in a tuple: dynamo names a bare tensor
constant after the function, so two calls in one graph (a tiled kernel's chunks, or a whole-model compile with 57
attention calls) would collide; a tuple gets a fresh name per call.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def outside_graph(builder: F) -> F:
    """Mark `builder` (a function of hashable Python arguments) as run eagerly even while dynamo traces."""
    @functools.wraps(builder)
    def boxed(*args, **kwargs):
        return (builder(*args, **kwargs),)

    constant = torch.compiler.assume_constant_result(boxed)

    @functools.wraps(builder)
    def call(*args, **kwargs):
        return constant(*args, **kwargs)[0]

    return call  # type: ignore[return-value]


def compiling() -> bool:
    """True while dynamo traces (the kernels then skip eager-only shortcuts: scratch buffers, warnings filters)."""
    return bool(torch.compiler.is_compiling())
