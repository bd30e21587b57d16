"""The reward nodes in a ComfyUI process (inproc.py): bad dropdown values, non-finite numbers and
unreadable weight files are refused with a message that names the input or the file.

A dropdown typo in an API prompt ("compressable") used to train toward the opposite reward; a NaN
weight reached the mixer; a pickle that would run code, a legacy-format pickle, an empty .pt and a
damaged .safetensors gave torch's raw text (which advises weights_only=False) or none at all.
"""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

import inproc

pytestmark = pytest.mark.slow

# Runs in a ComfyUI process: calls each node with one bad input and records the error message.
_SCRIPT = r"""
import json, math, sys
import inproc
nodes = inproc.setup(sys.argv[1], sys.argv[2])
r = nodes.reward_nodes
nan, inf = math.nan, math.inf
from alignprop_core.rewards import make_reward
dummy = make_reward("smoothness")
cases = {
    "direction-typo": (r.CompressibilityReward, dict(quality=95, direction="compressable")),
    "kind-typo": (r.SimpleReward, dict(kind="smooth", red=1.0, green=0.5, blue=0.1)),
    "red-nan": (r.SimpleReward, dict(kind="color_target", red=nan, green=0.5, blue=0.1)),
    "blue-inf": (r.SimpleReward, dict(kind="smoothness", red=1.0, green=0.5, blue=inf)),
    "target-inf": (r.ObjectCountReward, dict(model_dir="owl", object_name="cat", target=inf)),
    "weight-nan": (r.RewardMixer, dict(reward_1=dummy, weight_1=1.0, reward_2=dummy, weight_2=nan,
                                       standardize=False)),
}
for name in ("hostile.pt", "hostile_raw.pt", "legacy.pt", "empty.pt", "truncated.safetensors",
             "random.safetensors"):
    cases[f"hps-{name}"] = (r.HPSReward, dict(checkpoint=name))
cases["aesthetic-head-hostile.pt"] = (r.AestheticReward, dict(head="hostile.pt", clip_vision_file="clip.safetensors"))
messages = {}
for case, (node, inputs) in cases.items():
    try:
        inproc.execute(node, **inputs)
        messages[case] = None
    except Exception as err:
        messages[case] = f"{type(err).__name__}: {err}"
with open(sys.argv[3], "w") as f:
    json.dump(messages, f)
"""

EXPECTED = {
    "direction-typo": ["direction='compressable'", "'compressible', 'incompressible'"],
    "kind-typo": ["kind='smooth'", "'smoothness', 'color_target'"],
    "red-nan": ["red must be a finite number"],
    "blue-inf": ["blue must be a finite number"],
    "target-inf": ["target must be a finite number"],
    "weight-nan": ["weight_2 must be a finite number"],
    "hps-hostile.pt": ["hostile.pt", "can be read safely", "GLOBAL"],
    "hps-hostile_raw.pt": ["hostile_raw.pt", "can be read safely"],
    "hps-legacy.pt": ["legacy.pt", "can be read safely", "GLOBAL"],
    "hps-empty.pt": ["empty.pt", "is empty"],
    "hps-truncated.safetensors": ["truncated.safetensors", "not a readable .safetensors file"],
    "hps-random.safetensors": ["random.safetensors", "not a readable .safetensors file"],
    "aesthetic-head-hostile.pt": ["hostile.pt", "can be read safely"],
}


class WritesMarker:
    """Unpickling this would create a file: a stand-in for a pickle that runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_reward_nodes_refuse_bad_inputs_by_name(comfy_dir, tmp_path):
    from safetensors.torch import save_file

    base = tmp_path / "base"
    rewards, clip_vision = base / "models" / "reward_models", base / "models" / "clip_vision"
    rewards.mkdir(parents=True)
    clip_vision.mkdir(parents=True)
    marker = tmp_path / "PICKLE_RAN"
    torch.save({"w": WritesMarker(marker)}, rewards / "hostile.pt")
    with open(rewards / "hostile_raw.pt", "wb") as f:
        pickle.dump(WritesMarker(marker), f)
    torch.save({"w": WritesMarker(marker)}, rewards / "legacy.pt", _use_new_zipfile_serialization=False)
    (rewards / "empty.pt").write_bytes(b"")
    save_file({"w": torch.zeros(256)}, str(tmp_path / "whole.safetensors"))
    data = (tmp_path / "whole.safetensors").read_bytes()
    (rewards / "truncated.safetensors").write_bytes(data[:-100])
    (rewards / "random.safetensors").write_bytes(os.urandom(500))
    (clip_vision / "clip.safetensors").write_bytes(data)
    (rewards / "owl").mkdir()
    (rewards / "owl" / "config.json").write_text("{}")

    inproc.run_script(_SCRIPT, comfy_dir, base, str(tmp_path / "messages.json"), timeout=600)
    messages = json.loads((tmp_path / "messages.json").read_text())
    print("\n" + "\n".join(f"[reward nodes] {case}: {message}" for case, message in messages.items()))
    assert set(messages) == set(EXPECTED)
    for case, excerpts in EXPECTED.items():
        message = messages[case]
        assert message is not None, f"{case} was accepted"
        assert "weights_only=False" not in message, message
        for excerpt in excerpts:
            assert excerpt in message, (case, excerpt, message)
    assert not marker.exists(), "a pickle ran code"
