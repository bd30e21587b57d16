"""The aesthetic reward on a CLIP_VISION from ComfyUI's standard Load CLIP Vision node.

The tower is a random full-size CLIP ViT-L/14 (harness.cached_random_clip_vision: ComfyUI's
CLIPVisionLoader refuses anything smaller) and the head a random LAION-layout MLP.

1. In a ComfyUI process without a server (inproc.py): `comfy.clip_vision.load` (what the loader
   node calls) loads the file with no missing or unexpected key; the node's reward on that object
   equals the core reward built from the same file (`make_aesthetic(clip_vision_path=...)`), and both
   equal the head applied to ComfyUI's OWN tower output (`ClipVisionModel.encode_image`), so the core
   tower computes what ComfyUI's computes. Gradients reach the pixels.
2. On the real server: LoadImage + CLIPVisionLoader -> AlignProp_AestheticReward -> Score Images runs
   through POST /prompt to success, and the scores on the node equal the core's on the same pixels.
3. Neither or both CLIP sources give a clear error on the node and the server keeps serving.
"""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import harness
import inproc

pytestmark = pytest.mark.slow

CACHE = harness.REPO_ROOT / ".cache" / "comfyui" / "clip_vision"
CLIP_NAME = "alignprop_random_vit_l14.ckpt"
HEAD_NAME = "alignprop_random_aesthetic_head.pth"
IMAGE_NAME = "alignprop_aesthetic_probe.png"

# Runs in a ComfyUI process (inproc.setup). Writes the scores of three routes on the same pixels.
_UNIT = r"""
import sys, torch
import inproc
nodes = inproc.setup(sys.argv[1], sys.argv[2])
clip_path, head_name, out_path = sys.argv[3:6]
import comfy.clip_vision
from comfy.utils import load_torch_file
from alignprop_core.rewards import make_reward
from alignprop_core.rewards.aesthetic import load_aesthetic_head

# what CLIPVisionLoader does, plus the key check it only logs
sd = load_torch_file(clip_path)
with torch.inference_mode():
    clip_vision = comfy.clip_vision.load(clip_path)
    missing, unexpected = clip_vision.model.load_state_dict(
        {k: v for k, v in sd.items()}, strict=False)
(reward,) = inproc.execute(nodes.reward_nodes.AestheticReward, head=head_name, clip_vision_file="(none)",
                           clip_vision=clip_vision).result
head_path = nodes.paths.existing_path("reward_models", head_name)
gen = torch.Generator().manual_seed(0)
# 224 x 224 pixels on the 1/255 grid: ComfyUI's clip_preprocess then neither resizes nor rounds
pixels = torch.randint(0, 256, (2, 3, 224, 224), generator=gen).float() / 255
node_scores = reward(pixels.clone(), ["", ""])
core = make_reward("aesthetic", head_path=head_path, clip_vision_path=clip_path)
core_scores = core(pixels.clone(), ["", ""])
with torch.inference_mode():
    embeds = clip_vision.encode_image(pixels.movedim(1, -1))["image_embeds"].float()
head = load_aesthetic_head(head_path)
comfy_scores = head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
x = pixels.clone().requires_grad_(True)
reward(x, ["", ""]).sum().backward()
torch.save({"node": node_scores.detach(), "core": core_scores.detach(), "comfy": comfy_scores.detach(),
            "missing": list(missing), "unexpected": list(unexpected), "grad_norm": float(x.grad.norm()),
            "tower_dtype": str(clip_vision.dtype)}, out_path)
"""


@pytest.fixture(scope="module")
def tower_files(comfy_dir, tmp_path_factory):
    """(clip_vision file, aesthetic head file): the random ViT-L/14 (cached) and a random head."""
    from alignprop_core.rewards.aesthetic import AestheticHead

    clip = harness.cached_random_clip_vision(CACHE, comfy_dir=comfy_dir)
    torch.manual_seed(5)
    head = AestheticHead(768)
    with torch.no_grad():  # a score scale like the real head's (about 1-10), not ~0
        head.layers[-1].bias.fill_(5.0)
        head.layers[-1].weight.mul_(50.0)
    path = tmp_path_factory.mktemp("aesthetic") / HEAD_NAME
    torch.save(head.state_dict(), path)
    print(f"\n[aesthetic] random ViT-L/14 clip_vision file {clip.stat().st_size / 1e6:.1f} MB")
    return clip, path


