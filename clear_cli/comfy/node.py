"""The "CLEAR Attention" ComfyUI node: CLEAR local attention (and its weights) on a ComfyUI FLUX model.

    model -> CLEAR Attention (weights, strength, window, down_factor, backend) -> KSampler

`apply_clear(model_patcher, ...)` does the work and is what tests call; `ClearAttention` is the node (ComfyUI's V1
node API, which every ComfyUI version loads). It clones the model and:

1. adds the file's projections as `diff` patches on ComfyUI's own (fused) keys (`clear_cli.comfy.patches`), scaled
   by `strength`, so other LoRAs stack with it; with `apply_weights` off it takes only window, down_factor and the
   pooling weights from the file (for a LoRA already loaded by LoraLoaderModelOnly: `clear export --format comfy`);
2. installs the attention override chained to the one set before (`clear_cli.comfy.override`), a DIFFUSION_MODEL
   wrapper that gives it each call's grid, re-installs it on ON_PREPARE_STATE and resets its per-run state on
   ON_CLEANUP (as ComfyUI's own sparse-attention node does);
3. optionally scales RoPE's theta (NTK, `ntk_factor`) by an object patch of the model's `pe_embedder`.

ComfyUI is imported lazily (for the patcher constants and folder lists): the rest runs against any object with
ModelPatcher's methods, which is how CI tests it without ComfyUI.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from clear_cli.comfy.override import KEY, ClearPatch, flux1_reason, settings
from clear_cli.errors import ClearError

log = logging.getLogger("clear_cli.comfy")

FOLDER = "clear"  # ComfyUI models/clear: attention files; the node also lists models/loras
NONE = "none"
DIFFUSION_MODEL = "diffusion_model"  # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
ON_PREPARE_STATE = "on_prepare_state"  # comfy.patcher_extension.CallbacksMP.ON_PREPARE_STATE
ON_CLEANUP = "on_cleanup"  # comfy.patcher_extension.CallbacksMP.ON_CLEANUP


def _patcher_constants() -> tuple[str, str, str]:
    try:
        from comfy.patcher_extension import CallbacksMP, WrappersMP
    except ImportError:  # a stand-in patcher (tests): the strings ComfyUI uses
        return DIFFUSION_MODEL, ON_PREPARE_STATE, ON_CLEANUP
    return WrappersMP.DIFFUSION_MODEL, CallbacksMP.ON_PREPARE_STATE, CallbacksMP.ON_CLEANUP


def _base_lookup(model: Any):
    """base(key) -> the model's unpatched tensor for a ComfyUI key (whatever patches the patcher holds)."""
    entries = model.get_key_patches("diffusion_model.")

    def base(key: str):
        weight, convert = entries[key][0][:2]
        if convert is None:
            return weight
        try:
            return convert(weight, inplace=False)
        except TypeError:
            return convert(weight)

    return base


