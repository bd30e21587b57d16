"""The AlignProp Trainer node on a real ComfyUI server, on checkpoints ComfyUI detects as SD1.5/SDXL.

A trained LoRA lands in models/loras, the standard LoraLoader loads it with no "lora key not loaded"
line, and KSampler output changes with it; bad file names cannot escape models/loras; an interrupt
mid-training leaves a loadable <name>-partial LoRA and a server that keeps serving, and resume continues
it to the LoRA an uninterrupted run of as many steps gives.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from alignprop_core.lora import load_lora

pytestmark = pytest.mark.slow

SAMPLER = {"steps": 3, "eta": 0.0, "guidance_scale": 5.0, "use_cfg": True, "truncation": "fixed", "k": 1,
           "k_min": 1, "k_max": 1, "k_mean": 1.0, "k_std": 0.0, "checkpoint_unet": True, "checkpoint_vae": True,
           "vae_tile": 0, "vae_tile_overlap": 64}
# every training value of the trainer tests, flat: the trainer's own inputs and those of its settings nodes
TRAIN = {"steps": 2, "batch_size": 1, "lr": 1e-3, "width": 64, "height": 64, "seed": 0,
         "grad_accum": 1, "lr_schedule": "constant", "lr_warmup_steps": 0, "weight_decay": 1e-4, "adam_beta1": 0.9,
         "adam_beta2": 0.999, "adam_eps": 1e-8, "max_grad_norm": 1.0, "mixed_precision": "no",
         "offload_reward": False, "eval_every": 0, "eval_seed": 1234, "eval_latents": 1, "eval_batch_size": 2, "save_every": 0,
         "best_by": "reward", "keep_best": True, "early_stop_evals": 0,
         "loss": "maximize", "reward_target": 10.0, "reward_augment": "none", "negative_prompt": "",
         "kl_weight": 0.0, "lora_l2_weight": 0.0,
         "rank": 4, "alpha": 4.0, "target_modules": "to_q, to_k, to_v, to_out.0", "init_seed": 0}
# the trainer's settings sockets: socket -> (settings node, node id in trainer_graph, the inputs it holds)
SETTINGS_NODES = {
    "optimizer": ("AlignProp_OptimizerSettings", "21",
                  ("grad_accum", "lr_schedule", "lr_warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                   "adam_eps", "max_grad_norm", "mixed_precision", "offload_reward")),
    "evaluation": ("AlignProp_EvaluationSettings", "22",
                   ("eval_every", "eval_seed", "eval_latents", "eval_batch_size", "save_every", "best_by",
                    "keep_best", "early_stop_evals")),
    "objective": ("AlignProp_ObjectiveSettings", "23", ("loss", "reward_target", "reward_augment", "negative_prompt",
                                                        "kl_weight", "lora_l2_weight")),
    "lora_settings": ("AlignProp_LoraSettings", "24", ("rank", "alpha", "target_modules", "init_seed")),
}
RES_TARGETS = "to_q, to_k, to_v, to_out.0, conv1, conv2, time_emb_proj, conv_shortcut"  # + res blocks


def split_inputs(values: dict) -> tuple[dict, dict[str, dict]]:
    """(the trainer's own inputs, {settings socket: its node's inputs}) of flat values like TRAIN."""
    settings = {socket: {k: values[k] for k in names if k in values}
                for socket, (_, _, names) in SETTINGS_NODES.items()}
    held = {k for _, _, names in SETTINGS_NODES.values() for k in names}
    return {k: v for k, v in values.items() if k not in held}, settings


def inproc_settings(**overrides) -> dict:
    """The settings of an in-process trainer run (inproc.TRAINING_PRELUDE): the sampler's, the trainer's own
    inputs, and each settings socket's node with its inputs."""
    own, settings = split_inputs({**TRAIN, **overrides})
    return {"sampler": SAMPLER, "train": own,
            "settings": {socket: [SETTINGS_NODES[socket][0], inputs] for socket, inputs in settings.items()}}


