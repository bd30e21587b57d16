"""Cancel at three points, resume, and get the uninterrupted run's LoRA (the trainer node, CPU, same seed).

Inside a ComfyUI process without a server (inproc.py), the reward sets ComfyUI's interrupt flag on
its N-th call, exactly what the Cancel button does. The reward is called once per evaluation batch
and once per training micro-batch; with eval_every=2 and 4 steps the calls are: 1 the step-0
evaluation, 2-3 steps 1-2, 4 the evaluation after step 2, 5-6 steps 3-4, 7 the final evaluation. So:

* call 1: Cancel during the step-0 evaluation (it finishes; nothing is trained);
* call 3: Cancel in the middle of step 2: ComfyUI's next operation (in the backward pass) raises,
  the step is abandoned and its random draws are given back, so the partial LoRA is step 1's;
* call 4: Cancel between steps 2 and 3 (during the evaluation after step 2).
Each cancelled run raises ComfyUI's InterruptProcessingException and keeps <name>-partial and its
training state; the same node with resume on then finishes it, and the final LoRA is bit-identical
to the LoRA of a run that was never cancelled.
"""
from __future__ import annotations

import json

import pytest
import torch

import harness
import inproc
from test_trainer_server import inproc_settings

pytestmark = pytest.mark.slow

_RESUME = inproc.TRAINING_PRELUDE + r"""

def cancelling_at(n):
    calls = {"n": 0}
    def fn(images, prompts):
        calls["n"] += 1
        if calls["n"] == n:
            mm.interrupt_current_processing(True)  # what ComfyUI's Cancel does
        return smooth(images, prompts)
    return FunctionReward(smooth.spec, fn)


def run(name, reward, **extra):
    mm.interrupt_current_processing(False)
    inputs = dict(train_inputs, model=model, clip=clip, vae=vae, sampler=SamplerConfig(**settings["sampler"]),
                  prompts="cat\ndog\nhorse", eval_prompts="cat", lora_name=name, reward=reward, **extra)
    try:
        out = inproc.execute(nodes.trainer_node.AlignPropTrainer, **inputs)
        return {"ok": True, "path": out.result[3]}
    except mm.InterruptProcessingException:
        return {"ok": False, "interrupted": True}
    except Exception as err:
        return {"ok": False, "type": type(err).__name__, "message": str(err)}


results = {"full": run("resume/full", smooth)}
for call in (1, 3, 4):
    name = f"resume/cancel_at_{call}"
    results[name] = {"cancelled": run(name, cancelling_at(call)),
                     "resumed": run(name, smooth, resume=True)}
results["no_state"] = run("resume/never_ran", smooth, resume=True)
json.dump(results, open(out_path, "w"), indent=1)
"""


@pytest.fixture(scope="module")
def resume_results(comfy_dir, tmp_path_factory) -> tuple[dict, object]:
    base = tmp_path_factory.mktemp("resume-base")
    local = harness.install_random_checkpoint("sd15", base, comfy_dir)
    settings = json.dumps(inproc_settings(steps=4, eval_every=2, eval_batch_size=1, lr=1e-2))
    inproc.run_script(_RESUME, comfy_dir, base, str(local), settings, str(base / "results.json"))
    results = json.loads((base / "results.json").read_text())
    print("\n[resume] " + json.dumps(results, indent=1))
    return results, base


@pytest.mark.parametrize("call, steps_done", [(1, 0), (3, 1), (4, 2)])
def test_cancel_then_resume_gives_the_uninterrupted_lora(resume_results, call, steps_done):
    from alignprop_core.lora import load_lora

    results, base = resume_results
    loras = base / "models" / "loras" / "resume"
    assert results["full"]["ok"], results["full"]
    result = results[f"resume/cancel_at_{call}"]
    assert result["cancelled"] == {"ok": False, "interrupted": True}, result
    partial = load_lora(loras / f"cancel_at_{call}-partial.safetensors")
    assert partial.metadata["alignprop.step"] == str(steps_done)
    assert result["resumed"]["ok"], result
    resumed, full = load_lora(loras / f"cancel_at_{call}.safetensors"), load_lora(loras / "full.safetensors")
    assert resumed.metadata["alignprop.step"] == "4"
    assert set(resumed.state) == set(full.state)
    assert all(torch.equal(resumed.state[k], full.state[k]) for k in full.state)
    assert any(float(v.abs().max()) > 0 for k, v in full.state.items() if "lora_up" in k)  # it trained
    # a finished run's training state is spent and removed
    assert not (base / "output" / "alignprop_state" / "resume" / f"cancel_at_{call}" / "train_state.pt").exists()


def test_resume_without_a_stopped_run_says_so(resume_results):
    results, base = resume_results
    result = results["no_state"]
    assert not result["ok"] and result["type"] == "FileNotFoundError", result
    assert "no run of lora_name 'resume/never_ran' was stopped early" in result["message"]
    assert not (base / "models" / "loras" / "resume" / "never_ran.safetensors").exists()
