"""ComfyUI entry point of the ComfyUI-AlignProp node pack.

ComfyUI imports this folder as a package from `custom_nodes/` and calls `comfy_entrypoint`. The
algorithm lives in `alignprop_core/` (usable without ComfyUI); `nodes/` holds the thin adapters.
"""
import importlib.util
import os
import sys

# ComfyUI imports this folder as a package but does not put it on sys.path; the nodes import the
# core library by its own name. Appended, so ComfyUI's own top-level modules keep precedence.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

# the frontend extension (the trainer's live view), served by ComfyUI at /extensions/<pack>/
WEB_DIRECTORY = "./web"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: E402,F401 (what ComfyUI looks for)
# else: imported outside ComfyUI (pytest collects the repo root as a package): there are no nodes

