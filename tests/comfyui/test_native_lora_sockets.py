"""The trainer's LoRA through ComfyUI's own LORA_MODEL socket on a real ComfyUI server (random SD1.5
checkpoint), and Load AlignProp LoRA taking a LORA_MODEL instead of a file.

One graph trains a LoRA for 2 steps (attention and res-block layers: linear and conv factors) and hands
the trainer's lora_model output to ComfyUI's Save LoRA Weights, to ComfyUI's Load LoRA Model -> KSampler,
and to Load AlignProp LoRA, whose LoRA goes on to Apply LoRA -> KSampler, to AlignProp Save LoRA and, as
init_lora, to a second trainer run of 1 step. A second graph runs LoraLoader -> KSampler with the pack's own
file and with the file Save LoRA Weights wrote (copied into models/loras), and KSampler without a LoRA.

Checked: Save LoRA Weights writes exactly the tensors of the pack's file; every KSampler with the LoRA
(LoraLoader with either file, Load LoRA Model, Apply LoRA, the trainer's MODEL) gives the same latent, bit
for bit, and another one than without it; Load AlignProp LoRA makes the file's LoRA of the LORA_MODEL, less
its metadata; the second run continues the first one's LoRA on exactly its layers (the LORA_MODEL carries
no target list). In a ComfyUI process: Load AlignProp LoRA refuses a file and a LORA_MODEL together,
neither of them, and a LORA_MODEL it cannot read, saying what was wrong and what to do.
"""
from __future__ import annotations

import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

import inproc
from alignprop_core.lora import load_lora
from test_trainer_server import RES_TARGETS, trainer_graph

pytestmark = pytest.mark.slow

FOLDER = "alignprop_test_native"  # in models/loras
FIRST, CONTINUED, VIA_LOAD = f"{FOLDER}/first", f"{FOLDER}/continued", f"{FOLDER}/via_load"
SAVED_PREFIX = "alignprop_native/saved"  # Save LoRA Weights' prefix, in the output folder
LORA_MODEL = ["4", 4]  # the trainer's lora_model output: appended after model, lora, reward_curve, lora_path


def ksampler_chain(graph: dict, tag: str, model: list, clip: list) -> str:
    """KSampler (2 steps, 64 px) on `model` with prompts encoded by `clip`, saved as a latent; its SaveLatent id."""
    graph.update({
        f"{tag}_pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a cat"}},
        f"{tag}_neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        f"{tag}_empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        f"{tag}_ks": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": [f"{tag}_pos", 0], "negative": [f"{tag}_neg", 0],
            "latent_image": [f"{tag}_empty", 0], "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        f"{tag}_save": {"class_type": "SaveLatent", "inputs": {"samples": [f"{tag}_ks", 0],
                                                                "filename_prefix": f"alignprop_native/{tag}"}},
    })
    return f"{tag}_save"


def latents(server, entry: dict, saves: dict[str, str]) -> dict[str, torch.Tensor]:
    """{tag: the latent its SaveLatent node wrote} of a finished prompt."""
    found = {}
    for tag, node_id in saves.items():
        (item,) = entry["outputs"][node_id]["latents"]
        found[tag] = load_file(str(server.output_dir / item["subfolder"] / item["filename"]))["latent_tensor"]
    return found


