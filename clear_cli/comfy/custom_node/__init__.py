"""CLEAR Attention for ComfyUI (the clear-dit node pack): CLEAR local attention and its weights for FLUX.1.

Installed by `clear comfy install PATH_TO_COMFYUI`, which puts a copy of clear_cli in lib/ beside this file; a
clear_cli installed in ComfyUI's Python (pip install clear-dit) works too. docs/comfyui.md in the clear repository.
"""

import os
import sys

_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
if os.path.isdir(os.path.join(_LIB, "clear_cli")) and _LIB not in sys.path:
    sys.path.insert(0, _LIB)  # the copy `clear comfy install` made wins over any other clear_cli

try:
    from clear_cli.comfy.node import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ImportError as e:  # shown in ComfyUI's log at start-up
    raise ImportError(f"CLEAR Attention cannot load clear_cli ({e}): reinstall the node pack with "
                      "`clear comfy install PATH_TO_COMFYUI`, or pip install clear-dit into ComfyUI's Python") from e

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
