"""The AlignProp Trainer node on a real ComfyUI server with FLUX.1-dev as users load it: Load Diffusion
Model with weight_dtype fp8_e4m3fn, DualCLIPLoader (clip_l + t5xxl, type flux) and Load VAE.

The files (harness.cached_random_flux) are random: a FLUX.1 transformer of the width ComfyUI's
detection fixes (3072) with one double and one single block, CLIP-L, and T5-XXL, which is the only
T5 ComfyUI's FLUX text encoder takes (4.7 B parameters, stored as float8: each prompt takes about
half a minute on two CPU cores, so the runs encode few prompts). The trainer trains with the
distilled guidance as input and no CFG pass; the LoRA goes through LoraLoaderModelOnly with no
"lora key not loaded" line and KSampler's image changes. An SD1.5 CLIP with the FLUX.1 MODEL is
refused before any work.
"""
from __future__ import annotations

import time

import pytest

from alignprop_core.lora import load_lora
from test_trainer_server import _messages, _wait_any, assert_lora_changes_ksampler, trainer_graph

pytestmark = pytest.mark.slow

SIZE = 32  # pixels: a 2x2 grid of FLUX tokens


def loaders(files: dict) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet_name"], "weight_dtype": "fp8_e4m3fn"}},
        "11": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": files["clip_l"], "clip_name2": files["t5xxl"],
                                                          "type": "flux"}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": files["vae_name"]}},
    }


def flux_trainer_graph(files: dict, lora_name: str, **overrides) -> dict:
    graph = trainer_graph("unused", lora_name, width=SIZE, height=SIZE, **overrides)
    graph.update(loaders(files))
    graph["4"]["inputs"].update(model=["1", 0], clip=["11", 0], vae=["12", 0], prompts="a cat")
    graph["3"]["inputs"].update(use_cfg=False, guidance_scale=1.0, distilled_guidance=3.5, estimator="truncated",
                                lv_samples=2)
    graph["22"]["inputs"]["eval_batch_size"] = 1
    return graph


def loader_ksampler_graph(loader_nodes: dict, prefix: str, lora_name: str | None, guidance: float | None = None
                          ) -> dict:
    """KSampler (2 euler steps, cfg 1) on loader nodes "1" (MODEL), "11" (CLIP), "12" (VAE), with the
    LoRA through LoraLoaderModelOnly when given, and FluxGuidance when `guidance` is given."""
    graph = dict(loader_nodes)
    model = ["1", 0]
    if lora_name:
        graph["8"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": model, "lora_name": lora_name, "strength_model": 1.0}}
        model = ["8", 0]
    positive = ["2", 0]
    if guidance is not None:
        graph["9"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": positive, "guidance": guidance}}
        positive = ["9", 0]
    graph.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": "a cat"}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": positive, "negative": positive,
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["12", 0]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    })
    return graph


def test_flux_lora_from_the_trainer_loads_in_loraloader_and_changes_ksampler(server, flux_files):
    started = time.monotonic()
    server.run(flux_trainer_graph(flux_files, "alignprop_test/flux"), timeout=1500)
    print(f"\n[comfyui] flux trainer run: {time.monotonic() - started:.1f} s")
    lora = load_lora(server.models_dir / "loras" / "alignprop_test" / "flux.safetensors")
    assert lora.metadata["alignprop.step"] == "2" and lora.rank == 4
    assert lora.metadata["modelspec.architecture"].startswith("flux-1")
    modules = {k.rsplit(".", 2)[0] for k in lora.state if k.endswith("lora_down.weight")}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= modules
    assert max(float(v.abs().max()) for k, v in lora.state.items() if k.endswith("lora_up.weight")) > 0

    plain = loader_ksampler_graph(loaders(flux_files), "flux_plain", None, guidance=3.5)
    patched = loader_ksampler_graph(loaders(flux_files), "flux_lora", "alignprop_test/flux.safetensors", guidance=3.5)
    assert_lora_changes_ksampler(server, plain, patched)


def test_an_sd15_clip_with_the_flux_model_is_refused(server, flux_files, sd15_checkpoint):
    graph = flux_trainer_graph(flux_files, "alignprop_test/flux_wrong_clip")
    del graph["11"]
    graph["9"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}}
    graph["4"]["inputs"]["clip"] = ["9", 1]
    entry = _wait_any(server, server.queue(graph))
    messages = _messages(entry)
    assert entry["status"]["status_str"] == "error", messages
    assert "does not belong to this Flux MODEL" in messages and "DualCLIPLoader" in messages, messages
    assert not list((server.models_dir / "loras").glob("**/flux_wrong_clip*"))
