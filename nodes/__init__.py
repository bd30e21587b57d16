"""ComfyUI adapters over `alignprop_core` (reward, sampler, trainer and LoRA nodes).

Thin by design: each node converts ComfyUI objects, calls one core function and wraps the result.
The node classes are added with the ComfyUI integration (issue 4); until then this package exports
no nodes.
"""
NODE_CLASSES: list = []