def apply_clear(model: Any, weights: str | None = None, *, strength: float = 1.0, window: int | None = None,
                down_factor: int | None = None, backend: str = "auto", apply_weights: bool = True,
                proportional_attention: bool = False, ntk_factor: float = 1.0,
                train_seq_len: int | None = None) -> Any:
    """A clone of ComfyUI model patcher `model` running CLEAR attention (see the module docstring).

    weights: a local file or REPO:FILE (our attention file, a published checkpoint, our LoRA or our ComfyUI LoRA),
    or None for CLEAR without new weights (zero-shot, or a LoRA loaded already). window / down_factor: None (or 0)
    takes the file's; a different value runs at it with a warning. Raises ClearError with the fix.
    """
    from clear_cli.comfy.patches import load_weights, pool_weights, weight_patches
    from clear_cli.models.weights import resolve_geometry

    wrapper_type, prepare_type, cleanup_type = _patcher_constants()
    if model.get_wrappers(wrapper_type, KEY):
        raise ClearError("CLEAR Attention is already applied to this model",
                         "apply it once: a second node would add the weights twice")
    dm = model.get_model_object("diffusion_model")
    reason = flux1_reason(dm)
    w = load_weights(weights) if weights else None
    notes: list[str] = []
    win, f = resolve_geometry(w, window or None, down_factor or None, force=True, notes=notes)
    pools = pool_weights(w) if w is not None else {}
    if pools and w.down_factor != f:
        if f != 1:
            raise ClearError(f"weights {w.path.name} hold {w.down_factor}x{w.down_factor} pooling weights, which do "
                             f"not run at down_factor {f}", "set down_factor to 0 (the file's) or 1")
        pools = {}
    if pools and reason is None:
        want = {("double", i) for i in range(len(dm.double_blocks))} | \
               {("single", i) for i in range(len(dm.single_blocks))}
        if set(pools) != want:
            odd = sorted(set(pools) ^ want)[0]
            raise ClearError(f"weights {w.path.name}: the pooling weights do not match the model's blocks (e.g. "
                             f"{odd[0]} block {odd[1]} is {'missing' if odd in want else 'extra'})",
                             "were they made for another FLUX model?")
    if f > 1 and not pools:
        notes.append(f"down_factor {f} with the initial pooling weights (1/{f * f} each): none came from a file")
    cfg = settings(win, f, backend, proportional_attention=proportional_attention, train_seq_len=train_seq_len,
                   ntk_factor=None if ntk_factor in (None, 1.0) else float(ntk_factor))

    m = model.clone()
    if w is not None and apply_weights:
        if reason is not None:
            raise ClearError(f"cannot apply {w.path.name}: {reason}", "CLEAR's weights are for FLUX.1 models")
        patches = weight_patches(w, _base_lookup(model), int(dm.hidden_size))
        added = m.add_patches(patches, float(strength))
        if added is not None and len(added) != len(patches):
            missing = sorted(str(k) for k in set(patches) - set(added))
            raise ClearError(f"ComfyUI did not take {len(missing)} weight patch(es) from {w.path.name} "
                             f"(e.g. {missing[0]})", "is the model a FLUX.1 checkpoint?")
    elif w is not None and strength != 1.0:
        notes.append("strength applies to weights the node adds; with apply_weights off it is not used")
    if reason is not None:
        notes.append(f"{reason}: every attention call will use the previous attention, not CLEAR")
    patch = ClearPatch(cfg, pools, model_reason=reason)
    patch.install(m.model_options.setdefault("transformer_options", {}))
    m.add_wrapper_with_key(wrapper_type, KEY, patch.wrapper)
    m.add_callback_with_key(prepare_type, KEY, patch.prepare_state)
    m.add_callback_with_key(cleanup_type, KEY, patch.cleanup)
    if cfg.ntk_factor is not None:
        pe = m.get_model_object("diffusion_model.pe_embedder")
        scaled = copy.copy(pe)  # ComfyUI's EmbedND keeps theta as a plain attribute and has no parameters
        scaled.theta = pe.theta * cfg.ntk_factor
        m.add_object_patch("diffusion_model.pe_embedder", scaled)
    for note in notes:
        log.warning("CLEAR attention: %s", note)
    log.info("CLEAR attention: window %d, down_factor %d, backend %s%s", win, f, backend,
             f", weights {w.path.name} x {strength}" if w is not None and apply_weights else "")
    return m


# ----------------------------------------------------------------------------------------------- the node

def _register_folder() -> None:
    import os

    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                       {".safetensors"})
        for path in folder_paths.get_folder_paths("loras"):
            folder_paths.add_model_folder_path(FOLDER, path)


def weight_choices() -> list[str]:
    try:
        import folder_paths

        _register_folder()
        return [NONE] + sorted(folder_paths.get_filename_list(FOLDER))
    except ImportError:
        return [NONE]


