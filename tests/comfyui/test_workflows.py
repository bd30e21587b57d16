"""Every example workflow in workflows/ is registered, matches its API twin, and runs on a real ComfyUI.

For each ``workflows/<name>.json`` (the UI format the browser loads) this module checks that every
node type in it is registered in ``/object_info``, converts it to the API format the way the
frontend does (``ui_to_api``) and compares the result with the committed ``api/<name>.api.json``, then
queues that graph through ``POST /prompt`` with test-sized values (the random SD1.5 checkpoint, or
the random SD3 one for the SD3.5 workflow and the random FLUX.1 files for the FLUX one, 64 px, 2 sampler and training steps, tiny reward files
written into the server's model folders).

The two training workflows run first, in one module fixture, because the LoRA workflows load the
LoRAs they write (models/loras/alignprop/aesthetic.safetensors and compressible_smooth.safetensors).
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

import harness

pytestmark = pytest.mark.slow

WORKFLOWS_DIR = harness.REPO_ROOT / "workflows"
# the API twins live one level down: ComfyUI lists every workflows/*.json as a template
API_DIR = WORKFLOWS_DIR / "api"
TRAINING = ("train_aesthetic_lora", "train_reward_mix")
WORKFLOWS = (*TRAINING, "score_ksampler_batch", "use_trained_lora", "mix_two_loras", "train_sd35_lora",
             "train_flux_lora")
FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}  # never sent to the server
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
CLIP_VISION = "clip-vit-large-patch14.safetensors"
SIZE, STEPS = 64, 2

# Test-sized values, by node type; everything else runs as committed.
TEST_VALUES = {
    "EmptyLatentImage": {"width": SIZE, "height": SIZE, "batch_size": 2},
    "EmptySD3LatentImage": {"width": SIZE, "height": SIZE, "batch_size": 2},
    "KSampler": {"steps": STEPS},
    "AlignProp_SamplerSettings": {"steps": STEPS},
    "AlignProp_PreviewSampler": {"width": SIZE, "height": SIZE, "prompt": "a cheetah\na penguin"},
    # one held-out prompt: the evaluations at the first and last step are most of a test run's time
    "AlignProp_Trainer": {"steps": STEPS, "batch_size": 1, "width": SIZE, "height": SIZE, "eval_prompts": "a cheetah"},
    "AlignProp_OptimizerSettings": {"grad_accum": 1},
}


# -- UI format -> API format, as the frontend's graphToPrompt does it -----------------------------
def widget_layout(info: dict) -> list[tuple[str, bool]]:
    """(name, followed by a control value) for each widget of a node, in the frontend's order.

    Widgets are the INT/FLOAT/STRING/BOOLEAN/COMBO inputs that are not forceInput, required before
    optional. The frontend puts a "control after generate" value after an INT whose
    control_after_generate is true, or unset and the input is named seed or noise_seed.
    """
    order = info.get("input_order", {})
    layout = []
    for part in ("required", "optional"):
        specs = info["input"].get(part, {})
        for name in order.get(part, list(specs)):
            kind, options = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            if options.get("forceInput") or not (isinstance(kind, list) or kind in WIDGET_TYPES):
                continue
            control = kind == "INT" and options.get("control_after_generate", name in ("seed", "noise_seed"))
            layout.append((name, bool(control)))
    return layout


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format graph of a UI-format workflow: widget values by name, links as [node_id, slot]."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} is muted or bypassed; the examples use neither")
        info = object_info[node["type"]]
        layout = widget_layout(info)
        values = list(node.get("widgets_values", []))
        expected = sum(2 if control else 1 for _, control in layout)
        assert len(values) == expected, (
            f"node {node['id']} ({node['type']}) has {len(values)} widget values but its widgets "
            f"{[n for n, _ in layout]} need {expected}; regenerate with tools/api_to_ui.py")
        inputs = {}
        for name, control in layout:
            inputs[name] = values.pop(0)
            if control:
                values.pop(0)
        for socket in node.get("inputs", []):
            if socket.get("link") is not None:
                _, source, slot, target, _, _ = links[socket["link"]]
                assert target == node["id"], f"link {socket['link']} does not end at node {node['id']}"
                inputs[socket["name"]] = [str(source), slot]
        api[str(node["id"])] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or info["display_name"]}}
    return api


def shrink_for_test(api: dict, ckpt_name: str | None, files: dict[str, dict] | None = None) -> dict:
    """A copy of an API graph with the test checkpoint (or, by loader node type, the test files) and
    the TEST_VALUES."""
    api = json.loads(json.dumps(api))
    for node_id, node in api.items():
        new = {**TEST_VALUES.get(node["class_type"], {}), **(files or {}).get(node["class_type"], {})}
        if node["class_type"] == "CheckpointLoaderSimple":
            new["ckpt_name"] = ckpt_name
        for name, value in new.items():
            assert name in node["inputs"], f"node {node_id} ({node['class_type']}) has no input {name!r}"
            node["inputs"][name] = value
    return api


def load_workflow(name: str) -> tuple[dict, dict]:
    ui = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    api = json.loads((API_DIR / f"{name}.api.json").read_text())
    return ui, api


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.object_info()


@pytest.fixture(scope="module")
def reward_files(server) -> None:
    """The reward files the workflows name, in the server's model folders (`write_reward_files`)."""
    write_reward_files(server.models_dir)


