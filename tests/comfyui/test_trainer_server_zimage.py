"""The AlignProp Trainer node on a real ComfyUI server with Z-Image as users load it: Load Diffusion
Model, CLIPLoader (type lumina2) with the Qwen3-4B text encoder, and Load VAE.

The files (harness.cached_random_zimage) are random: a Z-Image NextDiT of the width ComfyUI's
detection fixes (3840) with one main layer besides its fixed two noise and two context refiners, and
Qwen3-4B, which CLIPLoader always builds at its full 36 layers (4 B parameters, stored as float8:
each prompt takes tens of seconds on two CPU cores, so the runs encode one prompt). The trainer
trains without a CFG pass (Z-Image Turbo's use); the LoRA goes through LoraLoaderModelOnly with no
"lora key not loaded" line and KSampler's image changes. An SD1.5 CLIP with the Z-Image MODEL is
refused before any work.
"""
from __future__ import annotations

import time

import pytest

from alignprop_core.lora import load_lora
from test_trainer_server import _messages, _wait_any, assert_lora_changes_ksampler, trainer_graph
from test_trainer_server_flux import SIZE, loader_ksampler_graph  # SIZE: 2x2 tokens of Z-Image too

pytestmark = pytest.mark.slow


def loaders(files: dict) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet_name"], "weight_dtype": "default"}},
        "11": {"class_type": "CLIPLoader", "inputs": {"clip_name": files["qwen3_4b"], "type": "lumina2",
                                                      "device": "default"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae_name"]}},
    }


def zimage_trainer_graph(files: dict, lora_name: str, **overrides) -> dict:
    graph = trainer_graph("unused", lora_name, width=SIZE, height=SIZE, **overrides)
    graph.update(loaders(files))
    graph["4"]["inputs"].update(model=["1", 0], clip=["11", 0], vae=["12", 0], prompts="a cat")
    graph["3"]["inputs"].update(use_cfg=False, guidance_scale=1.0)
    graph["22"]["inputs"]["eval_batch_size"] = 1
    return graph


def test_zimage_lora_from_the_trainer_loads_in_loraloader_and_changes_ksampler(server, zimage_files):
    started = time.monotonic()
    server.run(zimage_trainer_graph(zimage_files, "alignprop_test/zimage"), timeout=1500)
    print(f"\n[comfyui] z-image trainer run: {time.monotonic() - started:.1f} s")
    lora = load_lora(server.models_dir / "loras" / "alignprop_test" / "zimage.safetensors")
    assert lora.metadata["alignprop.step"] == "2" and lora.rank == 4
    assert lora.metadata["modelspec.architecture"].startswith("z-image")
    assert lora.metadata["alignprop.base_model"] == f"comfyui-ZImage ({zimage_files['unet_name']})"
    modules = {k.rsplit(".", 2)[0] for k in lora.state if k.endswith("lora_down.weight")}
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_layers_0_attention_out",
            "lora_unet_noise_refiner_1_attention_qkv", "lora_unet_context_refiner_0_attention_out"} <= modules
    assert max(float(v.abs().max()) for k, v in lora.state.items() if k.endswith("lora_up.weight")) > 0

    assert_lora_changes_ksampler(server, loader_ksampler_graph(loaders(zimage_files), "zimage_plain", None),
                                 loader_ksampler_graph(loaders(zimage_files), "zimage_lora",
                                                       "alignprop_test/zimage.safetensors"))


def test_an_sd15_clip_with_the_zimage_model_is_refused(server, zimage_files, sd15_checkpoint):
    graph = zimage_trainer_graph(zimage_files, "alignprop_test/zimage_wrong_clip")
    del graph["11"]
    graph["9"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}}
    graph["4"]["inputs"]["clip"] = ["9", 1]
    entry = _wait_any(server, server.queue(graph))
    messages = _messages(entry)
    assert entry["status"]["status_str"] == "error", messages
    assert "does not belong to this ZImage MODEL" in messages and "CLIPLoader" in messages, messages
    assert not list((server.models_dir / "loras").glob("**/zimage_wrong_clip*"))
