"""Attention-weight files: one reader for every format, one atomic writer, and loading into a transformer.

Formats `load_attention_weights` reads (DESIGN.md §7), told apart by their keys and metadata:

- ``clear`` (ours, written by `clear distill` / `clear export --format full`): safetensors whose keys are the
  transformer's own state-dict keys (``transformer_blocks.0.attn.to_q.weight``, ...; with down_factor f > 1 also
  ``<block>.attn.processor.spatial_weight`` of shape [1,1,1,f,1,f,1]) and string metadata ``window``,
  ``down_factor``, ``base_model``, ``steps``, ``recipe_hash`` (JSON-encoded where not a string).
- ``published`` (the authors' ``Huage001/CLEAR`` files): the same keys (with or without a ``transformer.`` prefix)
  and no metadata. The window comes from the file name (``clear_local_{r}.safetensors``,
  ``clear_local_{r}_down_{f}.safetensors``), f from the name or the pooling weights' shape; the two must agree.
  Nothing is guessed: an unknown window stays None and the caller must be told it (`resolve_geometry`).
- ``lora`` (ours, written by `clear export --format lora`): ``transformer.<module>.lora_A.weight`` [rank, in],
  ``transformer.<module>.lora_B.weight`` [out, rank], optional ``transformer.<module>.lora_B.bias`` (a bias
  *delta*), metadata ``window``, ``down_factor``, ``base_model``, ``ranks`` (JSON). No alpha keys: scale 1.
  Pooling weights, which have no base counterpart, are stored as ``clear_pool.<attention module>.weight``
  (e.g. ``clear_pool.single_transformer_blocks.3.attn.weight`` for
  ``single_transformer_blocks.3.attn.processor.spatial_weight``): outside the ``transformer.`` prefix and
  without "processor", "alpha", "base_model" or ".lora_down." in the name, because diffusers' FLUX LoRA loader
  picks another converter when it sees those words. `POOL_PREFIX` / `pool_key` / `processor_key` convert names.
  Read for generation, a LoRA gives W = W_base + B @ A and bias = bias_base + delta (see `materialize`).

A spec is a local path or a hub reference ``REPO:FILE`` (``Huage001/CLEAR:clear_local_16.safetensors``),
downloaded with huggingface_hub into its cache. Only safetensors are read (never pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from clear_cli.errors import ClearError, UsageError

POOL_PREFIX = "clear_pool."
POOL_SUFFIX = ".processor.spatial_weight"
LORA_PREFIX = "transformer."
KINDS = ("clear", "published", "lora")

# <block>.<index>.attn.<anything>: the only keys an attention-weight file may hold.
# FLUX / Qwen-Image / Chroma blocks' `attn`, and Wan's self-attention `blocks.N.attn1` (the one CLEAR replaces)
_ATTN_KEY = re.compile(r"^(?:(transformer_blocks|single_transformer_blocks)\.\d+\.attn|blocks\.\d+\.attn1)"
                       r"\.[A-Za-z0-9_.]+$")
_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")
_PUBLISHED_NAME = re.compile(r"^clear_local_(?P<r>\d+)(?:_down_(?P<f>\d+))?\.safetensors$")
_HUB_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<file>[^:]+)$")


def pool_key(processor_key: str) -> str:
    """``<attn>.processor.spatial_weight`` -> ``clear_pool.<attn>.weight`` (the LoRA file's name for it)."""
    if not processor_key.endswith(POOL_SUFFIX):
        raise ValueError(f"{processor_key!r} is not a pooling-weight key (…{POOL_SUFFIX})")
    return POOL_PREFIX + processor_key[: -len(POOL_SUFFIX)] + ".weight"


def processor_key(pool_name: str) -> str:
    """``clear_pool.<attn>.weight`` -> ``<attn>.processor.spatial_weight`` (the transformer's own key)."""
    if not (pool_name.startswith(POOL_PREFIX) and pool_name.endswith(".weight")):
        raise ValueError(f"{pool_name!r} is not a {POOL_PREFIX}<module>.weight key")
    return pool_name[len(POOL_PREFIX): -len(".weight")] + POOL_SUFFIX


@dataclass
class LoraDelta:
    """One module's low-rank update: W += B @ A, bias += bias (a delta; None when the file has none)."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class AttnWeights:
    """What an attention-weight file holds, whatever its format."""

    tensors: dict[str, torch.Tensor]
    """full tensors under the transformer's own keys (for a LoRA: only the pooling weights)"""
    kind: str
    """clear | published | lora"""
    window: int | None
    down_factor: int | None
    base_model: str | None
    sha256: str
    source: str
    """the spec as given (path or REPO:FILE)"""
    path: Path
    """the local file read"""
    metadata: dict[str, str] = field(default_factory=dict)
    lora: dict[str, LoraDelta] = field(default_factory=dict)
    """module path (e.g. ``transformer_blocks.0.attn.to_q``) -> delta; LoRA files only"""
    origin: dict[str, str] = field(default_factory=dict)
    """where window / down_factor came from: metadata, file name, pooling weights' shape"""
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    """full-size deltas under the transformer's keys, added to the model's own values (weights rebased onto a
    derivative: student minus the base they were trained from; `clear_cli.models.rebase`)"""

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    def describe(self) -> str:
        geo = f"window {self.window if self.window is not None else '?'}, down_factor {self.down_factor or '?'}"
        n = len(self.lora) if self.kind == "lora" else len(self.tensors) + len(self.deltas)
        what = "LoRA modules" if self.kind == "lora" else "tensors"
        delta = f", as a delta against {self.base_model}" if self.deltas else ""
        return f"{self.kind} weights {self.path.name} ({n} {what}, {geo}{delta}, sha256 {self.short_hash})"


# ----------------------------------------------------------------------------------------------- locating

def resolve_spec(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file for `spec`: the path itself, or a hub ``REPO:FILE`` downloaded into the hub cache."""
    text = str(spec).strip()
    if not text:
        raise UsageError("--weights is empty", "pass a .safetensors file or REPO:FILE")
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            raise UsageError(f"weights {text} is a directory",
                             "pass the .safetensors file itself (e.g. out/clear_attn.safetensors)")
        return path
    m = _HUB_SPEC.match(text)
    if m is None or text.startswith((".", "/", "~")):
        raise UsageError(f"weights file {text} does not exist",
                         "pass a local .safetensors file or a hub reference REPO:FILE, "
                         "e.g. Huage001/CLEAR:clear_local_16.safetensors")
    from huggingface_hub import hf_hub_download

    kw = dict(repo_id=m["repo"], filename=m["file"], cache_dir=str(cache_dir) if cache_dir is not None else None)
    try:
        return Path(hf_hub_download(**kw, local_files_only=True))  # cached: no network at all
    except Exception:  # not in the cache (the hub client raises several types)
        pass
    from clear_cli.network import hub_reachable

    if not hub_reachable():
        raise ClearError(f"could not download {m['file']} from {m['repo']}: the hub cannot be reached (offline) and "
                         "the file is not in the local hub cache",
                         "connect and rerun, or download the file elsewhere and pass its local path")
    try:
        local = hf_hub_download(**kw)
    except Exception as e:  # hub errors come in many types; all mean "could not get the file"
        first = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        raise ClearError(f"could not download {m['file']} from {m['repo']} ({first})",
                         "check the name, run `huggingface-cli login` for gated repos, or download the file "
                         "elsewhere and pass its local path") from e
    return Path(local)


def file_sha256(path: Path) -> str:
    """sha256 of the file; free for hub downloads (their cache blobs are named by it)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- reading

def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError, permission errors: all "cannot read it"
        first = f"{type(e).__name__}: {e}".splitlines()[0][:160]
        raise UsageError(f"cannot read weights {path}: not a readable safetensors file ({first})",
                         "pass a .safetensors attention-weight file, LoRA or published CLEAR checkpoint") from e
    check_finite_tensors(tensors, path)
    return tensors, meta


TENSOR_COUNT = "tensor_count"  # metadata key: how many tensors the writer stored


def first_non_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first tensor (in key order) holding NaN or inf, or None."""
    for k in sorted(tensors):
        t = tensors[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return k
    return None


def check_finite_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Every weight file read is checked: NaN or inf in a weight only ever gives black images or a failed SVD
    later, so it is refused at once, naming the tensor."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ClearError(f"weights {path}: tensor {bad} holds NaN or inf",
                         "the file is damaged or came from a diverged run: use an earlier checkpoint or re-export")


def _meta_int(meta: Mapping[str, str], key: str, path: Path) -> int | None:
    if key not in meta or meta[key] in ("", "null", "None"):
        return None
    try:
        value = int(json.loads(meta[key]))
    except (ValueError, TypeError):
        raise ClearError(f"weights {path.name}: metadata {key}={meta[key]!r} is not an integer",
                         "rewrite the file with `clear export --format full`") from None
    if value < 1:
        raise ClearError(f"weights {path.name}: metadata {key}={value} must be at least 1")
    return value


def _meta_str(meta: Mapping[str, str], key: str) -> str | None:
    v = meta.get(key)
    if v is None or v == "":
        return None
    try:
        out = json.loads(v)
        return out if isinstance(out, str) else v
    except ValueError:
        return v


def _few(keys: list[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _pool_factor(tensors: Mapping[str, torch.Tensor], path: Path) -> int | None:
    """f from the pooling weights' shape [1,1,1,f,1,f,1] (None when the file has none)."""
    factors = set()
    for k, v in tensors.items():
        if k.endswith(POOL_SUFFIX) or k.startswith(POOL_PREFIX):
            shape = tuple(v.shape)
            if len(shape) != 7 or shape[3] != shape[5] or any(shape[i] != 1 for i in (0, 1, 2, 4, 6)):
                raise ClearError(f"weights {path.name}: pooling weight {k} has shape {list(shape)}, "
                                 "expected [1,1,1,f,1,f,1]")
            factors.add(int(shape[3]))
    if len(factors) > 1:
        raise ClearError(f"weights {path.name}: pooling weights disagree on down_factor ({sorted(factors)})")
    return factors.pop() if factors else None


def _strip_prefix(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Published files may prefix every key with ``transformer.``; accept both, but not a mix."""
    prefixed = [k for k in tensors if k.startswith(LORA_PREFIX)]
    if not prefixed:
        return tensors
    if len(prefixed) != len(tensors):
        raise ClearError(f"weights {path.name}: some keys start with 'transformer.' and some do not "
                         f"(e.g. {_few([k for k in tensors if not k.startswith(LORA_PREFIX)], 2)})",
                         "rewrite the file with one key layout")
    return {k[len(LORA_PREFIX):]: v for k, v in tensors.items()}


def _check_attention_keys(keys: list[str], path: Path) -> None:
    bad = [k for k in keys if not _ATTN_KEY.match(k)]
    if bad:
        raise ClearError(f"weights {path.name} is not an attention-weight file: {len(bad)} key(s) are not "
                         f"attention parameters of a transformer block ({_few(bad)})",
                         "pass the output of `clear distill`/`clear export`, or a published CLEAR checkpoint")


def _read_lora(tensors: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, LoraDelta], dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    pools: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for k, v in tensors.items():
        if k.startswith(POOL_PREFIX):
            pools[processor_key(k)] = v
            continue
        m = _LORA_KEY.match(k)
        if m is None or not _ATTN_KEY.match(m["module"] + ".weight"):
            bad.append(k)
            continue
        parts.setdefault(m["module"], {})[m["part"]] = v
    if bad:
        raise ClearError(f"LoRA {path.name}: {len(bad)} key(s) are neither attention LoRA factors nor "
                         f"{POOL_PREFIX}* pooling weights ({_few(bad)})",
                         "alpha/dora keys are not supported: export the LoRA with `clear export --format lora`")
    lora: dict[str, LoraDelta] = {}
    for module, p in sorted(parts.items()):
        if "lora_A.weight" not in p or "lora_B.weight" not in p:
            raise ClearError(f"LoRA {path.name}: {module} lacks its "
                             f"{'lora_A' if 'lora_A.weight' not in p else 'lora_B'} weight")
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ClearError(f"LoRA {path.name}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                             "expected [rank, in] and [out, rank]")
        bias = p.get("lora_B.bias")
        if bias is not None and tuple(bias.shape) != (b.shape[0],):
            raise ClearError(f"LoRA {path.name}: {module} bias delta has shape {list(bias.shape)}, "
                             f"expected [{b.shape[0]}]")
        lora[module] = LoraDelta(a, b, bias)
    return lora, pools


def load_attention_weights(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> AttnWeights:
    """Read an attention-weight file of any supported format (see the module docstring).

    `spec`: a local path or ``REPO:FILE`` on the hub. Raises ClearError/UsageError with one line naming the problem.
    """
    path = resolve_spec(spec, cache_dir=cache_dir)
    tensors, meta = _read_safetensors(path)
    if not tensors:
        raise ClearError(f"weights {path.name} holds no tensors", "pass an attention-weight file")
    said = meta.get(TENSOR_COUNT, "")
    if said.isdigit() and int(said) != len(tensors):
        raise ClearError(f"weights {path.name} hold {len(tensors)} tensors where their metadata says {said}: the "
                         "file lost tensors since it was written", "re-export it, or use the original file")
    origin: dict[str, str] = {}
    lora: dict[str, LoraDelta] = {}
    is_lora = any(".lora_A." in k or ".lora_B." in k for k in tensors) or any(k.startswith(POOL_PREFIX)
                                                                             for k in tensors)
    if is_lora:
        kind = "lora"
        lora, tensors = _read_lora(tensors, path)
        if not lora and not tensors:
            raise ClearError(f"LoRA {path.name} holds no LoRA factors")
    else:
        tensors = _strip_prefix(tensors, path)
        _check_attention_keys(list(tensors), path)
        kind = "clear" if "window" in meta else "published"
    shape_f = _pool_factor(tensors, path)
    window = _meta_int(meta, "window", path)
    down = _meta_int(meta, "down_factor", path)
    if window is not None:
        origin["window"] = "metadata"
    if down is not None:
        origin["down_factor"] = "metadata"
    name_m = _PUBLISHED_NAME.match(path.name)
    if name_m is not None:
        name_r, name_f = int(name_m["r"]), int(name_m["f"] or 1)
        if window is None:
            window, origin["window"] = name_r, "file name"
        if down is None:
            down, origin["down_factor"] = name_f, "file name"
    if shape_f is not None:
        if down is None:
            down, origin["down_factor"] = shape_f, "pooling weights' shape"
        elif down != shape_f:
            raise ClearError(f"weights {path.name}: {origin['down_factor']} says down_factor {down} but the pooling "
                             f"weights are {shape_f}x{shape_f}", "the file is inconsistent; re-export it")
    elif down is not None and down > 1:
        raise ClearError(f"weights {path.name}: down_factor {down} (from the {origin['down_factor']}) but the file "
                         "has no pooling weights (…processor.spatial_weight)", "the file is incomplete; re-export it")
    elif down is None:
        # No pooling weights (and no word otherwise): that is what a down_factor 1 file looks like.
        down, origin["down_factor"] = 1, "no pooling weights"
    return AttnWeights(
        tensors=tensors, kind=kind, window=window, down_factor=down, base_model=_meta_str(meta, "base_model"),
        sha256=file_sha256(path), source=str(spec), path=path, metadata=meta, lora=lora, origin=origin,
    )


# ----------------------------------------------------------------------------------------------- geometry

def resolve_geometry(weights: AttnWeights | None, window: int | None, down_factor: int | None, *,
                     force: bool = False, default_window: int = 16,
                     notes: list[str] | None = None) -> tuple[int, int]:
    """(window, down_factor) to run with: the user's values, the file's, or the defaults; clashes refused.

    `window`/`down_factor` None means "not given by the user". Without weights the defaults apply
    (window 16, down_factor 1). A file whose window is unknown needs --window (never guessed). With `force`, a
    clash runs at the user's value and a note is appended to `notes` (or warned when `notes` is None).
    """
    for name, v in (("window", window), ("down-factor", down_factor)):
        if v is not None and int(v) < 1:
            raise UsageError(f"--{name} {v} must be at least 1", "e.g. --window 16 --down-factor 1")
    if weights is None:
        return int(window or default_window), int(down_factor or 1)
    out: dict[str, int] = {}
    for name, user, have in (("window", window, weights.window), ("down-factor", down_factor, weights.down_factor)):
        if have is None:
            if user is None:
                raise UsageError(f"weights {weights.path.name} do not say their {name.replace('-', '_')} "
                                 "(no metadata, and the file name is not clear_local_{r}[_down_{f}].safetensors)",
                                 f"pass --{name} with the value the weights were trained at")
            out[name] = int(user)
        elif user is not None and int(user) != have:
            if not force:
                src = weights.origin.get(name.replace("-", "_"), "file")
                raise UsageError(f"--{name} {user} clashes with the weights ({name} {have} from the {src} of "
                                 f"{weights.path.name})", f"drop --{name}, or add --force to run at {user} anyway")
            msg = f"--force: running at {name} {user}, the weights were trained at {have}"
            if notes is None:
                warnings.warn(msg, stacklevel=2)
            else:
                notes.append(msg)
            out[name] = int(user)
        else:
            out[name] = int(have)
    return out["window"], out["down-factor"]


# ----------------------------------------------------------------------------------------------- applying

def _modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(transformer.named_modules())


def materialize(transformer: torch.nn.Module, weights: AttnWeights) -> dict[str, torch.Tensor]:
    """Full tensors under the transformer's keys; a LoRA (and `deltas`) is added to the transformer's *current*
    weights.

    Call it while the transformer holds the base weights the LoRA was made against (for deltas: the model's own
    weights, which the delta moves as distillation moved the base's). Checks every key and shape.
    """
    state = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}
    if weights.lora:
        modules = _modules(transformer)
        bad: list[str] = []
        for name, d in weights.lora.items():
            mod = modules.get(name)
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim != 2:
                bad.append(f"{name} (no such linear layer)")
                continue
            if tuple(w.shape) != (d.B.shape[0], d.A.shape[1]):
                bad.append(f"{name} (model {list(w.shape)}, LoRA {[d.B.shape[0], d.A.shape[1]]})")
                continue
            delta = d.B.to(torch.float32) @ d.A.to(torch.float32)
            out[f"{name}.weight"] = (w.detach().to("cpu", torch.float32) + delta).to(w.dtype)
            if d.bias is not None:
                b = getattr(mod, "bias", None)
                if not isinstance(b, torch.Tensor):
                    bad.append(f"{name} (bias delta, but the layer has no bias)")
                    continue
                out[f"{name}.bias"] = (b.detach().to("cpu", torch.float32) + d.bias.to(torch.float32)).to(b.dtype)
        if bad:
            raise ClearError(f"LoRA {weights.path.name} does not fit this model: {_few(bad)}",
                             "was it exported for another base model?")
    if weights.deltas:
        bad = [f"{k} (no such tensor)" if k not in state else f"{k} (model {list(state[k].shape)}, delta "
               f"{list(d.shape)})" for k, d in weights.deltas.items()
               if k not in state or tuple(state[k].shape) != tuple(d.shape)]
        if bad:
            raise ClearError(f"weights {weights.path.name} (a delta against {weights.base_model}) do not fit this "
                             f"model: {_few(bad)}", "the model must share its base's architecture")
        for k, d in weights.deltas.items():
            t = state[k]
            out[k] = (t.detach().to("cpu", torch.float32) + d.to(torch.float32)).to(t.dtype)
    missing = [k for k in weights.tensors if k not in state]
    if missing:
        pool = [k for k in missing if k.endswith(POOL_SUFFIX)]
        if pool and len(pool) == len(missing):
            raise ClearError(f"weights {weights.path.name} carry pooling weights ({_few(pool, 1)}) but the model has "
                             f"no down-sampling processors", f"linearize with down_factor {weights.down_factor} "
                             "before loading them (clear gen does this from the file)")
        raise ClearError(f"weights {weights.path.name} do not fit this model: {len(missing)} key(s) it does not have "
                         f"({_few(missing)})", "were they made for another model?")
    wrong = [f"{k} (file {list(v.shape)}, model {list(state[k].shape)})" for k, v in weights.tensors.items()
             if tuple(v.shape) != tuple(state[k].shape)]
    if wrong:
        raise ClearError(f"weights {weights.path.name} do not fit this model: shapes differ for {_few(wrong)}",
                         "were they made for another model or down_factor?")
    for k, v in weights.tensors.items():
        out[k] = v.to(state[k].dtype)
    return out


def load_tensors(transformer: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy `tensors` into the transformer's parameters/buffers in place; returns the replaced values (CPU clones)."""
    state = transformer.state_dict(keep_vars=True)
    previous: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k, v in tensors.items():
            if k not in state:
                raise ClearError(f"cannot load {k}: the model has no such key")
            target = state[k]
            previous[k] = target.detach().to("cpu", copy=True)
            target.copy_(v.to(device=target.device, dtype=target.dtype))
    return previous


def apply_attention_weights(transformer: torch.nn.Module, weights: AttnWeights) -> dict[str, torch.Tensor]:
    """Check that every key fits the model, then load the weights; returns the replaced tensors (CPU) to undo.

    With down_factor > 1 the CLEAR processors must already be installed (linearize first), since the pooling
    weights live in them.
    """
    return load_tensors(transformer, materialize(transformer, weights))


# ----------------------------------------------------------------------------------------------- writing

def save_attention_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                           metadata: Mapping[str, Any] | None = None) -> Path:
    """Write tensors + metadata as safetensors atomically (temp file in the same folder, then rename).

    Metadata values that are not strings are JSON-encoded (so window=16 is stored as "16").
    """
    from clear_cli.files import save_safetensors

    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items() if v is not None}
    meta[TENSOR_COUNT] = str(len(tensors))  # lets a reader tell a file that lost tensors from a partial one
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save_safetensors(path, clean, metadata=meta)
