"""CLEAR in ComfyUI: a node that runs CLEAR attention (and loads CLEAR weights) on ComfyUI's own FLUX model.

- `keys`: where diffusers' FLUX attention parameters live in ComfyUI's fused layout (shared with `clear export`).
- `patches`: attention files -> ComfyUI `diff` weight patches, pooling weights per block.
- `override`: the attention override ComfyUI calls, the per-call geometry, the fallbacks.
- `node`: `apply_clear(model_patcher, ...)` and the "CLEAR Attention" node class.
- `install`: copies the node pack (`custom_node/`) into a ComfyUI checkout (`clear comfy install`).

Torch only: ComfyUI is imported lazily and only by `node` (this package never needs diffusers). docs/comfyui.md.
"""
