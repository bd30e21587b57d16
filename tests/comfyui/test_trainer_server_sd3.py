"""The AlignProp Trainer node on a real ComfyUI server with a checkpoint ComfyUI detects as SD3.

The checkpoint (harness.UNET_CONFIGS["sd3"]) holds a 2-block SD3.5-medium-like MMDiT, ComfyUI's own
full-size CLIP-L and OpenCLIP-G text encoders (no T5, which SD3 treats as optional) and the 16-channel
VAE, all random. Load Checkpoint gives MODEL, CLIP and VAE; the trainer trains on them with CFG, the
LoRA goes through the standard LoraLoader with no "lora key not loaded" line, and KSampler's image
changes. An SD1.5 CLIP on the SD3 MODEL is refused before any work, naming the loaders to use.
"""
from __future__ import annotations

import time

import pytest

from alignprop_core.lora import load_lora
from test_trainer_server import _messages, _wait_any, assert_lora_changes_ksampler, ksampler_graph, trainer_graph

pytestmark = pytest.mark.slow


def test_sd3_lora_from_the_trainer_loads_in_loraloader_and_changes_ksampler(server, sd3_checkpoint):
    started = time.monotonic()
    server.run(trainer_graph(sd3_checkpoint, "alignprop_test/sd3"), timeout=1200)
    print(f"\n[comfyui] sd3 trainer run: {time.monotonic() - started:.1f} s")
    path = server.models_dir / "loras" / "alignprop_test" / "sd3.safetensors"
    lora = load_lora(path)
    assert lora.metadata["alignprop.step"] == "2" and lora.rank == 4
    assert lora.metadata["modelspec.architecture"].startswith("stable-diffusion-3")
    # the default targets on ComfyUI's MMDiT: the image stream's fused qkv and output projection
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_1_x_block_attn_proj"} <= {
        k.rsplit(".", 2)[0] for k in lora.state if k.endswith("lora_down.weight")}

    assert_lora_changes_ksampler(server, ksampler_graph(sd3_checkpoint, "sd3_plain", None),
                                 ksampler_graph(sd3_checkpoint, "sd3_lora", "alignprop_test/sd3.safetensors"))


def test_a_clip_of_another_family_is_refused_and_nothing_is_written(server, sd3_checkpoint, sd15_checkpoint):
    graph = trainer_graph(sd3_checkpoint, "alignprop_test/sd3_wrong_clip")
    graph["9"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}}
    graph["4"]["inputs"]["clip"] = ["9", 1]
    entry = _wait_any(server, server.queue(graph))
    messages = _messages(entry)
    assert entry["status"]["status_str"] == "error", messages
    assert "does not belong to this SD3 MODEL" in messages and "TripleCLIPLoader" in messages, messages
    assert not list((server.models_dir / "loras").glob("**/sd3_wrong_clip*"))
    assert server.object_info()  # still serving
