"""The toy world: a procedurally generated captioned shapes set (`shapes`), a tiny latent diffusion
model of the SD1.x family pretrained on it (`networks`, `pretrain`), and the count / colour / shape
classifier that turns it into a meaningful, download-free reward (`classifier`).

The pretrained weights ship in `alignprop_core/data/toy_world/` (a diffusers
StableDiffusionPipeline folder plus classifier.safetensors and pretrain_info.json).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path


def toy_model_dir() -> Path:
    """The shipped toy-world model folder (loads with `load_t2i_model` and with diffusers)."""
    return Path(str(resources.files("alignprop_core.data").joinpath("toy_world")))