def trainer_graph(ckpt: str, lora_name: str, **overrides) -> dict:
    """Checkpoint, reward, sampler and settings nodes -> trainer -> preview of the reward curve; each
    override goes to the node that has that input."""
    own, settings = split_inputs({**TRAIN, **overrides})
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": ["2", 0], "sampler": ["3", 0],
              "prompts": "cat\ndog", "lora_name": lora_name, **own}
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "AlignProp_SimpleReward",
              "inputs": {"kind": "smoothness", "red": 1.0, "green": 0.5, "blue": 0.1}},
        "3": {"class_type": "AlignProp_SamplerSettings", "inputs": dict(SAMPLER)},
        "4": {"class_type": "AlignProp_Trainer", "inputs": inputs},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}},
    }
    for socket, (node_type, node_id, _) in SETTINGS_NODES.items():
        graph[node_id] = {"class_type": node_type, "inputs": settings[socket]}
        inputs[socket] = [node_id, 0]
    return graph


def ksampler_graph(ckpt: str, prefix: str, lora_name: str | None) -> dict:
    model, clip = ["1", 0], ["1", 1]
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    if lora_name:
        graph["8"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora_name,
                                                             "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = ["8", 0], ["8", 1]
    graph.update({
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    })
    return graph


def _image(server, entry) -> np.ndarray:
    (path,) = server.output_images(entry)
    return np.asarray(Image.open(path), dtype=np.float32)


def _wait_any(server, prompt_id: str, timeout: float = 600.0) -> dict:
    """History entry of a finished prompt, whether it succeeded, failed or was interrupted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = (server._request(f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish\n{server.log_tail()}")


def assert_lora_changes_ksampler(server, plain_graph: dict, lora_graph: dict) -> None:
    """Run a KSampler graph without and with the LoRA: no "lora key not loaded" line, another image."""
    log_before = server.log_text()
    plain = _image(server, server.run(plain_graph, timeout=900))
    patched = _image(server, server.run(lora_graph, timeout=900))
    new_log = server.log_text()[len(log_before):]
    assert "lora key not loaded" not in new_log, new_log[-3000:]
    assert np.abs(plain - patched).mean() > 0.01


def _messages(entry: dict) -> str:
    return json.dumps(entry["status"].get("messages", []))


def test_node_list_and_inputs(server):
    info = server.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("AlignProp_")}
    assert {"AlignProp_Trainer", "AlignProp_SamplerSettings", "AlignProp_PreviewSampler", "AlignProp_ScoreImages",
            *(node_type for node_type, _, _ in SETTINGS_NODES.values()),
            "AlignProp_RewardMixer", "AlignProp_SaveLora", "AlignProp_LoadLora", "AlignProp_MixLoras",
            "AlignProp_AestheticReward", "AlignProp_HPSReward", "AlignProp_PickScoreReward",
            "AlignProp_CLIPScoreReward", "AlignProp_CompressibilityReward", "AlignProp_ObjectCountReward"} <= set(ours)
    trainer = ours["AlignProp_Trainer"]["input"]
    assert {"model", "clip", "vae", "reward", "prompts", "lora_name"} <= set(trainer["required"])
    # the settings sockets are optional, and each settings node holds exactly its inputs
    assert set(SETTINGS_NODES) <= set(trainer["optional"])
    for socket, (node_type, _, names) in SETTINGS_NODES.items():
        held = ours[node_type]["input"]
        # inputs added after workflows were saved are optional, so those workflows still validate
        assert [*held["required"], *held.get("optional", {})] == list(names), node_type
        assert ours[node_type]["output"] == [trainer["optional"][socket][0]], node_type
    for name, node in ours.items():
        assert node["category"].startswith("AlignProp/"), name
        assert node["description"].strip(), f"{name} has no description"
        for spec in {**node["input"].get("required", {}), **node["input"].get("optional", {})}.values():
            assert spec[1].get("tooltip") if len(spec) > 1 else False, (name, spec)


@pytest.mark.parametrize("kind,res", [("sd15", False), ("sdxl", False), ("sd15", True), ("sdxl", True)])
def test_trained_lora_loads_in_loraloader_and_changes_ksampler(server, kind, res, request):
    """res: the LoRA also covers the res blocks (conv LoRA on ComfyUI's in_layers.2/out_layers.3, ...)."""
    ckpt = request.getfixturevalue(f"{kind}_checkpoint")
    started = time.monotonic()
    name = f"{kind}_res" if res else kind
    overrides = {"target_modules": RES_TARGETS} if res else {}
    server.run(trainer_graph(ckpt, f"alignprop_test/{name}", **overrides), timeout=1200)
    print(f"\n[comfyui] {name} trainer run: {time.monotonic() - started:.1f} s")
    path = server.models_dir / "loras" / "alignprop_test" / f"{name}.safetensors"
    lora = load_lora(path)
    assert lora.metadata["alignprop.step"] == "2" and lora.rank == 4
    convs = [k for k, v in lora.state.items() if k.endswith("lora_down.weight") and v.dim() == 4
             and ("resnets" in k or "_0_in_layers_2" in k or "_0_out_layers_3" in k)]
    assert bool(convs) == res, convs[:3]

    assert_lora_changes_ksampler(server, ksampler_graph(ckpt, f"{kind}_plain", None),
                                 ksampler_graph(ckpt, f"{name}_lora", f"alignprop_test/{name}.safetensors"))


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped_abs", "a/../../escaped"])
def test_lora_name_cannot_escape_models_loras(server, sd15_checkpoint, name):
    entry = _wait_any(server, server.queue(trainer_graph(sd15_checkpoint, name, steps=1)))
    assert entry["status"]["status_str"] == "error"
    assert "must be relative" in _messages(entry) or "resolves outside" in _messages(entry)
    assert not list(server.base_dir.glob("**/escaped*")) and not list(server.base_dir.parent.glob("escaped*"))


@pytest.mark.parametrize("overrides, message", [
    ({"prompts": "\n# nothing\n"}, "holds no prompts"),
    ({"width": 60}, "multiples of the VAE factor 8"),
])
def test_bad_input_is_reported_and_server_keeps_serving(server, sd15_checkpoint, overrides, message):
    entry = _wait_any(server, server.queue(trainer_graph(sd15_checkpoint, "alignprop_test/bad", **overrides)))
    assert entry["status"]["status_str"] == "error" and message in _messages(entry), _messages(entry)
    assert server.object_info()  # still serving


def test_interrupt_saves_a_partial_lora_and_server_keeps_serving(server, sd15_checkpoint):
    prompt_id = server.queue(trainer_graph(sd15_checkpoint, "alignprop_test/interrupted", steps=500))
    deadline = time.monotonic() + 600
    while "AlignProp step 1/500" not in server.log_text():
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    server.interrupt()
    entry = _wait_any(server, prompt_id)
    assert "execution_interrupted" in _messages(entry), _messages(entry)
    folder = server.models_dir / "loras" / "alignprop_test"
    assert not (folder / "interrupted.safetensors").exists()  # the final name is for finished runs
    lora = load_lora(folder / "interrupted-partial.safetensors")
    done = int(lora.metadata["alignprop.step"])
    assert 1 <= done < 500
    server.run(ksampler_graph(sd15_checkpoint, "after_interrupt", "alignprop_test/interrupted-partial.safetensors"))
    # resume to one step more (constant learning rate: the schedule does not depend on the total)
    server.run(trainer_graph(sd15_checkpoint, "alignprop_test/interrupted", steps=done + 1, resume=True))
    server.run(trainer_graph(sd15_checkpoint, "alignprop_test/straight", steps=done + 1))
    resumed, straight = load_lora(folder / "interrupted.safetensors"), load_lora(folder / "straight.safetensors")
    assert resumed.metadata["alignprop.step"] == str(done + 1)
    assert all(torch.equal(resumed.state[k], straight.state[k]) for k in straight.state)


def test_prompt_list_file_replaces_the_prompts_text(server, sd15_checkpoint):
    prompt_dir = server.base_dir / "input" / "prompt_lists"
    prompt_dir.mkdir(parents=True, exist_ok=True)
    (prompt_dir / "birds.txt").write_text("# birds\nswan\nowl\n")
    spec = server.object_info()["AlignProp_Trainer"]["input"]["optional"]["prompt_file"]
    options = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # the v3 and the legacy form
    assert "shipped/animals.txt" in options and "prompt_lists/birds.txt" in options
    server.run(trainer_graph(sd15_checkpoint, "alignprop_test/from_file", steps=1,
                             prompts="", prompt_file="prompt_lists/birds.txt"), timeout=600)
    lora = load_lora(server.models_dir / "loras" / "alignprop_test" / "from_file.safetensors")
    assert lora.metadata["alignprop.step"] == "1"
    # a name that is not one of the choices (here one leaving the input folder) is refused before
    # anything is read
    entry = _wait_any(server, server.queue(trainer_graph(sd15_checkpoint, "alignprop_test/x",
                                                         prompt_file="../../../etc/passwd")))
    assert entry["status"]["status_str"] == "error", _messages(entry)
    assert "prompt_file='../../../etc/passwd' is not one of its options" in _messages(entry), _messages(entry)


def _step_of(path) -> str:
    return load_lora(path).metadata["alignprop.step"]


def test_a_second_run_never_replaces_the_first_lora(server, sd15_checkpoint):
    """Train `x` for 2 steps; run `x` again: without overwrite the second LoRA gets a numbered name; with
    overwrite but cancelled, the finished `x` stays and the cancelled run keeps x-partial."""
    folder = server.models_dir / "loras" / "alignprop_test"
    server.run(trainer_graph(sd15_checkpoint, "alignprop_test/again", steps=2))
    first = (folder / "again.safetensors").read_bytes()
    server.run(trainer_graph(sd15_checkpoint, "alignprop_test/again", steps=1))
    assert _step_of(folder / "again_00001.safetensors") == "1"
    assert (folder / "again.safetensors").read_bytes() == first
    # a run with overwrite on that is cancelled mid-training still leaves the finished LoRA alone
    log_start = len(server.log_text())
    prompt_id = server.queue(trainer_graph(sd15_checkpoint, "alignprop_test/again", steps=500, overwrite=True,
                                           seed=1))
    deadline = time.monotonic() + 600
    while "AlignProp step 1/500" not in server.log_text()[log_start:]:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    server.interrupt()
    assert "execution_interrupted" in _messages(_wait_any(server, prompt_id))
    assert (folder / "again.safetensors").read_bytes() == first  # the finished LoRA is untouched
    assert int(_step_of(folder / "again-partial.safetensors")) >= 1


def test_an_init_lora_holding_nan_is_refused_before_training(server, sd15_checkpoint):
    from safetensors.torch import save_file

    name = "alignprop_test_init/nan_init.safetensors"
    path = server.models_dir / "loras" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    down, up = torch.zeros(4, 320), torch.zeros(320, 4)
    up[0, 0] = float("nan")
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{block}.lora_down.weight": down, f"{block}.lora_up.weight": up,
               f"{block}.alpha": torch.tensor(4.0)}, str(path))
    graph = trainer_graph(sd15_checkpoint, "alignprop_test_init/from_nan", steps=1)
    graph["9"] = {"class_type": "AlignProp_LoadLora", "inputs": {"lora_name": name}}
    graph["4"]["inputs"]["init_lora"] = ["9", 0]
    del graph["4"]["inputs"]["lora_settings"], graph[SETTINGS_NODES["lora_settings"][1]]  # the file sets them
    entry = _wait_any(server, server.queue(graph))
    assert entry["status"]["status_str"] == "error" and "holds 1 NaN" in _messages(entry), _messages(entry)
    assert sorted(p.name for p in path.parent.iterdir()) == ["nan_init.safetensors"]  # nothing written
    assert not (server.base_dir / "output" / "alignprop_state" / "alignprop_test_init").exists()
