"""The token layout of one transformer call, as data: global tokens (text) and one or more image grids.

FLUX joins `[T text tokens][image tokens]`; the image tokens may hold several images, told apart by column 0 of
`img_ids` (0 for the image being denoised; FLUX Kontext appends its reference image with id 1, and the reference
may have another size than the target). Each image is a row-major grid read from its own ids (columns 1, 2).

The rule between a target and its references (`REFERENCE_RULES`, measured in BENCHMARKS.md "Kontext references"):
- `global` (what every backend runs): reference tokens are global, like text. Every query sees every reference
  key, and reference queries see every key. The kernels get `[text | references][target grid]`: the processor
  moves the reference tokens in front of the target (a permutation by slices, undone on the output), so every
  backend computes it with its plain text + grid path. Cost: the pairs of a text of T + R tokens (quadratic in
  the reference size R, as a reference is one image at most).
- `shared` (measured only, `reference` backend): the same circle in the images' shared (y, x) coordinates
  (Kontext's reference ids start at (0, 0) like the target's), across and within images.
- `own` (measured only, `reference` backend): each image sees only its own circle; the target never sees the
  reference (shows what the cross-image terms are worth).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REFERENCE_RULES = ("global", "shared", "own")
KERNEL_RULE = "global"  # the rule every backend runs; the others need the dense reference mask


@dataclass(frozen=True)
class ImageGrid:
    """One image's tokens: `h x w` row-major, starting `start` tokens into the image part of the sequence."""

    image_id: int
    start: int
    h: int
    w: int
    y0: float = 0.0  # position of the first token (img_ids columns 1, 2)
    x0: float = 0.0

    @property
    def size(self) -> int:
        return self.h * self.w

    @property
    def shape(self) -> tuple[int, int]:
        return self.h, self.w


@dataclass(frozen=True)
class TokenLayout:
    """`text_len` global tokens first, then the image grids in sequence order; grids[0] is the target."""

    text_len: int
    grids: tuple[ImageGrid, ...]

    @property
    def target(self) -> ImageGrid:
        return self.grids[0]

    @property
    def references(self) -> tuple[ImageGrid, ...]:
        return self.grids[1:]

    @property
    def n_image(self) -> int:
        return sum(g.size for g in self.grids)

    @property
    def n_reference(self) -> int:
        return self.n_image - self.target.size

    @property
    def seq_len(self) -> int:
        return self.text_len + self.n_image

    @property
    def global_len(self) -> int:
        """Tokens the kernels treat as global under the `global` rule: text plus every reference token."""
        return self.text_len + self.n_reference

    def describe(self) -> str:
        parts = [f"{self.text_len} text", f"target {self.target.h}x{self.target.w}"]
        parts += [f"reference {g.h}x{g.w} (id {g.image_id})" for g in self.references]
        return " + ".join(parts)


def _check_row_major(pos: torch.Tensor, low_precision: bool, what: str) -> tuple[int, int]:
    """(H, W) of positions [n, 2] (row, column) laid out row-major; ValueError naming the numbers otherwise."""
    n = int(pos.shape[0])
    rows, cols = pos[:, 0], pos[:, 1]
    w = int((rows == rows[0]).to(torch.int64).cumprod(0).sum())  # the first row's run of tokens
    if n % w:
        raise ValueError(f"{what} are not a row-major grid: the first row has {w} tokens, which does not divide "
                         f"the {n} image tokens")
    h = n // w
    r, c = rows.view(h, w), cols.view(h, w)
    same_rows = bool((r == r[:, :1]).all()) and bool((c == c[:1]).all())
    if low_precision:
        # FluxPipeline builds img_ids in the model's dtype: bf16 holds integers exactly only up to 256, so past
        # 4K (256 tokens a side) neighbouring rows and columns round to the same id. Ask only that they never
        # decrease and that the grid is not one repeated id.
        step_ok = lambda d: bool((d >= 0).all()) and (d.numel() == 0 or bool((d > 0).any()))  # noqa: E731
    else:
        step_ok = lambda d: bool((d > 0).all())  # noqa: E731
    increasing = step_ok(r[1:, 0] - r[:-1, 0]) and step_ok(c[0, 1:] - c[0, :-1])
    if not (same_rows and increasing):
        raise ValueError(f"{what} are not a row-major {h}x{w} grid ({n} tokens): each row must hold the same "
                         "increasing columns and rows must increase; CLEAR reads the token grid from img_ids")
    return h, w


def read_layout(img_ids: torch.Tensor, text_len: int, n_image: int | None = None) -> TokenLayout:
    """The layout of FLUX `img_ids` ([tokens, 3] = image id, row, column) after `text_len` global tokens.

    Images are the runs of equal column-0 ids, in sequence order; the first is the target. Each must be a row-major
    grid. ValueError, naming the numbers, when they are not, or their count differs from the `n_image` tokens of
    the image sequence.
    """
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[-1] < 3:
        raise ValueError(f"img_ids must be [tokens, 3] (id, row, column), got shape {tuple(img_ids.shape)}")
    if int(text_len) != text_len or text_len < 0:
        raise ValueError(f"text_len must be an integer >= 0, got {text_len!r}")
    n = int(ids.shape[0])
    if n_image is not None and n != n_image:
        raise ValueError(f"img_ids hold {n} positions but the image sequence has {n_image} tokens; CLEAR needs one "
                         "id per image token")
    if n == 0:
        raise ValueError("img_ids are empty: CLEAR needs at least one image token")
    host = ids.detach().to("cpu", torch.float64)
    image = host[:, 0]
    # Run boundaries: where column 0 changes.
    cut = [0] + [int(i) + 1 for i in torch.nonzero(image[1:] != image[:-1]).flatten()] + [n]
    low = ids.dtype in (torch.float16, torch.bfloat16)
    grids, seen = [], set()
    for a, b in zip(cut[:-1], cut[1:]):
        image_id = int(image[a])
        if image_id in seen:
            raise ValueError(f"img_ids: image id {image_id} appears in two separate runs of tokens; each image's "
                             "tokens must be contiguous")
        seen.add(image_id)
        what = "img_ids" if len(cut) == 2 else f"img_ids of image {image_id} (tokens {a}..{b - 1})"
        h, w = _check_row_major(host[a:b, 1:3], low, what)
        grids.append(ImageGrid(image_id, a, h, w, float(host[a, 1]), float(host[a, 2])))
    return TokenLayout(int(text_len), tuple(grids))