class ClearAttention:
    """ComfyUI node: CLEAR local attention for FLUX (docs/comfyui.md)."""

    DESCRIPTION = ("CLEAR local attention for FLUX.1: each image token attends to the image tokens within `window` "
                   "tokens (16 px each) plus all text, so attention cost grows linearly with image size. Load a CLEAR "
                   "attention file (distilled or Huage001/CLEAR) to give the model back its quality.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "model_patches/CLEAR"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        from clear_cli.attention import BACKENDS

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A FLUX.1 model (dev, schnell, fine-tunes)."}),
                "weights": (weight_choices(), {"tooltip": "CLEAR attention file from models/clear or models/loras "
                                                          "(ours, a published clear_local_*.safetensors, or our "
                                                          "LoRA), or none."}),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "Scale of the weight change (1 = the file's weights)."}),
                "window": ("INT", {"default": 0, "min": 0, "max": 4096,
                                   "tooltip": "Radius in tokens (16 px each); 0 = the file's (16 without a file)."}),
                "down_factor": ("INT", {"default": 0, "min": 0, "max": 64,
                                        "tooltip": "Pooled key/value factor; 0 = the file's (1 without a file)."}),
                "backend": (list(BACKENDS), {"default": "auto",
                                             "tooltip": "auto: FlexAttention on CUDA, tiled SDPA elsewhere."}),
            },
            "optional": {
                "weights_path": ("STRING", {"default": "", "tooltip": "Instead of the list: a local path or REPO:FILE "
                                            "on the hub, e.g. Huage001/CLEAR:clear_local_16.safetensors."}),
                "apply_weights": ("BOOLEAN", {"default": True, "tooltip": "Off when a LoRA loader already applied "
                                              "this file's weights: then only window, down_factor and pooling "
                                              "weights are read from it."}),
                "proportional_attention": ("BOOLEAN", {"default": False, "tooltip": "Softmax scale sqrt(log N / log "
                                                       "N_train / d): on for images above ~1K (the authors)."}),
                "ntk_factor": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1000.0, "step": 0.1,
                                         "tooltip": "RoPE theta x factor (NTK): the authors use 10 above 1K, 1 = off"}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, weights=NONE, weights_path="", **kwargs):  # noqa: N802 (ComfyUI's name)
        """Re-run when the weight file changes on disk, not only when the inputs do."""
        import os

        spec = (weights_path or "").strip()
        if not spec and weights and weights != NONE:
            try:
                import folder_paths

                _register_folder()
                spec = folder_paths.get_full_path(FOLDER, weights) or weights
            except ImportError:
                spec = weights
        try:
            st = os.stat(spec)
            return f"{spec}:{st.st_size}:{st.st_mtime_ns}"
        except (OSError, TypeError, ValueError):
            return spec  # a hub reference (its cache is content-addressed) or nothing

    def apply(self, model, weights, strength, window, down_factor, backend, weights_path="", apply_weights=True,
              proportional_attention=False, ntk_factor=1.0):
        spec = (weights_path or "").strip() or None
        if spec is None and weights and weights != NONE:
            import folder_paths

            _register_folder()
            spec = folder_paths.get_full_path(FOLDER, weights)
            if spec is None:
                raise FileNotFoundError(f"CLEAR Attention: {weights} is not in models/{FOLDER} or models/loras")
        try:
            out = apply_clear(model, spec, strength=strength, window=window or None,
                              down_factor=down_factor or None, backend=backend, apply_weights=apply_weights,
                              proportional_attention=proportional_attention, ntk_factor=ntk_factor)
        except ClearError as e:  # ComfyUI shows the exception's text in the node: message and fix on one line
            text = e.one_line()[len("error: "):].replace("--down-factor", "down_factor").replace("--window", "window")
            raise ValueError("CLEAR Attention: " + text) from None
        return (out,)


NODE_CLASS_MAPPINGS = {"ClearAttention": ClearAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"ClearAttention": "CLEAR Attention"}
