"""ComfyUI adapters over `alignprop_core`: reward, sampler, trainer (with its settings) and LoRA nodes.

Thin by design: each node converts ComfyUI objects, calls one core function and wraps the result.
`comfy_model.py` is the only module that knows ComfyUI's model internals.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import live_view, lora_nodes, reward_nodes, sampler_nodes, settings_nodes, trainer_node
from .paths import register_reward_folder

NODE_CLASSES: list[type[io.ComfyNode]] = [
    *reward_nodes.NODES, *sampler_nodes.NODES, *trainer_node.NODES, *settings_nodes.NODES, *lora_nodes.NODES,
]


class AlignPropExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_reward_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODE_CLASSES


async def comfy_entrypoint() -> AlignPropExtension:
    # ComfyUI 0.3.75 never calls on_load, and the schemas list models/reward_models, so register here too.
    register_reward_folder()
    live_view.register_routes()
    return AlignPropExtension()
