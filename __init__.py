"""ComfyUI entry point of the ComfyUI-AlignProp node pack.

ComfyUI imports this folder as a package from `custom_nodes/`. The algorithm lives in
`alignprop_core/` (usable without ComfyUI); `nodes/` holds the thin ComfyUI adapters.
"""
from .nodes import NODE_CLASSES

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODE_CLASSES}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = None

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
