"""Text key padding: a [batch, text_len] bool of valid text keys (Qwen-Image's `encoder_hidden_states_mask`,
Chroma's T5 padding), merged with CLEAR's rule.

The rule with padding: a padded text key is seen by no query; everything else is CLEAR's rule unchanged (a text
query, padded or not, sees every valid text key and every image key; an image query sees the valid text keys, its
circle and the pooled keys). Image keys are never padded, so no query row is ever empty.

Kernels that take the mask natively (`reference`, the exact shortcut, `flex` through its mask_mod, the CPU band
path of `tiled`) apply it in place. The others (`tiled`'s differentiable path, `triton`) run through `compacted`:
the batch is split into groups whose masks agree, each group's valid text keys are gathered in front of its image
tokens and the kernel runs unchanged with that shorter text length (so padding also costs no work); text queries
attend densely with the mask in one SDPA call. Exact, differentiable, one kernel call per distinct mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from clear_cli.attention.geometry import default_scale
from clear_cli.attention.tracing import compiling


def check_text_mask(text_mask: torch.Tensor | None, batch: int, text_len: int,
                    device: torch.device) -> torch.Tensor | None:
    """The mask as a bool tensor on `device`, or None when it masks nothing. ValueError names the shapes."""
    if text_mask is None:
        return None
    if not isinstance(text_mask, torch.Tensor) or text_mask.dim() != 2 or \
            tuple(text_mask.shape) != (int(batch), int(text_len)):
        shape = tuple(text_mask.shape) if isinstance(text_mask, torch.Tensor) else type(text_mask).__name__
        raise ValueError(f"text_mask must be a [batch, text_len] = [{batch}, {text_len}] bool of valid text keys, "
                         f"got {shape}")
    m = text_mask.to(device=device, dtype=torch.bool)
    if text_len == 0 or (not compiling() and bool(m.all())):
        return None
    return m


def key_mask(text_mask: torch.Tensor, n_after: int) -> torch.Tensor:
    """[B, 1, 1, T + n_after] bool key mask: the text mask, then `n_after` always-valid keys."""
    ones = torch.ones(text_mask.shape[0], n_after, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask, ones], 1)[:, None, None, :]


def text_query_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_len: int, text_mask: torch.Tensor,
                      scale: float | None) -> torch.Tensor:
    """Text queries over every valid key (dense, one SDPA): [B, heads, T, D]."""
    t = text_len
    return F.scaled_dot_product_attention(q[:, :, :t], k, v, attn_mask=key_mask(text_mask, k.shape[2] - t),
                                          scale=default_scale(q.shape[-1], scale))


def mask_groups(text_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(batch indices, valid text indices)] per distinct mask row, in first-seen order."""
    rows = text_mask.cpu()
    seen: dict[bytes, list[int]] = {}
    for i in range(rows.shape[0]):
        seen.setdefault(rows[i].numpy().tobytes(), []).append(i)
    dev = text_mask.device
    return [(torch.tensor(ix, device=dev), torch.nonzero(rows[ix[0]]).flatten().to(dev)) for ix in seen.values()]


def compacted(run: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              text_len: int, text_mask: torch.Tensor, scale: float | None = None, **kw) -> torch.Tensor:
    """Run a kernel that takes no text mask: valid text keys gathered per group of equal masks (module docstring).
    `run` has `clear_attention`'s keyword contract (text_len, grid, window, down_factor, down_weight, scale)."""
    t = text_len
    o_text = text_query_output(q, k, v, t, text_mask, scale)
    parts, order = [], []
    for rows, valid in mask_groups(text_mask):
        sel = lambda x: torch.cat([x[rows][:, :, valid], x[rows][:, :, t:]], 2)  # noqa: E731
        o = run(sel(q), sel(k), sel(v), text_len=int(valid.numel()), scale=scale, **kw)
        parts.append(o[:, :, valid.numel():])
        order.append(rows)
    o_img = torch.cat(parts, 0)
    perm = torch.cat(order)
    if parts and not torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
        o_img = o_img.index_select(0, torch.argsort(perm))
    return torch.cat([o_text, o_img], 2)