def test_node_reward_on_comfy_clip_vision_equals_core_and_comfy_tower(comfy_dir, tower_files, tmp_path):
    clip, head = tower_files
    base = tmp_path / "base"
    (base / "models" / "reward_models").mkdir(parents=True)
    shutil.copyfile(head, base / "models" / "reward_models" / HEAD_NAME)
    inproc.run_script(_UNIT, comfy_dir, base, str(clip), HEAD_NAME, str(tmp_path / "out.pt"))
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    print(f"\n[aesthetic] ComfyUI tower dtype {out['tower_dtype']}; scores node {out['node'].tolist()}, "
          f"core {out['core'].tolist()}, ComfyUI tower + head {out['comfy'].tolist()}; "
          f"max |node - comfy| {float((out['node'] - out['comfy']).abs().max()):.2e}; "
          f"pixel grad norm {out['grad_norm']:.3e}")
    assert out["missing"] == [] and out["unexpected"] == [], (out["missing"][:5], out["unexpected"][:5])
    assert torch.isfinite(out["node"]).all()
    torch.testing.assert_close(out["node"], out["core"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["node"], out["comfy"], rtol=1e-4, atol=1e-4)
    assert float((out["node"][0] - out["node"][1]).abs()) > 1e-3, "the two images should score differently"
    assert out["grad_norm"] > 0 and math.isfinite(out["grad_norm"])


# -- on the server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def installed(server, tower_files) -> None:
    """The tower, head and a probe image in the server's folders."""
    clip, head = tower_files
    shutil.copyfile(clip, server.models_dir / "clip_vision" / CLIP_NAME)
    shutil.copyfile(head, server.models_dir / "reward_models" / HEAD_NAME)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(server.base_dir / "input" / IMAGE_NAME)


def score_graph(**aesthetic_inputs) -> dict:
    inputs = {"head": HEAD_NAME, "clip_vision_file": "(none)", "clip_vision": ["1", 0], **aesthetic_inputs}
    return {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_NAME}},
        "2": {"class_type": "AlignProp_AestheticReward", "inputs": inputs},
        "3": {"class_type": "LoadImage", "inputs": {"image": IMAGE_NAME}},
        "4": {"class_type": "AlignProp_ScoreImages", "inputs": {"images": ["3", 0], "reward": ["2", 0],
                                                                "prompts": ""}},
    }


def test_score_images_with_clip_vision_loader_on_the_server(server, installed, tower_files):
    from alignprop_core.rewards import make_reward

    entry = server.run(score_graph(), timeout=900)
    assert entry["status"]["status_str"] == "success", entry["status"]
    text = entry["outputs"]["4"]["text"][0]
    scores = [float(m) for m in re.findall(r"^\d+: (\S+)$", text, flags=re.M)]
    assert len(scores) == 1 and math.isfinite(scores[0]), text
    assert "missing clip vision" not in server.log_text(), server.log_tail()

    clip, head = tower_files
    image = np.asarray(Image.open(server.base_dir / "input" / IMAGE_NAME).convert("RGB"), dtype=np.float32)
    pixels = torch.from_numpy(image / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = float(make_reward("aesthetic", head_path=head, clip_vision_path=clip)(pixels, [""])[0])
    print(f"\n[aesthetic] server score {scores[0]} (shown to 4 decimals), core {expected:.6f}")
    assert abs(scores[0] - expected) <= 1e-4, (text, expected)


@pytest.mark.parametrize("case", ["neither", "both"])
def test_one_clip_source_is_required(server, installed, case):
    from test_trainer_server import _messages, _wait_any

    graph = score_graph()
    if case == "neither":
        del graph["2"]["inputs"]["clip_vision"]
        del graph["1"]
    else:
        (server.models_dir / "clip_vision" / "tower.safetensors").write_bytes(b"")  # only listed, never read
        graph["2"]["inputs"]["clip_vision_file"] = "tower.safetensors"
    entry = _wait_any(server, server.queue(graph))
    assert entry["status"]["status_str"] == "error", entry["status"]
    message = _messages(entry)
    assert "Load CLIP Vision" in message and "clip_vision_file" in message, message
    assert ("not both" in message) == (case == "both"), message
    assert json.loads(json.dumps(server.object_info()))["AlignProp_AestheticReward"]  # still serving