def single(text_len: int, grid: tuple[int, int]) -> TokenLayout:
    """The plain FLUX layout: text, then one target grid."""
    return TokenLayout(int(text_len), (ImageGrid(0, 0, int(grid[0]), int(grid[1])),))


def to_kernel_order(x: torch.Tensor, layout: TokenLayout, dim: int = 2) -> torch.Tensor:
    """`[text][images]` -> `[text | references][target]` along `dim` (the `global` rule's kernel order)."""
    if not layout.references:
        return x
    t, tg = layout.text_len, layout.target
    a, b = t + tg.start, t + tg.start + tg.size
    return torch.cat([x.narrow(dim, 0, a), x.narrow(dim, b, x.shape[dim] - b), x.narrow(dim, a, tg.size)], dim)


def from_kernel_order(x: torch.Tensor, layout: TokenLayout, dim: int = 2) -> torch.Tensor:
    """The inverse of `to_kernel_order`."""
    if not layout.references:
        return x
    t, tg = layout.text_len, layout.target
    a = t + tg.start
    g = x.shape[dim] - tg.size  # global tokens in kernel order
    return torch.cat([x.narrow(dim, 0, a), x.narrow(dim, g, tg.size), x.narrow(dim, a, g - a)], dim)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: TokenLayout, *, window: int,
           down_factor: int = 1, down_weight: torch.Tensor | None = None, scale: float | None = None,
           backend: str = "auto") -> torch.Tensor:
    """CLEAR attention over `[batch, heads, N, head_dim]` tensors in the layout's sequence order, `global` rule.

    References join the text in front of the target (`to_kernel_order`), so any backend computes it with its plain
    text + grid path; the output comes back in the layout's order. Pooled keys (f > 1) come from the target only.
    """
    from clear_cli.attention.kernels import clear_attention

    if q.shape[2] != layout.seq_len:
        raise ValueError(f"attention got {q.shape[2]} tokens but the layout holds {layout.seq_len} "
                         f"({layout.describe()})")
    out = clear_attention(to_kernel_order(q, layout), to_kernel_order(k, layout), to_kernel_order(v, layout),
                          text_len=layout.global_len, grid=layout.target.shape, window=window,
                          down_factor=down_factor, down_weight=down_weight, scale=scale, backend=backend)
    return from_kernel_order(out, layout)


def positions(layout: TokenLayout, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor]:
    """(image index, y, x) of every image token in sequence order (y, x in the images' shared coordinates)."""
    idx, ys, xs = [], [], []
    for i, g in enumerate(layout.grids):
        idx.append(torch.full((g.size,), i, device=device))
        ys.append(g.y0 + torch.arange(g.h, device=device, dtype=torch.float64).repeat_interleave(g.w))
        xs.append(g.x0 + torch.arange(g.w, device=device, dtype=torch.float64).repeat(g.h))
    return torch.cat(idx), torch.cat(ys), torch.cat(xs)


def layout_mask(layout: TokenLayout, window: int, rule: str = KERNEL_RULE,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [N, N] mask of `rule` over the layout's sequence (the oracle; small sizes only)."""
    if rule not in REFERENCE_RULES:
        raise ValueError(f"reference rule {rule!r} is not one of {', '.join(REFERENCE_RULES)}")
    t, n = layout.text_len, layout.seq_len
    img, ys, xs = positions(layout, device)
    d2 = (ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2
    near = d2 < int(window) ** 2
    if rule == "global":
        tgt = img == 0
        inner = near & tgt[:, None] & tgt[None, :]
        inner |= ~tgt[:, None] | ~tgt[None, :]   # a reference token on either side: always
    elif rule == "shared":
        inner = near
    else:  # own
        inner = near & (img[:, None] == img[None, :])
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[t:, t:] = inner
    return mask


def layout_pairs(layout: TokenLayout, window: int, down_factor: int = 1) -> int:
    """Exact allowed (query, key) pairs under the `global` rule (what the kernels compute)."""
    from clear_cli.attention.counting import count_pairs

    return count_pairs(layout.target.shape, layout.global_len, window, down_factor)


def parse_reference(spec: str) -> tuple[int, int]:
    """`HxW` token counts of a reference grid (for `clear bench attention --reference`)."""
    try:
        h, w = (int(s) for s in str(spec).lower().split("x"))
    except ValueError:
        raise ValueError(f"a reference grid is HxW tokens (e.g. 32x48), got {spec!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"a reference grid needs positive token counts, got {spec!r}")
    return h, w
