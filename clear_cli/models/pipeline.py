"""The one way every command gets a FLUX pipeline: `load_pipeline(model, device=, dtype=)`."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import FluxPipeline as _StockFluxPipeline

from clear_cli.errors import ClearError
from clear_cli.flux import (
    DEFAULT_MODEL, QWEN_TINY_MODELS, RANDOM_MODELS, TINY_MODELS, TINY_VIDEO_MODELS, WAN_TINY_MODELS,
)
from clear_cli.models import tiny
from clear_cli.models.text import text_len


class FluxPipeline(_StockFluxPipeline):
    """Stock FluxPipeline whose default `max_sequence_length` is the model's own text length.

    FLUX.1-dev's T5 tokenizer says 512 (the stock default); the tiny model says 32, and a model sampled at a
    text length it was not trained at stops following prompts (DESIGN.md §8). Saved, it is a plain
    FluxPipeline directory that stock diffusers loads.
    """

    def __call__(self, *args, **kwargs):
        kwargs.setdefault("max_sequence_length", text_len(self))
        return super().__call__(*args, **kwargs)


def _adopt(pipe: _StockFluxPipeline) -> FluxPipeline:
    pipe.__class__ = FluxPipeline
    return pipe


def build_tiny(random: bool = False, seed: int = 0) -> FluxPipeline:
    """The built-in tiny FLUX on CPU in fp32 (`random=True`: untrained weights)."""
    comps = tiny.build_components(seed=seed)
    if not random:
        if tiny.TINY_WEIGHTS.is_file():
            tiny.load_trained(comps)
        else:
            warnings.warn("trained tiny weights are not shipped in this build; using tiny-random", stacklevel=2)
    pipe = FluxPipeline(**comps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_flux_dev_random(device: torch.device, dtype: torch.dtype, seed: int = 0) -> FluxPipeline:
    """FLUX.1-dev's architecture with seeded random weights, built directly on `device` (meta: structure only)."""
    from clear_cli.models import fit, flux_dev

    if device.type != "meta":
        fit.check_load(flux_dev.NAME, device, dtype)  # refuse before allocating what cannot fit
    pipe = FluxPipeline(**flux_dev.build_components(device, dtype, seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _hub_error(model: str, err: Exception) -> ClearError:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    gated = "gated" in text.lower() or "401" in text or "403" in text
    why = "is gated: accept its license on the hub and log in" if gated else "could not be loaded"
    return ClearError(
        f"model {model!r} {why} ({text})",
        "run `huggingface-cli login`, pass a local diffusers directory with --model DIR, or try --model tiny",
    )


def _stock_class(path: Path):
    """The diffusers pipeline class a local directory names, if a model adapter knows its transformer; otherwise
    UsageError (exit 2) in one line listing the families."""
    import json

    import diffusers

    from clear_cli.attention.adapters import ADAPTERS, VIDEO_ADAPTERS, families

    index = json.loads((path / "model_index.json").read_text())
    name = str(index.get("_class_name", ""))
    tr = index.get("transformer") or [None, None]
    tr_class = str(tr[1]) if isinstance(tr, list) and len(tr) > 1 else ""
    known = [a for a in (*ADAPTERS, *VIDEO_ADAPTERS) if tr_class in a.transformer_classes or name in a.pipeline_classes]
    if name == "FluxPipeline" or tr_class == "FluxTransformer2DModel":
        return _StockFluxPipeline
    if not known or not hasattr(diffusers, name):
        from clear_cli.errors import UsageError
        raise UsageError(f"{path} holds a {name or 'pipeline'} ({tr_class or 'no transformer'}), a family with no "
                         f"CLEAR model adapter; families: {', '.join(families())}",
                         "see docs/models.md to add one")
    return getattr(diffusers, name)


def check_model_family(model: str) -> None:
    """Before any work: a local diffusers directory whose pipeline no model adapter knows is refused (UsageError,
    one line listing the families). Built-in names and hub ids pass (a hub model is checked once loaded)."""
    path = Path(str(model)).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        _stock_class(path)


def require_family(pipe, families: tuple[str, ...], command: str) -> None:
    """UsageError (one line) when `command` does not run on the pipeline's model family yet."""
    from clear_cli.attention.adapters import adapter_for
    from clear_cli.errors import UsageError

    adapter = adapter_for(pipe.transformer)
    family = adapter.family if adapter is not None else type(pipe.transformer).__name__
    if family not in families:
        raise UsageError(f"{command} does not run on {family} models yet (it is built on FLUX's T5 + CLIP "
                         f"conventions); it runs on: {', '.join(families)}",
                         "on this family use clear gen / clear export, or the Python API (docs/models.md)")


def _check_family(pipe, name: str) -> None:
    from clear_cli.attention.adapters import adapter_for, families
    from clear_cli.errors import UsageError

    tr = getattr(pipe, "transformer", None)
    if not isinstance(tr, torch.nn.Module) or adapter_for(tr) is None:
        raise UsageError(f"model {name!r} is a {type(pipe).__name__} ({type(tr).__name__}), a family with no CLEAR "
                         f"model adapter; families: {', '.join(families())}", "see docs/models.md to add one")


def load_pipeline(model: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None, seed: int = 0) -> FluxPipeline:
    """A diffusers FluxPipeline from a hub id, a local diffusers directory, `tiny`, `tiny-random` or
    `flux-dev-random` (FLUX.1-dev's architecture, random weights; `device="meta"` builds it without storage).
    `tiny-wan` / `tiny-wan-random` return the built-in tiny Wan instead (a WanPipeline: video, not FLUX).

    device: auto|cpu|cuda[:N] (None = leave on CPU); dtype: auto|fp32|bf16|fp16 (auto: bf16 on CUDA, fp32 on CPU).
    """
    from clear_cli.devices import resolve_device, resolve_dtype

    name = str(model)
    if str(device) == "meta":
        if name not in RANDOM_MODELS:
            raise ClearError(f"--device meta builds only {', '.join(RANDOM_MODELS)} (structure without weights)",
                             "use cpu or cuda for other models")
        return build_flux_dev_random(torch.device("meta"), resolve_dtype(
            "bf16" if dtype in (None, "auto") else dtype, torch.device("meta")), seed=seed)
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    dt = resolve_dtype(dtype, dev)
    if name in RANDOM_MODELS:
        pipe = build_flux_dev_random(dev, dt, seed=seed)
    elif name in TINY_MODELS:
        pipe = build_tiny(random=name == "tiny-random", seed=seed)
    elif name in TINY_VIDEO_MODELS:
        from clear_cli.models import tiny_wan

        pipe = tiny_wan.build_pipeline(random=name == "tiny-wan-random", seed=seed)
    elif name in QWEN_TINY_MODELS:
        from clear_cli.models import qwen_image
        pipe = qwen_image.build(seed=seed)
    elif name in WAN_TINY_MODELS:
        from clear_cli.models import wan
        pipe = wan.build(seed=seed)
    else:
        path = Path(name).expanduser()
        if path.exists():
            if not (path / "model_index.json").is_file():
                raise ClearError(f"{path} is not a diffusers pipeline directory (no model_index.json)",
                                 "pass the folder that `save_pretrained` wrote, a hub id, or --model tiny")
            source = str(path)
            stock = _stock_class(path)
        elif name.startswith((".", "/", "~")):
            raise ClearError(f"local model directory {path} does not exist",
                             "check the path, pass a hub id (owner/name), or --model tiny")
        elif name.count("/") != 1:
            raise ClearError(f"model {name!r} is neither a local directory nor a hub id (owner/name)",
                             "e.g. --model black-forest-labs/FLUX.1-dev, --model ./my_flux or --model tiny")
        else:
            source = name
            from diffusers import DiffusionPipeline as stock   # the repo's model_index names the class
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # its "couldn't connect" warnings would bury our one-line error
        try:
            pipe = stock.from_pretrained(source, dtype=dt)
        except ClearError:
            raise
        except (OSError, ValueError, EnvironmentError, ImportError) as e:
            raise _hub_error(name, e) from e
        except Exception as e:  # huggingface_hub raises its own error types for gated/missing repos
            if type(e).__module__.startswith(("huggingface_hub", "requests", "httpx")):
                raise _hub_error(name, e) from e
            raise
        finally:
            dlogging.set_verbosity(level)
        _check_family(pipe, name)
        if isinstance(pipe, _StockFluxPipeline):
            pipe = _adopt(pipe)
        else:
            from clear_cli.models import qwen_image

            if qwen_image.is_tiny_tokenizer(pipe):   # a saved qwen-image-tiny-random: no chat template to drop
                pipe = qwen_image.adopt(pipe)
    if dt != pipe.transformer.dtype:
        pipe = pipe.to(dtype=dt)
    return pipe.to(device=dev)


def save_pipeline(pipe, path: str | Path) -> Path:
    """Write a pipeline as a normal diffusers directory (stock `FluxPipeline.from_pretrained` loads it)."""
    out = Path(path)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out