@pytest.fixture(scope="module")
def runs(server, sd15_checkpoint):
    """Both graphs run; the latents of every KSampler, and the paths of the files written."""
    graph = trainer_graph(sd15_checkpoint, FIRST, target_modules=RES_TARGETS)
    ckpt_model, ckpt_clip = ["1", 0], ["1", 1]
    graph["30"] = {"class_type": "SaveLoRA", "inputs": {"lora": LORA_MODEL, "prefix": SAVED_PREFIX}}
    graph["31"] = {"class_type": "LoraModelLoader", "inputs": {"model": ckpt_model, "lora": LORA_MODEL,
                                                               "strength_model": 1.0}}
    graph["40"] = {"class_type": "AlignProp_LoadLora", "inputs": {"lora_name": "(none)", "lora_model": LORA_MODEL}}
    graph["41"] = {"class_type": "AlignProp_ApplyLora", "inputs": {"model": ckpt_model, "lora": ["40", 0],
                                                                   "strength": 1.0}}
    graph["42"] = {"class_type": "AlignProp_SaveLora", "inputs": {"lora": ["40", 0], "lora_name": VIA_LOAD,
                                                                  "dtype": "fp32"}}
    continued = {k: v for k, v in graph["4"]["inputs"].items() if k != "lora_settings"}  # init_lora sets them
    graph["50"] = {"class_type": "AlignProp_Trainer",
                   "inputs": {**continued, "init_lora": ["40", 0], "steps": 1, "lora_name": CONTINUED}}
    saves = {"native_loader": ksampler_chain(graph, "native_loader", ["31", 0], ckpt_clip),
             "apply": ksampler_chain(graph, "apply", ["41", 0], ckpt_clip),
             "trainer_model": ksampler_chain(graph, "trainer_model", ["4", 0], ckpt_clip)}
    started = time.monotonic()
    entry = server.run(graph, timeout=1200)
    print(f"\n[native sockets] training graph: {time.monotonic() - started:.1f} s")
    found = latents(server, entry, saves)

    (saved,) = (server.output_dir / SAVED_PREFIX).parent.glob("saved_*_.safetensors")
    copy = server.models_dir / "loras" / FOLDER / "saved_by_comfyui.safetensors"
    shutil.copyfile(saved, copy)
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd15_checkpoint}}}
    saves = {"plain": ksampler_chain(graph, "plain", ckpt_model, ckpt_clip)}
    for tag, name in (("loraloader_pack", f"{FIRST}.safetensors"),
                      ("loraloader_saved", f"{FOLDER}/saved_by_comfyui.safetensors")):
        graph[f"{tag}_lora"] = {"class_type": "LoraLoader", "inputs": {
            "model": ckpt_model, "clip": ckpt_clip, "lora_name": name, "strength_model": 1.0, "strength_clip": 1.0}}
        saves[tag] = ksampler_chain(graph, tag, [f"{tag}_lora", 0], [f"{tag}_lora", 1])
    log_start = len(server.log_text())
    found.update(latents(server, server.run(graph, timeout=900), saves))
    log = server.log_text()[log_start:]
    loras = server.models_dir / "loras"
    return {"latents": found, "log": log, "saved": saved, "first": loras / f"{FIRST}.safetensors",
            "continued": loras / f"{CONTINUED}.safetensors", "via_load": loras / f"{VIA_LOAD}.safetensors"}


def test_save_lora_weights_writes_exactly_the_tensors_of_the_packs_file(runs):
    ours, theirs = load_file(str(runs["first"])), load_file(str(runs["saved"]))
    assert theirs.keys() == ours.keys()
    assert sum(k.endswith(".alpha") for k in ours) == sum(k.endswith(".lora_down.weight") for k in ours) > 0
    assert any(v.dim() == 4 for v in ours.values())  # conv factors of the res blocks travel too
    for key, value in ours.items():
        assert theirs[key].dtype == value.dtype and torch.equal(theirs[key], value), key


def test_every_path_of_the_lora_gives_the_same_ksampler_latent(runs):
    found = runs["latents"]
    assert "lora key not loaded" not in runs["log"], runs["log"][-3000:]
    reference = found["loraloader_pack"]
    assert (reference - found["plain"]).abs().mean() > 1e-3  # the LoRA changes the output
    for tag in ("loraloader_saved", "native_loader", "apply", "trainer_model"):
        assert torch.equal(found[tag], reference), (tag, (found[tag] - reference).abs().max())


def test_load_alignprop_lora_makes_the_files_lora_of_the_lora_model_less_its_metadata(runs):
    first, via_load = load_lora(runs["first"]), load_lora(runs["via_load"])
    assert via_load.state.keys() == first.state.keys()
    assert all(torch.equal(via_load.state[k], first.state[k]) for k in first.state)
    assert (via_load.rank, via_load.alpha) == (first.rank, first.alpha) == (4, 4.0)
    assert first.metadata["alignprop.reward"] and "alignprop.reward" not in via_load.metadata


