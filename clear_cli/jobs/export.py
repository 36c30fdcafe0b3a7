"""`clear export`: turn attention weights into files others load (DESIGN.md §7; layouts in docs/formats.md).

    import clear_cli
    res = clear_cli.export("out/clear_attn.safetensors", format="lora", rank=64, model="black-forest-labs/FLUX.1-dev")
    print("\\n".join(res.summary_lines()))

Formats:
- ``lora``: the student-minus-base delta of every attention projection as a truncated SVD, under the diffusers/PEFT
  keys stock ``FluxPipeline.load_lora_weights`` reads (``transformer.<module>.lora_A.weight`` [rank, in],
  ``.lora_B.weight`` [out, rank], ``.lora_B.bias`` = bias delta; no alpha keys, so scale 1). Pooling weights travel
  as ``clear_pool.<attn>.weight`` (the reader's name, outside the ``transformer.`` prefix, no "processor" in it).
- ``full``: every attention tensor in the published checkpoints' layout (the transformer's own keys, no prefix) with
  our metadata, for sharing.
- ``comfy``: ComfyUI's native FLUX layout (``lora_unet_double_blocks_N_img_attn_qkv.lora_down/.lora_up/.alpha`` and
  ``.diff_b``): q/k/v deltas stacked into the fused projection ComfyUI holds, the SVD taken on the stack. ComfyUI
  reads the ``lora`` file's weights too, but drops ``lora_B.bias`` (its LoRA adapter has no bias); ``diff_b`` on
  the fused layer is how it takes a bias delta.

WEIGHTS may be any file `load_attention_weights` reads: our distill output, a published CLEAR checkpoint, or our LoRA
(re-exported at another rank or as a full file).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clear_cli.comfy.keys import DOUBLE_PROJ, SINGLE_PROJ
from clear_cli.config import doc, merge_options
from clear_cli.errors import ClearError, UsageError
from clear_cli.files import check_out_file, same_file
from clear_cli.flux import DEFAULT_MODEL
from clear_cli.logs import Log, sayer

__all__ = ["export", "ExportConfig", "ExportResult", "LayerReport", "FORMATS", "DEFAULT_OUT", "choose_rank", "low_rank"]

FORMATS = ("lora", "full", "comfy")
DEFAULT_OUT = {"lora": "clear_lora.safetensors", "full": "clear_attn_full.safetensors",
               "comfy": "clear_lora_comfy.safetensors"}
DEFAULT_RANK = 64

_MODULE = re.compile(r"^(?P<block>transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.attn\.(?P<proj>.+)$")


@dataclass
class ExportConfig:
    """What `clear export` does; every field is the CLI option of the same name (clear_cli/cli/options.py)."""

    weights: str | None = doc(None, "attention weights: our distill output, a published CLEAR checkpoint (path or "
                                    "REPO:FILE, e.g. Huage001/CLEAR:clear_local_16.safetensors), or our LoRA")
    format: str = doc("lora", "lora (diffusers/PEFT keys), full (published layout) or comfy (ComfyUI's FLUX layout)")
    rank: int | None = doc(None, f"fixed LoRA rank per layer (clamped to the layer's size); default {DEFAULT_RANK}")
    energy: float | None = doc(None, "instead of --rank: smallest rank keeping this share of squared singular values")
    model: str | None = doc(None, "model the export is for; default: the model the weights were trained from (their "
                                  f"base_model metadata, {DEFAULT_MODEL} for published files)")
    base: str | None = doc(None, "model the weights were trained from when --model is another (a derivative): the "
                                 "delta is taken against it")
    out: str | None = doc(None, "output file; default clear_lora.safetensors (lora), clear_attn_full.safetensors "
                                "(full), clear_lora_comfy.safetensors (comfy)")
    overwrite: bool = doc(False, "replace an existing output file")
    window: int | None = doc(None, "window to record when the weights do not say it (published files renamed)")
    down_factor: int | None = doc(None, "down_factor to record when the weights do not say it")
    device: str = doc("auto", "where the SVDs run: auto, cpu, cuda or cuda:N")


@dataclass
class LayerReport:
    """One exported layer: its rank and how well the low-rank factors reproduce it."""

    name: str
    rank: int
    max_rank: int
    error: float
    """||delta - B A||_F / ||delta||_F (0 for a zero delta): the share of the fine-tune the LoRA loses"""
    weight_error: float
    """||delta - B A||_F / ||W_student||_F: the same loss measured against the whole weight"""


@dataclass
class ExportResult:
    path: Path
    format: str
    size_bytes: int
    window: int
    down_factor: int
    base_model: str
    """the model the delta is taken against"""
    model: str = ""
    """the model the export is for (the base, unless --model names a derivative)"""
    layers: list[LayerReport] = field(default_factory=list)
    tensors: int = 0
    pools: int = 0
    unchanged: list[str] = field(default_factory=list)
    """modules whose weight and bias equal the base model's (left out of a LoRA)"""

    def summary_lines(self) -> list[str]:
        size = _human_size(self.size_bytes)
        base = f"base {self.base_model}"
        if self.model and self.model != self.base_model:
            base = (f"{self.model} (its projections + the delta against {self.base_model})" if self.format == "full"
                    else f"{self.model} (delta against {self.base_model})")
        lines = [f"wrote {self.path} ({self.format}, {size}, {self.tensors} tensors) for {base}, "
                 f"window {self.window}, down_factor {self.down_factor}"]
        if self.layers:
            ranks = sorted(r.rank for r in self.layers)
            errs = [r.error for r in self.layers]
            worst = max(self.layers, key=lambda r: r.error)
            lines.append(f"{len(self.layers)} low-rank layers, rank {ranks[0]}..{ranks[-1]} "
                         f"(median {ranks[len(ranks) // 2]}); error of the delta (relative Frobenius) "
                         f"mean {sum(errs) / len(errs):.4f}, max {worst.error:.4f} ({worst.name}); "
                         f"against the weights max {max(r.weight_error for r in self.layers):.2e}")
        if self.unchanged:
            lines.append(f"{len(self.unchanged)} module(s) equal the base model and were left out "
                         f"(e.g. {self.unchanged[0]})")
        if self.pools:
            where = {"lora": " as clear_pool.* (clear gen --weights restores them)",
                     "comfy": " as clear_pool.* (the CLEAR Attention node reads them; ComfyUI's LoRA loader logs "
                              "them as not loaded)", "full": ""}[self.format]
            lines.append(f"{self.pools} pooling weight tensor(s) included{where}")
        return lines


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ----------------------------------------------------------------------------------------------- options

