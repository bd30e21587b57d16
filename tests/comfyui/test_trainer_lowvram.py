"""The trainer on a partially loaded MODEL (ComfyUI's lowvram): the same LoRA as on a fully loaded one.

On a GPU that cannot hold the model, ComfyUI leaves some layers' weights on the offload device and
comfy.ops casts them to the compute device in every forward. Here (CPU, inside a ComfyUI process,
inproc.py) the trainer's load is followed by `partially_unload` of half the model, which switches
those layers to the cast-per-forward path exactly as a partial load does; the run must give the LoRA
of the fully loaded run, and leave the MODEL's weights as they were.
"""
from __future__ import annotations

import json

import pytest
import torch

import harness
import inproc
from test_trainer_server import inproc_settings

pytestmark = pytest.mark.slow

_LOWVRAM = inproc.TRAINING_PRELUDE + r"""
original = mm.load_models_gpu
state = {"partial": False, "cast": 0}


def load_then_offload_half(models, *args, **kwargs):
    original(models, *args, **kwargs)
    if state["partial"] and models and models[0] is model:
        model.partially_unload(model.offload_device, memory_to_free=model.model_size() // 2)
        state["cast"] = sum(bool(getattr(m, "comfy_cast_weights", False))
                            for m in model.model.diffusion_model.modules())


mm.load_models_gpu = load_then_offload_half
before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
sampler = SamplerConfig(**settings["sampler"])
results = {}
for partial, name in ((False, "lowvram/full"), (True, "lowvram/partial")):
    state["partial"] = partial
    out = inproc.execute(nodes.trainer_node.AlignPropTrainer, **dict(
        train_inputs, model=model, clip=clip, vae=vae, sampler=sampler, prompts="cat\ndog", eval_prompts="cat",
        lora_name=name, reward=smooth))
    results[name] = out.result[3]
after = model.model.diffusion_model.state_dict()
results["unchanged"] = sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
results["cast_layers"] = state["cast"]
json.dump(results, open(out_path, "w"), indent=1)
"""


def test_partially_loaded_model_trains_the_same_lora(comfy_dir, tmp_path):
    from safetensors.torch import load_file

    local = harness.install_random_checkpoint("sd15", tmp_path, comfy_dir)
    settings = json.dumps(inproc_settings(steps=2, eval_batch_size=1))
    inproc.run_script(_LOWVRAM, comfy_dir, tmp_path, str(local), settings, str(tmp_path / "results.json"))
    results = json.loads((tmp_path / "results.json").read_text())
    print("\n[lowvram] " + json.dumps(results, indent=1))
    assert results["cast_layers"] > 0  # layers really took the cast-per-forward path
    assert results["unchanged"]  # the shared MODEL's weights are as they were
    full, partial = load_file(results["lowvram/full"]), load_file(results["lowvram/partial"])
    assert full.keys() == partial.keys() and any(float(v.abs().max()) > 0 for v in full.values())
    for key in full:
        torch.testing.assert_close(partial[key], full[key], atol=1e-6, rtol=1e-5)