def test_a_lora_model_continues_training_on_exactly_its_own_layers(runs):
    first, continued = load_lora(runs["first"]), load_lora(runs["continued"])
    assert continued.metadata["alignprop.step"] == "1" and continued.state.keys() == first.state.keys()
    modules = {k.rsplit(".", 2)[0] for k in first.state}
    assert len(continued.target_modules) == len(modules)  # its layers, not the default attention targets
    # one AdamW step of lr 1e-3 from the first run's LoRA moves each value by about 1e-3 at most
    moved = max(float((continued.state[k] - first.state[k]).abs().max()) for k in first.state)
    assert 0 < moved < 1.1e-3, moved


_ERRORS = r"""
import sys, torch
import inproc
inproc.setup(sys.argv[1], sys.argv[2])
from ComfyUI_AlignProp.nodes.lora_nodes import LoadLora

BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
good = {f"{BLOCK}.lora_down.weight": torch.ones(4, 320), f"{BLOCK}.lora_up.weight": torch.ones(320, 4),
        f"{BLOCK}.alpha": torch.tensor(2.0)}
cases = {
    "both": {"lora_name": "some.safetensors", "lora_model": good},
    "neither": {"lora_name": "(none)"},
    "not_a_dict": {"lora_name": "(none)", "lora_model": [1, 2]},
    # ComfyUI's own Train LoRA node: ComfyUI's layer names after diffusion_model.
    "comfy_trainer": {"lora_name": "(none)", "lora_model": {
        "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight": torch.ones(320, 4),
        "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight": torch.ones(4, 320)}},
    "no_family": {"lora_name": "(none)", "lora_model": {"lora_unet_my_layer.lora_down.weight": torch.ones(4, 8),
                                                        "lora_unet_my_layer.lora_up.weight": torch.ones(8, 4)}},
}
out = {}
for name, inputs in cases.items():
    try:
        inproc.execute(LoadLora, **inputs)
        out[name] = None
    except Exception as err:
        out[name] = f"{type(err).__name__}: {err}"
lora = inproc.execute(LoadLora, lora_name="(none)", lora_model=good).result[0]
out["good"] = [lora.rank, lora.alpha, len(lora.state), lora.metadata, list(lora.target_modules)]
torch.save(out, sys.argv[3])
"""

REFUSALS = {
    "both": ("lora_name is 'some.safetensors' and a LORA_MODEL is connected to lora_model",
             "set lora_name to (none)", "or disconnect lora_model"),
    "neither": ("lora_name is (none) and nothing is connected to lora_model", "choose a file in lora_name",
                "or connect a LORA_MODEL"),
    "not_a_dict": ("lora_model is a list, not a LORA_MODEL", "connect AlignProp Trainer's lora_model output"),
    "comfy_trainer": ("lora_model is not a LoRA AlignProp can read", "Unknown LoRA keys (2)",
                      "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight",
                      "apply this LoRA with ComfyUI's Load LoRA Model node instead"),
    "no_family": ("name the layers of no model family", "lora_unet_my_layer.lora_down.weight",
                  "Load LoRA Model node instead"),
}


def test_load_alignprop_lora_refuses_what_it_cannot_take_saying_what_to_do(comfy_dir, tmp_path):
    out_path = tmp_path / "out.pt"
    inproc.run_script(_ERRORS, comfy_dir, tmp_path / "base", str(out_path), timeout=300)
    out = torch.load(out_path, weights_only=True)
    for case, fragments in REFUSALS.items():
        assert out[case] is not None and out[case].startswith("ValueError: "), (case, out[case])
        for fragment in fragments:
            assert fragment in out[case], (case, fragment, out[case])
    assert out["good"] == [4, 2.0, 3, {}, []]


def test_the_new_sockets_are_where_workflows_expect_them(server):
    info = server.object_info()
    trainer, load = info["AlignProp_Trainer"], info["AlignProp_LoadLora"]
    assert trainer["output"][:5] == ["MODEL", "ALIGNPROP_LORA", "IMAGE", "STRING", "LORA_MODEL"]
    assert trainer["output_name"][4] == "lora_model" and trainer["output_tooltips"][4]
    assert load["input"]["optional"]["lora_model"][0] == "LORA_MODEL"
    assert info["LoraModelLoader"]["input"]["required"]["lora"][0] == "LORA_MODEL"
