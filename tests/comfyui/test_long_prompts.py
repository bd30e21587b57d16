"""Prompts over 75 CLIP tokens on a real ComfyUI server: the trainer and the preview sampler run.

CLIP encodes a long prompt to 154 context tokens instead of 77, so a long prompt with a short
negative prompt (or the other way round), or a long and a short prompt in one batch, give
contexts of different lengths; they are batched by repeating to a common length, as ComfyUI does.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from alignprop_core.lora import load_lora
from test_trainer_server import SAMPLER, trainer_graph

pytestmark = pytest.mark.slow

WORDS = "a small red cat sits on a blue mat in a sunny garden next to an old stone wall with green ivy".split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(100))  # 100 one-token words: two CLIP chunks


def preview_graph(ckpt: str, prefix: str, prompt: str, negative_prompt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "AlignProp_SamplerSettings", "inputs": {**SAMPLER, "steps": 2}},
        "3": {"class_type": "AlignProp_PreviewSampler",
              "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "sampler": ["2", 0],
                         "prompt": prompt, "negative_prompt": negative_prompt, "width": 64, "height": 64,
                         "seed": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": prefix}},
    }


CASES = {"long_prompt": (f"{LONG}\ncat", ""), "long_negative": ("cat\ndog", LONG), "long_only": (LONG, "")}


@pytest.mark.parametrize("case", ["long_prompt", "long_negative"])
def test_trainer_runs_with_long_prompts(server, sd15_checkpoint, case):
    """eval_batch_size 2 puts both training prompts in one evaluation batch."""
    prompts, negative = CASES[case]
    name = f"alignprop_test/long_{case}"
    server.run(trainer_graph(sd15_checkpoint, name, prompts=prompts, negative_prompt=negative, steps=1),
               timeout=900)
    lora = load_lora(server.models_dir / "loras" / f"{name}.safetensors")
    assert lora.metadata["alignprop.step"] == "1"


@pytest.mark.parametrize("kind, case", [("sd15", "long_prompt"), ("sd15", "long_negative"),
                                        ("sdxl", "long_only")])
def test_preview_sampler_runs_with_long_prompts(server, kind, case, request):
    ckpt = request.getfixturevalue(f"{kind}_checkpoint")
    prompt, negative = CASES[case]
    started = time.monotonic()
    entry = server.run(preview_graph(ckpt, f"long_{kind}_{case}", prompt, negative), timeout=900)
    print(f"\n[comfyui] {kind} preview, {case}: {time.monotonic() - started:.1f} s")
    paths = server.output_images(entry)
    assert len(paths) == len(prompt.splitlines())
    for path in paths:
        image = np.asarray(Image.open(path))
        assert image.shape == (64, 64, 3)
