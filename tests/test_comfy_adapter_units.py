"""Parts of the ComfyUI adapter that need no ComfyUI: model-family checks and context batching.

nodes/comfy_model.py is loaded from its file, because importing the `nodes` package needs ComfyUI.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

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


spec = importlib.util.spec_from_file_location("alignprop_model_source", ROOT / "nodes" / "model_source.py")
model_source = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model_source)


def test_the_base_model_file_is_found_upstream_through_lora_and_patch_nodes():
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux/flux1-dev-fp8.safetensors",
                                                     "weight_dtype": "fp8_e4m3fn"}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "x.safetensors"}},
        "3": {"class_type": "ModelSamplingFlux", "inputs": {"model": ["2", 0], "max_shift": 1.15}},
        "4": {"class_type": "AlignProp_Trainer", "inputs": {"model": ["3", 0], "lora_name": "out"}},
        "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sub\\sdxl.safetensors"}},
        "6": {"class_type": "AlignProp_Trainer", "inputs": {"model": ["5", 0]}},
    }
    assert model_source.model_file(prompt, "4") == "flux1-dev-fp8.safetensors"
    assert model_source.model_file(prompt, 6) == "sdxl.safetensors"
    assert model_source.base_model_name("Flux", prompt, "4") == "comfyui-Flux (flux1-dev-fp8.safetensors)"


@pytest.mark.parametrize("prompt", [None, {}, {"4": {"inputs": {"model": "not a link"}}},
                                    {"4": {"inputs": {"model": ["9", 0]}}},  # a dangling link
                                    {"1": {"inputs": {"model": ["2", 0]}}, "2": {"inputs": {"model": ["1", 0]}},
                                     "4": {"inputs": {"model": ["1", 0]}}}])  # a cycle
def test_no_base_model_file_when_the_graph_does_not_say(prompt):
    assert model_source.model_file(prompt, "4") is None
    assert model_source.base_model_name("SD15", prompt, "4") == "comfyui-SD15"
