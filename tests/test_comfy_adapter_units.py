"""Parts of the ComfyUI adapter that need no ComfyUI: model-family checks and context batching.

nodes/comfy_model.py is loaded from its file, because importing the `nodes` package needs ComfyUI.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("alignprop_comfy_model", ROOT / "nodes" / "comfy_model.py")
comfy_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(comfy_model)


def _fake_model(config_class_name: str):
    config_cls = type(config_class_name, (), {})
    inner = type("BaseModel", (), {"model_config": config_cls()})()
    return type("ModelPatcher", (), {"model": inner})()


@pytest.mark.parametrize("name", ["SD15", "SDXL", "SD3", "Flux", "FluxSchnell", "ZImage"])
def test_supported_families_are_recognised(name):
    assert comfy_model.model_family(_fake_model(name)) == name


@pytest.mark.parametrize("name", ["SDXLRefiner", "SD15_instructpix2pix", "WAN21_T2V", "FluxInpaint", "Flux2",
                                  "Chroma", "StableAudio", "Lumina2", "QwenImage"])
def test_other_families_are_refused_by_name(name):
    with pytest.raises(ValueError) as err:
        comfy_model.model_family(_fake_model(name))
    message = str(err.value)
    assert name in message and "SD1.x (SD15), SDXL, SD3/SD3.5 (SD3), FLUX.1 dev/schnell (Flux, FluxSchnell) and Z-Image" in message
