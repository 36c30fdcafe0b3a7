"""CLEAR weights on a derivative: applied as a delta (student minus the base they were distilled from), never by
overwriting the derivative's own projections (DESIGN.md §10).

    from clear_cli.models.rebase import rebase
    w = rebase(load_attention_weights("Huage001/CLEAR:clear_local_16.safetensors"), "black-forest-labs/FLUX.1-dev")
    apply_attention_weights(schnell.transformer, w)          # W_schnell + (W_clear - W_dev), per projection

What a file was trained from (`trained_from`): its ``base_model`` metadata (ours, written by `clear distill` and
`clear export`), or FLUX.1-dev for the authors' published checkpoints, which carry no metadata. A model other than that
base takes the weights only with `--base` (`for_model`, `export_plan`); the delta is then taken against the named base,
whose attention projections alone are read (`projections`): one tensor at a time from the safetensors of a diffusers
folder's transformer (sharded or not), a hub repo's (only the shards holding them are downloaded), a single
``.safetensors`` / ``REPO:FILE`` of the transformer, or the built-in models. A LoRA already is a delta (against its
base): it needs no base tensors at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from clear_cli.errors import ClearError, UsageError
from clear_cli.flux import DEFAULT_MODEL, QWEN_TINY_MODELS, RANDOM_MODELS, TINY_MODELS, WAN_TINY_MODELS
from clear_cli.models.weights import POOL_SUFFIX, AttnWeights, resolve_spec

PUBLISHED_BASE = DEFAULT_MODEL  # the authors distilled every published CLEAR checkpoint from FLUX.1-dev

_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_SINGLE = "diffusion_pytorch_model.safetensors"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_FILE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<file>[^:]+)$")
_HUB_CACHE = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+")
_BFL_KEY = re.compile(r"(^|\.)(double_blocks|single_blocks)\.\d+\.")


# ----------------------------------------------------------------------------------------------- names

def trained_from(weights: AttnWeights) -> str | None:
    """The model the weights were distilled from: their metadata, FLUX.1-dev for published files, else unknown."""
    if weights.base_model:
        return weights.base_model
    return PUBLISHED_BASE if weights.kind == "published" else None


def canonical(model: str) -> str:
    """One spelling per model: built-in names as they are, hub ids lower-cased, local paths resolved (a hub-cache
    snapshot folder counts as its hub id)."""
    text = str(model).strip()
    if text in TINY_MODELS or text in RANDOM_MODELS or text in QWEN_TINY_MODELS or text in WAN_TINY_MODELS:
        return text
    path = Path(text).expanduser()
    if path.exists():
        real = path.resolve().as_posix()
        m = _HUB_CACHE.search(real)
        if m and real.endswith(m.group(0)):
            return f"hub:{m['owner']}/{m['name']}".lower()
        return f"path:{real}"
    return "hub:" + text.rstrip("/").lower()


def same_model(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and canonical(a) == canonical(b)


def _trained_text(weights: AttnWeights, trained: str) -> str:
    return (f"{trained} (published CLEAR checkpoints carry no metadata; they were distilled from it)"
            if weights.kind == "published" and not weights.base_model else trained)


# ----------------------------------------------------------------------------------------------- the policy

def for_model(weights: AttnWeights, model: str, base: str | None = None, *,
              warn: Callable[[str], None] | None = None) -> AttnWeights:
    """The weights as `model` must load them (`clear gen`, `apply_attention_weights`).

    Trained on `model` itself: as they are. On another model: refused unless `base` names what they were trained from;
    then the full tensors become deltas against `base` (`rebase`), added to `model`'s own projections when applied.
    `base` may override the file's metadata (e.g. a local copy of it); that is said through `warn`.
    """
    trained = trained_from(weights)
    if base is None:
        if trained is None or same_model(trained, model):
            return weights
        raise UsageError(f"weights {weights.path.name} were trained from {_trained_text(weights, trained)}, "
                         f"the model is {model}",
                         f"pass --base {trained} to apply them as a delta onto {model}'s own projections, "
                         f"or --base {model} if that is the model they were trained from")
    if weights.base_model is not None and not same_model(weights.base_model, base):  # metadata, not our assumption
        (warn or _warn)(f"--base {base}: the weights say they were trained from {trained}; taking {base} as their base")
    if same_model(base, model):  # a delta against the model itself is the weights themselves
        return dataclasses.replace(weights, base_model=base)
    return rebase(weights, base)


def export_plan(weights: AttnWeights, model: str | None, base: str | None, *,
                warn: Callable[[str], None] | None = None) -> tuple[str, str]:
    """`clear export`: (the model the delta is taken against, the model the export is for)."""
    trained = trained_from(weights)
    if base is None:
        if model is not None and trained is not None and not same_model(trained, model):
            raise UsageError(f"weights {weights.path.name} were trained from {_trained_text(weights, trained)}, "
                             f"--model is {model}",
                             f"pass --base {trained} to export their delta against it, which stacks on {model}, "
                             f"or --base {model} if that is the model they were trained from")
        delta_base = trained or model or DEFAULT_MODEL
    else:
        if weights.base_model is not None and not same_model(weights.base_model, base):
            (warn or _warn)(f"--base {base}: the weights say they were trained from {trained}; "
                            f"taking {base} as their base")
        delta_base = base
    return delta_base, model or delta_base


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)


# ----------------------------------------------------------------------------------------------- deltas

def rebase(weights: AttnWeights, base: str, *, source: Mapping[str, torch.Tensor] | None = None) -> AttnWeights:
    """The weights as deltas against `base`: every full tensor W becomes W - W_base (in place: the returned weights
    share the file's tensors; do not apply `weights` afterwards); pooling weights, which no base has, stay as they are.

    A LoRA is a delta already and is only relabelled. `source`: the base's tensors if already open (`projections`).
    """
    if weights.kind == "lora" or not weights.tensors:
        return dataclasses.replace(weights, base_model=base)
    full = [k for k in weights.tensors if not k.endswith(POOL_SUFFIX)]
    src = source if source is not None else projections(base, keys=full)
    missing = [k for k in full if k not in src]
    if missing:
        raise ClearError(f"--base {base} has no {missing[0]} (+{len(missing) - 1} more): weights "
                         f"{weights.path.name} were not trained from it", "pass the model they were distilled from")
    wrong = [f"{k} (weights {list(weights.tensors[k].shape)}, base {list(_shape(src, k))})" for k in full
             if tuple(weights.tensors[k].shape) != _shape(src, k)]
    if wrong:
        raise ClearError(f"--base {base} does not fit weights {weights.path.name}: shapes differ for {wrong[0]}"
                         + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""),
                         "pass the model they were distilled from")
    deltas: dict[str, torch.Tensor] = {}
    pools = {k: v for k, v in weights.tensors.items() if k.endswith(POOL_SUFFIX)}
    with torch.no_grad():
        for k in full:
            v = weights.tensors[k]
            b = src[k]
            # bf16 - bf16 rounds once, like the fp32 difference cast back: in place costs no second copy
            deltas[k] = v.sub_(b.to(v.dtype)) if v.is_floating_point() else v - b
    return dataclasses.replace(weights, tensors=pools, deltas={**weights.deltas, **deltas}, base_model=base)


def student_tensors(weights: AttnWeights, src: Mapping[str, torch.Tensor], dtype: torch.dtype
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the student's full tensors on the model `src` holds, pooling weights), checked key by key against it.

    Full files as they are (cast to `dtype`); a LoRA added to `src`'s weights; deltas added to `src`'s values.
    """
    pools = {k: v for k, v in weights.tensors.items() if k.endswith(POOL_SUFFIX)}
    name = getattr(src, "name", "the model")
    bad = [f"{k[: -len(POOL_SUFFIX)]} (pooling weights; no such attention layer)" for k in pools
           if f"{k[: -len(POOL_SUFFIX)]}.to_q.weight" not in src]
    out: dict[str, torch.Tensor] = {}
    for k, v in weights.tensors.items():
        if k in pools:
            continue
        if k not in src:
            bad.append(f"{k} (not in the model)")
        elif tuple(v.shape) != _shape(src, k):
            bad.append(f"{k} (file {list(v.shape)}, model {list(_shape(src, k))})")
        else:
            out[k] = v.to(dtype)
    for k, d in weights.deltas.items():
        if k not in src or tuple(d.shape) != _shape(src, k):
            bad.append(f"{k} (delta {list(d.shape)}, model {list(_shape(src, k)) if k in src else 'none'})")
        else:
            out[k] = (src[k].to(torch.float32) + d.to(torch.float32)).to(dtype)
    for module, d in weights.lora.items():
        wk, bk = f"{module}.weight", f"{module}.bias"
        if wk not in src or len(_shape(src, wk)) != 2:
            bad.append(f"{module} (no such linear layer)")
            continue
        if _shape(src, wk) != (d.B.shape[0], d.A.shape[1]):
            bad.append(f"{module} (model {list(_shape(src, wk))}, LoRA {[d.B.shape[0], d.A.shape[1]]})")
            continue
        out[wk] = (src[wk].to(torch.float32) + d.B.to(torch.float32) @ d.A.to(torch.float32)).to(dtype)
        if d.bias is not None:
            if bk not in src:
                bad.append(f"{module} (bias delta, but the layer has no bias)")
                continue
            out[bk] = (src[bk].to(torch.float32) + d.bias.to(torch.float32)).to(dtype)
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ClearError(f"weights {weights.path.name} do not fit {name}: {bad[0]}{more}",
                         "were they made for another model or down_factor?")
    return out, pools


def _shape(src: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    return src.shape(key) if isinstance(src, Projections) else tuple(src[key].shape)


# ----------------------------------------------------------------------------------------------- reading a base

class Projections(Mapping[str, torch.Tensor]):
    """A model's transformer tensors under its state-dict keys, each read from its safetensors file when asked for
    (never the whole model); `shape(key)` reads the header only."""

    def __init__(self, name: str, *, files: Mapping[str, tuple[Path, str]] | None = None,
                 state: Mapping[str, torch.Tensor] | None = None):
        self.name = name
        self._files = dict(files or {})  # key -> (file, the prefix its keys carry there)
        self._state = dict(state) if state is not None else None
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        from safetensors import safe_open

        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = safe_open(str(path), framework="pt")
        return h

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._state is not None:
            return self._state[key]
        path, prefix = self._files[key]
        return self._open(path).get_tensor(prefix + key)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._state is not None:
            return tuple(self._state[key].shape)
        path, prefix = self._files[key]
        return tuple(self._open(path).get_slice(prefix + key).get_shape())

    def __contains__(self, key: object) -> bool:
        return key in (self._state if self._state is not None else self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self._state if self._state is not None else self._files)

    def __len__(self) -> int:
        return len(self._state if self._state is not None else self._files)


def _wanted(keys: Iterable[str] | None) -> Callable[[str], bool]:
    if keys is None:  # what deltas and exports need: attention tensors (+ the mlp rows ComfyUI fuses with q/k/v)
        return lambda k: ".attn." in k or ".attn1." in k or ".proj_mlp." in k   # attn1: Wan's self-attention
    wanted = set(keys)
    return wanted.__contains__


def _file_keys(path: Path, name: str) -> tuple[list[str], str]:
    """(keys without prefix, the prefix) of one safetensors file of a transformer; other layouts refused."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # SafetensorError, OSError: "cannot read it"
        raise UsageError(f"--base {name}: cannot read {path.name} as safetensors ({type(e).__name__})",
                         "pass a diffusers model (hub id or folder) or its transformer's .safetensors") from e
    if keys and all(k.startswith("transformer.") for k in keys if ".attn." in k) and any(".attn." in k for k in keys):
        # a pipeline-level file (the built-in tiny weights) or an export with the LoRA-style prefix
        return [k[len("transformer."):] for k in keys if k.startswith("transformer.")], "transformer."
    if any(_BFL_KEY.search(k) for k in keys[:2000]) and not any(".attn.to_q." in k for k in keys):
        raise UsageError(f"--base {name}: {path.name} is in the original FLUX layout (double_blocks.*), not diffusers'",
                         "pass the diffusers form of that model: its hub id or a folder with transformer/")
    return keys, ""


def _from_files(name: str, files: list[Path], keep: Callable[[str], bool]) -> Projections:
    where: dict[str, tuple[Path, str]] = {}
    for path in files:
        keys, prefix = _file_keys(path, name)
        where.update({k: (path, prefix) for k in keys if keep(k)})
    return Projections(name, files=where)


def _from_index(name: str, index: Path, keep: Callable[[str], bool],
                fetch: Callable[[str], Path]) -> Projections:
    """A sharded transformer: only the shards that hold wanted keys are fetched (downloaded from the hub)."""
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--base {name}: {index.name} is not a safetensors index (no weight_map)",
                         "pass a diffusers model folder or its transformer's .safetensors") from e
    shards = sorted({f for k, f in weight_map.items() if keep(k)})
    return _from_files(name, [fetch(s) for s in shards], keep)


def _local_transformer(name: str, folder: Path, keep: Callable[[str], bool]) -> Projections:
    if (folder / _INDEX).is_file():
        return _from_index(name, folder / _INDEX, keep, lambda s: folder / s)
    if (folder / _SINGLE).is_file():
        return _from_files(name, [folder / _SINGLE], keep)
    indexes = sorted(folder.glob("*.safetensors.index.json"))  # a variant (fp16, bf16) only
    if len(indexes) == 1:
        return _from_index(name, indexes[0], keep, lambda s: folder / s)
    files = sorted(folder.glob("*.safetensors"))
    if files and not indexes:
        return _from_files(name, files, keep)
    raise UsageError(f"--base {name}: no transformer weights in {folder} ({_INDEX} or {_SINGLE})",
                     "pass the folder that save_pretrained wrote, a hub id, or the transformer's .safetensors")


def _hub_error(name: str, e: Exception) -> ClearError:
    first = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return ClearError(f"--base {name}: could not get its transformer from the hub ({first})",
                      "run `huggingface-cli login` for gated repos, or pass a local diffusers folder with --base DIR")


def _hub_transformer(repo: str, keep: Callable[[str], bool], cache_dir: str | None) -> Projections:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(filename: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=cache_dir))
        except EntryNotFoundError:
            raise
        except Exception as e:  # gated, offline, unknown repo: all "could not get it"
            raise _hub_error(repo, e) from e

    for folder in ("transformer/", ""):  # a pipeline repo, or a transformer-only repo
        try:
            index = fetch(folder + _INDEX)
        except EntryNotFoundError:
            pass
        else:
            return _from_index(repo, index, keep, lambda s, f=folder: fetch(f + s))
        try:
            return _from_files(repo, [fetch(folder + _SINGLE)], keep)
        except EntryNotFoundError:
            pass
    raise ClearError(f"--base {repo}: the repo has no diffusers transformer weights "
                     f"(transformer/{_INDEX} or transformer/{_SINGLE})",
                     "pass REPO:FILE of its transformer's .safetensors, or a local diffusers folder")


def _builtin(name: str, keep: Callable[[str], bool], dtype: torch.dtype | None) -> Projections:
    from clear_cli.models import tiny

    if name == "tiny" and tiny.TINY_WEIGHTS.is_file():
        return _from_files(name, [tiny.TINY_WEIGHTS], keep)
    if name in TINY_MODELS:  # seeded random weights, built as load_pipeline builds them (a few MB)
        from clear_cli.models.pipeline import build_tiny

        state = build_tiny(random=True).transformer.state_dict()
    elif name in QWEN_TINY_MODELS:
        from clear_cli.models import qwen_image

        state = qwen_image.build_components()["transformer"].state_dict()
    elif name in WAN_TINY_MODELS:
        from clear_cli.models import wan

        state = wan.build_components()["transformer"].state_dict()
    else:  # flux-dev-random: nothing stored, so the transformer is built (what load_pipeline would allocate)
        from clear_cli.models.pipeline import load_pipeline

        state = load_pipeline(name, dtype=dtype or torch.bfloat16).transformer.state_dict()
    return Projections(name, state={k: v.detach() for k, v in state.items() if keep(k)})


def projections(base: str, *, keys: Iterable[str] | None = None, dtype: torch.dtype | None = None,
                cache_dir: str | os.PathLike | None = None) -> Projections:
    """The transformer tensors of `base` named by `keys` (default: every attention tensor and proj_mlp), read lazily.

    `base`: tiny, tiny-random, flux-dev-random, a local diffusers folder (or its transformer folder), a
    ``.safetensors`` / ``.safetensors.index.json`` of a transformer, a hub id (its ``transformer/`` weights; only the
    shards holding the keys are downloaded) or ``REPO:FILE``. `dtype` only matters for flux-dev-random (built).
    """
    name = str(base).strip()
    keep = _wanted(keys)
    if name in TINY_MODELS or name in RANDOM_MODELS or name in QWEN_TINY_MODELS or name in WAN_TINY_MODELS:
        return _builtin(name, keep, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            if not (path / "transformer").is_dir():
                raise UsageError(f"--base {name}: the pipeline folder has no transformer/",
                                 "pass a FLUX pipeline folder, its transformer folder or a hub id")
            return _local_transformer(name, path / "transformer", keep)
        return _local_transformer(name, path, keep)
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(name, path, keep, lambda s: path.parent / s)
        return _from_files(name, [path], keep)
    if name.startswith((".", "/", "~")):
        raise UsageError(f"--base {name} does not exist", "pass a local diffusers folder, a hub id or tiny")
    cache = str(cache_dir) if cache_dir is not None else None
    m = _HUB_FILE.match(name)
    if m:
        local = resolve_spec(name, cache_dir=cache)
        if m["file"].endswith(".index.json"):  # its shards sit beside it in the repo
            folder = m["file"].rpartition("/")[0]
            return _from_index(name, local, keep,
                               lambda s: resolve_spec(f"{m['repo']}:{folder + '/' if folder else ''}{s}",
                                                      cache_dir=cache))
        return _from_files(name, [local], keep)
    if _HUB_ID.match(name):
        return _hub_transformer(name, keep, cache)
    raise UsageError(f"--base {name!r} is neither a local model, a hub id (owner/name) nor REPO:FILE",
                     f"e.g. --base {DEFAULT_MODEL}, --base ./flux-dev or --base tiny")