def write_reward_files(models_dir: Path) -> None:
    """A tiny aesthetic head (the real 768-1024-128-64-16-1 layout) and a tiny CLIP ViT with a
    768-d projection in ComfyUI's clip_vision layout, under the file names the workflows use."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from alignprop_core.rewards.aesthetic import AestheticHead

    torch.manual_seed(3)
    torch.save(AestheticHead(768).state_dict(), models_dir / "reward_models" / AESTHETIC_HEAD)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, projection_dim=768, num_hidden_layers=2,
                              num_attention_heads=1, image_size=224, patch_size=32, hidden_act="gelu")
    model = CLIPVisionModelWithProjection(config).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(models_dir / "clip_vision" / CLIP_VISION))


def flux_loader_values(flux_files: dict[str, str]) -> dict[str, dict]:
    """The loader inputs (`shrink_for_test`'s files) that point the FLUX workflow at the random files."""
    return {"UNETLoader": {"unet_name": flux_files["unet_name"]},
            "DualCLIPLoader": {"clip_name1": flux_files["clip_l"], "clip_name2": flux_files["t5xxl"]},
            "VAELoader": {"vae_name": flux_files["vae_name"]}}


def run_workflow(server, name: str, ckpt_name: str | None, timeout: float = 900.0,
                 files: dict[str, dict] | None = None) -> dict:
    """Queue the UI workflow converted to the API format, test-sized; return its history entry."""
    ui, _ = load_workflow(name)
    graph = shrink_for_test(ui_to_api(ui, server.object_info()), ckpt_name, files)
    started = time.monotonic()
    entry = server.run(graph, timeout=timeout)
    print(f"\n[workflows] {name}: {time.monotonic() - started:.1f} s")
    assert entry["status"]["status_str"] == "success", entry["status"]
    return entry


@pytest.fixture(scope="module")
def trained(server, sd15_checkpoint, reward_files) -> dict[str, dict]:
    """Run both training workflows, in order; their history entries by workflow name."""
    return {name: run_workflow(server, name, sd15_checkpoint) for name in TRAINING}


def assert_images(server, entry: dict, node_id: str, count: int, size: int = SIZE) -> None:
    images = [server.output_dir / i.get("subfolder", "") / i["filename"]
              for i in entry["outputs"].get(node_id, {}).get("images", []) if i.get("type") == "output"]
    assert len(images) == count, f"node {node_id} saved {len(images)} images, expected {count}: {entry['outputs']}"
    for path in images:
        assert path.is_file(), path
        with Image.open(path) as image:
            assert size is None or image.size == (size, size), (path, image.size)


def node_id_of(api: dict, class_type: str, title: str | None = None) -> str:
    found = [i for i, n in api.items() if n["class_type"] == class_type
             and (title is None or n["_meta"]["title"] == title)]
    assert len(found) == 1, f"expected one {class_type} {title or ''} node, found {found}"
    return found[0]


# -- static checks ---------------------------------------------------------------------------------
def test_every_workflow_is_tested():
    on_disk = {p.name[: -len(".api.json")] for p in API_DIR.glob("*.api.json")}
    assert on_disk == set(WORKFLOWS), "add new workflows to WORKFLOWS (and a run test) in this module"
    assert {p.stem for p in WORKFLOWS_DIR.glob("*.json")} == set(WORKFLOWS), (
        "workflows/ holds exactly one UI file per workflow (API twins go to workflows/api/)")


@pytest.mark.parametrize("name", WORKFLOWS)
def test_node_types_are_registered(object_info, name):
    ui, _ = load_workflow(name)
    types = {node["type"] for node in ui["nodes"]} - FRONTEND_ONLY
    missing = sorted(types - set(object_info))
    assert not missing, f"{name}.json uses node types that /object_info does not list: {missing}"
    notes = [node for node in ui["nodes"] if node["type"] == "Note"]
    assert len(notes) == 1 and notes[0]["widgets_values"][0].strip(), f"{name}.json needs one Note with text"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_format_matches_api_twin(object_info, name):
    ui, api = load_workflow(name)
    assert ui_to_api(ui, object_info) == api, (
        f"workflows/{name}.json and api/{name}.api.json differ; edit the API twin and regenerate the UI file "
        "with tools/api_to_ui.py")


# -- runs ------------------------------------------------------------------------------------------
def test_train_aesthetic_lora(server, trained):
    entry, (_, api) = trained["train_aesthetic_lora"], load_workflow("train_aesthetic_lora")
    lora = server.models_dir / "loras" / "alignprop" / "aesthetic.safetensors"
    assert lora.is_file() and lora.stat().st_size > 0, f"no LoRA at {lora}"
    assert_images(server, entry, node_id_of(api, "SaveImage", "Save reward curve"), 1, size=None)
    prompts = TEST_VALUES["AlignProp_PreviewSampler"]["prompt"].splitlines()
    assert_images(server, entry, node_id_of(api, "SaveImage", "Save samples with the LoRA"), len(prompts))


def test_train_reward_mix(server, trained):
    entry, (_, api) = trained["train_reward_mix"], load_workflow("train_reward_mix")
    lora = server.models_dir / "loras" / "alignprop" / "compressible_smooth.safetensors"
    assert lora.is_file() and lora.stat().st_size > 0, f"no LoRA at {lora}"
    assert_images(server, entry, node_id_of(api, "SaveImage"), 1, size=None)


def test_score_ksampler_batch(server, sd15_checkpoint, reward_files):
    entry = run_workflow(server, "score_ksampler_batch", sd15_checkpoint)
    _, api = load_workflow("score_ksampler_batch")
    text = entry["outputs"][node_id_of(api, "AlignProp_ScoreImages")]["text"][0]
    scores = [float(m) for m in re.findall(r"^\d+: (\S+)$", text, flags=re.M)]
    batch = TEST_VALUES["EmptyLatentImage"]["batch_size"]
    assert len(scores) == batch, f"expected {batch} scores, got: {text!r}"
    assert all(s == s for s in scores), f"NaN score: {text!r}"


def test_use_trained_lora(server, sd15_checkpoint, trained):
    entry = run_workflow(server, "use_trained_lora", sd15_checkpoint)
    _, api = load_workflow("use_trained_lora")
    assert_images(server, entry, node_id_of(api, "SaveImage"), TEST_VALUES["EmptyLatentImage"]["batch_size"])
    assert "lora key not loaded" not in server.log_text(), server.log_tail()


def test_mix_two_loras(server, sd15_checkpoint, trained):
    entry = run_workflow(server, "mix_two_loras", sd15_checkpoint)
    _, api = load_workflow("mix_two_loras")
    mixed = server.models_dir / "loras" / "alignprop" / "aesthetic_compressible_mix.safetensors"
    assert mixed.is_file() and mixed.stat().st_size > 0, f"Save LoRA wrote nothing at {mixed}"
    assert_images(server, entry, node_id_of(api, "SaveImage"), TEST_VALUES["EmptyLatentImage"]["batch_size"])


def test_train_sd35_lora(server, sd3_checkpoint):
    entry = run_workflow(server, "train_sd35_lora", sd3_checkpoint)
    _, api = load_workflow("train_sd35_lora")
    lora = server.models_dir / "loras" / "alignprop" / "sd35_compressible.safetensors"
    assert lora.is_file() and lora.stat().st_size > 0, f"no LoRA at {lora}"
    assert_images(server, entry, node_id_of(api, "SaveImage", "Save reward curve"), 1, size=None)
    assert_images(server, entry, node_id_of(api, "SaveImage", "Save samples with the LoRA"),
                  TEST_VALUES["EmptySD3LatentImage"]["batch_size"])


def test_train_flux_lora(server, flux_files, reward_files):
    entry = run_workflow(server, "train_flux_lora", None, timeout=1800, files=flux_loader_values(flux_files))
    _, api = load_workflow("train_flux_lora")
    lora = server.models_dir / "loras" / "alignprop" / "flux_aesthetic.safetensors"
    assert lora.is_file() and lora.stat().st_size > 0, f"no LoRA at {lora}"
    assert_images(server, entry, node_id_of(api, "SaveImage", "Save reward curve"), 1, size=None)
    assert_images(server, entry, node_id_of(api, "SaveImage", "Save samples with the LoRA"),
                  TEST_VALUES["EmptySD3LatentImage"]["batch_size"])