def check_options(cfg: ExportConfig) -> ExportConfig:
    """Refuse bad options before anything is loaded (so nothing is written); fill the defaults."""
    if not cfg.weights:
        raise UsageError("no weights to export", "pass the attention file: clear export --weights FILE")
    cfg = dataclasses.replace(cfg, format=str(cfg.format).lower())
    if cfg.format not in FORMATS:
        raise UsageError(f"--format {cfg.format!r} is not one of {', '.join(FORMATS)}",
                         "lora for diffusers, comfy for ComfyUI, full for the attention-only file")
    if cfg.rank is not None and cfg.energy is not None:
        raise UsageError("--rank and --energy both given", "pass one: a fixed rank, or the share of energy to keep")
    if cfg.rank is not None and (isinstance(cfg.rank, bool) or int(cfg.rank) != cfg.rank or cfg.rank < 1):
        raise UsageError(f"--rank {cfg.rank} must be a whole number of at least 1", "e.g. --rank 64")
    if cfg.energy is not None and not (isinstance(cfg.energy, (int, float)) and 0.0 < cfg.energy <= 1.0):
        raise UsageError(f"--energy {cfg.energy} must be in (0, 1]", "e.g. --energy 0.99 keeps 99% of the energy")
    if cfg.format == "full" and (cfg.rank is not None or cfg.energy is not None):
        raise UsageError("--rank/--energy apply to LoRA formats only", "drop them for --format full")
    for name in ("window", "down_factor"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
            raise UsageError(f"--{name.replace('_', '-')} {v} must be a whole number of at least 1")
    out = Path(cfg.out if cfg.out is not None else DEFAULT_OUT[cfg.format]).expanduser()
    if out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory", f"name a file, e.g. {out / DEFAULT_OUT[cfg.format]}")
    check_out_file(out, ".safetensors", what="weights file")
    if out.exists() and not cfg.overwrite:
        raise UsageError(f"{out} already exists", "pass --overwrite to replace it, or choose another --out")
    rank = cfg.rank if cfg.rank is not None or cfg.energy is not None or cfg.format == "full" else DEFAULT_RANK
    return dataclasses.replace(cfg, out=str(out), rank=rank)


# ----------------------------------------------------------------------------------------------- SVD

def choose_rank(s: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """Rank kept from singular values `s` (descending): fixed (clamped), or the smallest keeping `energy`."""
    n = int(s.numel())
    if energy is None:
        return max(1, min(int(rank or DEFAULT_RANK), n))
    sq = s.detach().to("cpu", torch.float64) ** 2  # the rank rule is tiny work: do it on the CPU, whatever ran the SVD
    total = float(sq.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(sq, 0) / total
    # A hair of slack so that energy 1.0 keeps the numerical rank instead of tripping on rounding.
    return max(1, min(n, int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1))


def low_rank(delta: torch.Tensor, rank: int | None, energy: float | None, *, dtype: torch.dtype,
             weight_norm: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, float, float]:
    """Truncated SVD of `delta` [out, in] -> (A [r, in], B [out, r], r, error, weight_error), factors in `dtype`.

    The singular values are split evenly (B = U sqrt(S), A = sqrt(S) V^T) so neither factor is tiny in low
    precision. Errors are measured on the factors as stored (after the cast), relative Frobenius.
    """
    d = delta.to(device=device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(dtype)
    a = (root[:, None] * vh[:r]).to(dtype)
    resid = float(torch.linalg.norm(d - b.float() @ a.float()))
    norm = float(torch.linalg.norm(d))
    err = resid / norm if norm > 0 else 0.0
    werr = resid / weight_norm if weight_norm > 0 else 0.0
    return a.cpu(), b.cpu(), r, err, werr


# ----------------------------------------------------------------------------------------------- loading

def _weights_dtype(w) -> torch.dtype:
    for t in list(w.tensors.values()) + [d.A for d in w.lora.values()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _modules_of(full: dict[str, torch.Tensor], w_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors by module ({module: {"weight": ..., "bias": ...}}); refuse what a LoRA cannot carry."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, v in full.items():
        module, _, part = k.rpartition(".")
        if part not in ("weight", "bias") or (part == "weight" and v.ndim != 2) or (part == "bias" and v.ndim != 1):
            bad.append(k)
            continue
        out.setdefault(module, {})[part] = v
    if bad:
        raise ClearError(f"weights {w_name}: {len(bad)} tensor(s) are not linear-layer weights or biases and cannot "
                         f"go into a LoRA ({', '.join(bad[:2])})", "export them with --format full instead")
    return out


# ----------------------------------------------------------------------------------------------- formats

def _lora_tensors(modules, base, cfg: ExportConfig, dtype, device, progress: bool):
    from clear_cli.logs import progress_bar as tqdm

    from clear_cli.models.weights import LORA_PREFIX

    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerReport] = []
    unchanged: list[str] = []
    for module in tqdm(sorted(modules), desc="SVD", unit="layer", disable=not progress or None, leave=False):
        parts = modules[module]
        w_old = base[f"{module}.weight"]
        w_new = parts.get("weight", w_old)
        dw = w_new.float() - w_old.float()
        db = parts["bias"].float() - base[f"{module}.bias"].float() if "bias" in parts else None
        if not dw.any() and (db is None or not db.any()):
            unchanged.append(module)
            continue
        a, b, r, err, werr = low_rank(dw, cfg.rank, cfg.energy, dtype=dtype,
                                      weight_norm=float(torch.linalg.norm(w_new.float())), device=device)
        tensors[f"{LORA_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{LORA_PREFIX}{module}.lora_B.weight"] = b
        if db is not None and db.any():
            tensors[f"{LORA_PREFIX}{module}.lora_B.bias"] = db.to(dtype)
        layers.append(LayerReport(module, r, min(dw.shape), err, werr))
    return tensors, layers, unchanged


def _rows(base, key: str) -> int:
    """Output rows of a base weight, from the file header where it can (`rebase.Projections`)."""
    return int(base.shape(key)[0] if hasattr(base, "shape") else base[key].shape[0])


def _comfy_groups(modules, base) -> dict[str, list[tuple[str | None, int]]]:
    """ComfyUI layer name -> stacked segments [(diffusers module or None for zero rows, rows)]."""
    groups: dict[str, dict[int, str]] = {}
    for module in modules:
        m = _MODULE.match(module)
        table = DOUBLE_PROJ if m and m["block"] == "transformer_blocks" else SINGLE_PROJ  # shared with the node
        if m is None or m["proj"] not in table:
            raise ClearError(f"{module} has no place in ComfyUI's FLUX layout",
                             "export it with --format lora or --format full instead")
        target, slot = table[m["proj"]]
        prefix = "double_blocks" if m["block"] == "transformer_blocks" else "single_blocks"
        name = f"lora_unet_{prefix}_{m['i']}_{target.replace('.', '_')}"
        groups.setdefault(name, {})[slot] = f"{m['block']}.{m['i']}.attn."
    out: dict[str, list[tuple[str | None, int]]] = {}
    for name, slots in groups.items():
        attn = next(iter(slots.values()))
        if name.endswith(("_qkv", "_linear1")):
            projs = ("add_q_proj", "add_k_proj", "add_v_proj") if "_txt_attn_" in name else ("to_q", "to_k", "to_v")
            segs: list[tuple[str | None, int]] = [(attn + p, _rows(base, f"{attn}{p}.weight")) for p in projs]
            if name.endswith("_linear1"):  # the mlp input rows ComfyUI fuses after q, k, v
                block = attn[: -len("attn.")]
                segs.append((None, _rows(base, f"{block}proj_mlp.weight")))
        else:
            proj = "to_add_out" if "_txt_attn_" in name else "to_out.0"
            segs = [(attn + proj, _rows(base, f"{attn}{proj}.weight"))]
        out[name] = segs
    return out


def _comfy_tensors(modules, base, cfg: ExportConfig, dtype, device, progress: bool):
    from clear_cli.logs import progress_bar as tqdm

    tensors: dict[str, torch.Tensor] = {}
    layers: list[LayerReport] = []
    unchanged: list[str] = []
    groups = _comfy_groups(modules, base)
    for name in tqdm(sorted(groups), desc="SVD", unit="layer", disable=not progress or None, leave=False):
        dws, dbs, news = [], [], []
        n_in = None
        for module, rows in groups[name]:
            if module is None:  # the fused mlp rows: no delta
                dws.append(None)
                news.append(None)
                dbs.append(torch.zeros(rows))
                continue
            old_w = base[f"{module}.weight"].float()
            new_w = modules[module]["weight"].float() if "weight" in modules.get(module, {}) else old_w
            n_in = old_w.shape[1]
            dws.append(new_w - old_w)
            news.append(new_w)
            old_b = base.get(f"{module}.bias")
            new_b = modules.get(module, {}).get("bias", old_b)
            dbs.append(torch.zeros(rows) if old_b is None else new_b.float() - old_b.float())
        pad = [i for i, d in enumerate(dws) if d is None]
        core = torch.cat([d for d in dws if d is not None])  # q/k/v (or proj) rows: the SVD runs on these only
        db = torch.cat(dbs)
        if not core.any() and not db.any():
            unchanged.append(name)
            continue
        weight_norm = float(torch.linalg.norm(torch.cat([x for x in news if x is not None])))
        a, b, r, err, werr = low_rank(core, cfg.rank, cfg.energy, dtype=dtype, weight_norm=weight_norm, device=device)
        if pad:  # zero rows for the fused mlp input: ComfyUI reshapes up @ down to the whole fused weight
            rows = sum(rows for module, rows in groups[name] if module is None)
            b = torch.cat([b, torch.zeros(rows, r, dtype=dtype)])
        tensors[f"{name}.lora_down.weight"] = a
        tensors[f"{name}.lora_up.weight"] = b
        tensors[f"{name}.alpha"] = torch.tensor(float(r), dtype=torch.float32)  # alpha / rank = 1: no rescaling
        if db.any():
            tensors[f"{name}.diff_b"] = db.to(dtype)
        layers.append(LayerReport(name, r, min(core.shape[0], n_in or core.shape[1]), err, werr))
    return tensors, layers, unchanged


# ----------------------------------------------------------------------------------------------- entry point

def export(config: ExportConfig | str | os.PathLike | None = None, *, log: Log | None = None,
           progress: bool = True, **options: Any) -> ExportResult:
    """Export attention weights (ours, published or our LoRA) as a LoRA, a full attention file or a ComfyUI LoRA.

    The delta is taken against the model the weights were trained from (their base_model metadata, FLUX.1-dev for
    published files; `base` when `model` names a derivative), whose attention tensors alone are read
    (`clear_cli.models.rebase.projections`). `--format full` for a derivative writes its own projections plus that
    delta. The output is written atomically and never replaces a file unless `overwrite`.
    `config` or keyword `options` (ExportConfig fields: weights, format, rank, energy, model, base, out, ...); a
    path in place of `config` is `weights` (`export("clear_attn.safetensors", format="lora", rank=64)`). `log`
    receives the summary lines. Returns what was written (layers with rank and error, file size); raises
    ClearError/UsageError on bad input.
    """
    from clear_cli.devices import resolve_device
    from clear_cli.models.rebase import export_plan, projections, same_model, student_tensors
    from clear_cli.models.weights import (
        load_attention_weights, pool_key, resolve_geometry, save_attention_weights,
    )

    cfg = check_options(merge_options(ExportConfig, config, options, job="export", primary="weights"))
    if same_file(cfg.out, cfg.weights):
        raise UsageError(f"--out {cfg.out} is the input weights file", "name another --out; the input is never replaced")
    dev = resolve_device(cfg.device)
    w = load_attention_weights(cfg.weights)
    win, f = resolve_geometry(w, cfg.window, cfg.down_factor)
    base_name, target = export_plan(w, cfg.model, cfg.base)
    dtype = _weights_dtype(w)
    # Only the base's attention tensors (and the mlp rows ComfyUI fuses into linear1), read one at a time.
    base = projections(base_name, dtype=dtype)
    full, pools = student_tensors(w, base, dtype)
    if f > 1 and not pools:
        raise ClearError(f"weights {w.path.name}: down_factor {f} but no pooling weights in the file",
                         "export from the file distillation wrote, which holds them")
    own = same_model(target, base_name)
    if not own:  # the derivative must share the base's architecture: its shapes (headers only) are checked
        target_src = projections(target, dtype=dtype)
        student_tensors(dataclasses.replace(w, tensors={**full, **pools}, lora={}, deltas={}), target_src, dtype)

    meta: dict[str, object] = {
        "format": cfg.format, "window": win, "down_factor": f, "base_model": base_name,
        "source": w.path.name, "source_sha256": w.sha256,
    }
    if not own:
        meta["model"] = target
    for key in ("steps", "recipe_hash"):
        if w.metadata.get(key):
            meta[key] = w.metadata[key]
    layers: list[LayerReport] = []
    unchanged: list[str] = []
    if cfg.format == "full":
        if not own:  # absolute projections for the derivative: its own + (student - base)
            full = {k: (target_src[k].to(torch.float32) + v.to(torch.float32) - base[k].to(torch.float32)).to(v.dtype)
                    for k, v in full.items()}
            meta.update(base_model=target, delta_base=base_name)
        tensors = {**full, **pools}
    else:
        modules = _modules_of(full, w.path.name)
        make = _lora_tensors if cfg.format == "lora" else _comfy_tensors
        tensors, layers, unchanged = make(modules, base, cfg, dtype, dev, progress)
        if not tensors and not pools:
            raise ClearError(f"weights {w.path.name} equal the base model {base_name}: there is no delta to export",
                             "check --base or the weights' base_model (the delta is taken against it)")
        tensors.update({pool_key(k): v for k, v in pools.items()})
        meta.update({
            "rank": cfg.rank, "energy": cfg.energy,
            "ranks": {r.name: r.rank for r in layers},
            "errors": {r.name: round(r.error, 6) for r in layers},
            "weight_errors": {r.name: float(f"{r.weight_error:.3e}") for r in layers},
        })
    path = save_attention_weights(cfg.out, tensors, meta)
    result = ExportResult(path=path, format=cfg.format, size_bytes=path.stat().st_size, window=win, down_factor=f,
                          base_model=base_name, model=target, layers=layers, tensors=len(tensors), pools=len(pools),
                          unchanged=unchanged)
    say = sayer(log)
    for line in result.summary_lines():
        say(line)
    return result



