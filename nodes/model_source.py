"""The file a node's MODEL came from, read off the queued prompt graph.

ComfyUI's MODEL object does not know its file. The prompt graph does: following the `model` input
upstream through LoRA loaders, patches and model-sampling nodes reaches the loader node, whose
file input (`ckpt_name`, `unet_name`) names it. Used only to label the trained LoRA's base model.
"""
from __future__ import annotations

import os

FILE_INPUTS = ("ckpt_name", "unet_name")  # Load Checkpoint, Load Diffusion Model (and their variants)
MAX_HOPS = 256  # a graph is acyclic; this only bounds a malformed one


def model_file(prompt: dict | None, node_id, socket: str = "model") -> str | None:
    """The base name of the file node `node_id`'s `socket` input was loaded from, or None when the
    graph does not say (no graph, a loader without a file input, a MODEL made by custom code)."""
    if not isinstance(prompt, dict):
        return None
    node = prompt.get(str(node_id))
    for _ in range(MAX_HOPS):
        link = (node or {}).get("inputs", {}).get(socket)
        if not (isinstance(link, list) and len(link) == 2):
            return None
        node, socket = prompt.get(str(link[0])), "model"
        inputs = (node or {}).get("inputs", {})
        for name in FILE_INPUTS:
            if isinstance(inputs.get(name), str):
                return os.path.basename(inputs[name].replace("\\", "/"))
    return None


def base_model_name(family: str, prompt: dict | None, node_id) -> str:
    """What the LoRA's metadata calls its base model: `comfyui-<family>`, with the file when known."""
    file = model_file(prompt, node_id)
    return f"comfyui-{family}" + (f" ({file})" if file else "")
