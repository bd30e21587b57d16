"""The trainer's out-of-memory error says what ran out, what to change, and what was kept.

A real out-of-memory needs a GPU; here the reward raises `torch.OutOfMemoryError` (with CUDA's
message) on its N-th call, inside a ComfyUI process without a server (inproc.py), while the node
trains the random SD1.5 checkpoint loaded as CheckpointLoaderSimple loads it. The reward is called
once by the step-0 evaluation and once per training micro-batch, so:

* call 1 fails in the step-0 evaluation: nothing was trained, and the message says so;
* call 3 fails in training step 2: the LoRA after step 1 is saved as <name>-partial at the path the
  message names, it loads, and it records step 1; the final name is not written.
After both errors the same MODEL trains again normally (the LoRA layers were removed).
"""
from __future__ import annotations

import json

import pytest

import harness
import inproc
from test_trainer_server import TRAIN, inproc_settings

pytestmark = pytest.mark.slow

CUDA_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"

_OOM = inproc.TRAINING_PRELUDE + r"""
cuda_message = sys.argv[6]


def reward_failing_at(n):
    calls = {"n": 0}
    def fn(images, prompts):
        calls["n"] += 1
        if calls["n"] == n:
            raise torch.OutOfMemoryError(cuda_message)
        return smooth(images, prompts)
    return FunctionReward(smooth.spec, fn)


results = {}
sampler = SamplerConfig(**settings["sampler"])
for n, name in ((1, "oom/at_eval"), (3, "oom/at_step2"), (None, "oom/after")):
    inputs = dict(train_inputs, model=model, clip=clip, vae=vae, sampler=sampler, prompts="cat\ndog",
                  eval_prompts="cat", lora_name=name, reward=reward_failing_at(n) if n else
                  smooth)
    try:
        out = inproc.execute(nodes.trainer_node.AlignPropTrainer, **inputs)
        results[name] = {"ok": True, "path": out.result[3]}
    except Exception as err:
        results[name] = {"ok": False, "type": type(err).__name__, "message": str(err),
                         "cause": type(err.__cause__).__name__}
json.dump(results, open(out_path, "w"), indent=1)
"""


@pytest.fixture(scope="module")
def oom_results(comfy_dir, tmp_path_factory) -> tuple[dict, object]:
    base = tmp_path_factory.mktemp("oom-base")
    local = harness.install_random_checkpoint("sd15", base, comfy_dir)
    settings = json.dumps(inproc_settings(steps=2, eval_batch_size=1))
    inproc.run_script(_OOM, comfy_dir, base, str(local), settings, str(base / "results.json"), CUDA_MESSAGE)
    results = json.loads((base / "results.json").read_text())
    print("\n[oom] " + json.dumps(results, indent=1))
    return results, base


def test_oom_in_the_first_evaluation_says_nothing_was_trained(oom_results):
    results, _ = oom_results
    result = results["oom/at_eval"]
    assert not result["ok"] and result["type"] == "RuntimeError" and result["cause"] == "OutOfMemoryError"
    message = result["message"]
    assert message.startswith("AlignProp Trainer ran out of memory during the step-0 evaluation"), message
    assert CUDA_MESSAGE in message  # what torch said
    # the settings that decide the memory, and what to change
    for part in ("64x64", "batch_size=1", "eval_batch_size=1", "3 sampler steps with K=1", "lower batch_size",
                 "grad_accum", "eval_batch_size", "width/height", "the sampler's K", "mixed_precision"):
        assert part in message, (part, message)
    assert "turn on" not in message  # both checkpointing switches are already on
    assert "No training step had finished, so no trained LoRA was kept." in message, message
    assert "saved" not in message


def test_oom_in_training_names_the_saved_partial_lora(oom_results):
    from safetensors import safe_open

    from alignprop_core.lora import load_lora

    results, base = oom_results
    result = results["oom/at_step2"]
    assert not result["ok"] and result["cause"] == "OutOfMemoryError", result
    message = result["message"]
    assert "during training, after 1 completed step " in message, message
    path = base / "models" / "loras" / "oom" / "at_step2-partial.safetensors"
    assert f"The LoRA after 1 completed step was saved to {path}" in message, message
    assert "resume" in message
    assert not (base / "models" / "loras" / "oom" / "at_step2.safetensors").exists()
    lora = load_lora(path)
    assert lora.rank == TRAIN["rank"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["alignprop.step"] == "1"
        assert any(float(f.get_tensor(k).abs().max()) > 0 for k in f.keys() if k.endswith("lora_up.weight"))


def test_the_model_trains_normally_after_the_errors(oom_results):
    results, base = oom_results
    result = results["oom/after"]
    assert result["ok"], result
    assert (base / "models" / "loras" / "oom" / "after.safetensors").is_file()


def test_checkpointing_advice_only_when_it_is_off(comfy_dir, tmp_path):
    """The message names the sampler's checkpointing switches only when they are off (no model needed)."""
    code = r"""
import json, sys, torch
import inproc
nodes = inproc.setup(sys.argv[1], sys.argv[2])
from alignprop_core.config import SamplerConfig, TrainConfig
message = nodes.trainer_node._out_of_memory_message(
    torch.OutOfMemoryError("x"), {"steps": 3, "started": True}, TrainConfig(batch_size=4, width=512, height=512),
    SamplerConfig(steps=50, truncation="uniform", k_min=1, k_max=10, checkpoint_unet=False), "/loras/a.safetensors")
json.dump(message, open(sys.argv[3], "w"))
"""
    inproc.run_script(code, comfy_dir, tmp_path, str(tmp_path / "m.json"))
    message = json.loads((tmp_path / "m.json").read_text())
    assert "turn on checkpoint_unet in AlignProp Sampler Settings" in message, message
    assert "checkpoint_vae" not in message
    assert "512x512, batch_size=4" in message and "50 sampler steps with K in [1, 10]" in message
    assert "after 3 completed steps" in message and "saved to /loras/a-partial.safetensors" in message
