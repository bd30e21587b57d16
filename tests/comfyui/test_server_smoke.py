"""Smoke tests against a real ComfyUI 0.3.75 server: it starts, imports this pack, and samples.

The checkpoints are tiny random ones (see harness.make_random_checkpoint) that ComfyUI's own model
detection takes for SD1.5 and SDXL, so the graphs exercise the real loaders, text encoders,
KSampler, VAE and SaveImage.
"""
from __future__ import annotations

import time

import pytest
from PIL import Image

import harness

pytestmark = pytest.mark.slow

CORE_NODES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
              "SaveImage", "LoraLoader"}
# what ComfyUI logs when it loads the text encoder of each detected model family
TEXT_ENCODER_LOG = {"sd15": "Requested to load SD1ClipModel", "sdxl": "Requested to load SDXLClipModel"}


def txt2img_prompt(ckpt_name: str, prefix: str, size: int = 64, steps: int = 2) -> dict:
    """API-format graph: checkpoint -> two prompts -> empty latent -> KSampler -> VAE decode -> save."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a red apple"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def test_object_info_lists_core_nodes(server):
    info = server.object_info()
    missing = CORE_NODES - set(info)
    assert not missing, f"core nodes missing from /object_info: {sorted(missing)}"


def test_pack_imported_without_error(server):
    log = server.log_text()
    assert "Import times for custom nodes" in log, server.log_tail()
    pack_lines = [line for line in log.splitlines() if harness.PACK_NAME in line]
    timing = [line for line in pack_lines if " seconds" in line]
    assert timing, f"{harness.PACK_NAME} does not appear among the imported custom nodes\n{server.log_tail()}"
    problems = [line for line in pack_lines if "IMPORT FAILED" in line or "Cannot import" in line
                or "Error while calling comfy_entrypoint" in line or "Skip " in line]
    assert not problems, "ComfyUI failed to import the pack:\n" + "\n".join(problems) + "\n" + server.log_tail(80)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_txt2img_runs(server, kind, request):
    ckpt_name = request.getfixturevalue(f"{kind}_checkpoint")
    started = time.monotonic()
    entry = server.run(txt2img_prompt(ckpt_name, prefix=f"smoke_{kind}"), timeout=600)
    elapsed = time.monotonic() - started
    print(f"\n[comfyui] {kind} txt2img 64x64, 2 steps: {elapsed:.1f} s")

    assert entry["status"]["status_str"] == "success"
    images = server.output_images(entry)
    assert len(images) == 1 and images[0].is_file(), f"no image written: {entry.get('outputs')}"
    with Image.open(images[0]) as image:
        assert image.size == (64, 64)
    assert TEXT_ENCODER_LOG[kind] in server.log_text(), f"not loaded as {kind}\n{server.log_tail()}"
