"""The trainer's settings nodes on a real ComfyUI server: a short trainer, and settings that reach the run.

ComfyUI 0.3.75 cannot hide rarely changed inputs, so the AlignProp Trainer shows at most 15 widgets
and takes the rest from the Optimizer, Evaluation, Objective and LoRA Settings nodes. Here
/object_info shows that split (every config field on exactly one node, with the config's default),
and two tiny training runs show that values set on the settings nodes are the ones the run used
(the LoRA's metadata holds the run's whole config) and that unconnected sockets give the defaults.
"""
from __future__ import annotations

import json
from dataclasses import fields

import pytest
import torch

from alignprop_core.config import LoraConfig, TrainConfig
from alignprop_core.lora import load_lora
from test_trainer_server import SETTINGS_NODES, _messages, _wait_any, trainer_graph
from test_workflows import widget_layout

pytestmark = pytest.mark.slow

MAX_WIDGETS = 15
# what users change, kept on the trainer
TRAINER_WIDGETS = {"prompts", "prompt_file", "eval_prompts", "lora_name", "steps", "lr", "width", "height",
                   "batch_size", "seed", "overwrite", "resume", "preview_every", "memory_budget"}
# a value other than the default for every setting a CPU run can take (mixed precision needs CUDA)
CHANGED = {"grad_accum": 2, "lr_schedule": "cosine", "lr_warmup_steps": 1, "weight_decay": 0.01, "adam_beta1": 0.8,
           "adam_beta2": 0.99, "adam_eps": 1e-6, "max_grad_norm": 0.5, "offload_reward": True,
           "eval_every": 1, "eval_seed": 7, "eval_latents": 2, "eval_batch_size": 1, "save_every": 1,
           "best_by": "diversity", "keep_best": False, "early_stop_evals": 3,
           "loss": "target", "reward_target": 0.5, "reward_augment": "hflip", "negative_prompt": "blurry",
           "kl_weight": 0.5, "lora_l2_weight": 0.1,
           "rank": 2, "alpha": 1.0, "target_modules": "to_q, to_v", "init_seed": 5}
LORA_FIELDS = {f.name for f in fields(LoraConfig)}


def _inputs(info: dict) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _run_config(server, graph: dict, name: str) -> dict:
    server.run(graph, timeout=900)
    lora = load_lora(server.models_dir / "loras" / f"{name}.safetensors")
    assert lora.metadata["alignprop.step"] == "1"
    return json.loads(lora.metadata["alignprop.config"])


def _without_settings(graph: dict) -> dict:
    for socket, (_, node_id, _) in SETTINGS_NODES.items():
        del graph[node_id], graph["4"]["inputs"][socket]
    return graph


def test_trainer_shows_at_most_15_widgets_and_each_setting_on_one_node(server):
    info = server.object_info()
    trainer = info["AlignProp_Trainer"]
    widgets = [name for name, _ in widget_layout(trainer)]
    print(f"\n[settings] the trainer's {len(widgets)} widgets: {widgets}")
    assert len(widgets) <= MAX_WIDGETS, widgets
    assert TRAINER_WIDGETS <= set(widgets), TRAINER_WIDGETS - set(widgets)
    # every TrainConfig field (but reward, the socket) and every LoraConfig field is an input of exactly
    # one node, with the config's own default
    holders: dict[str, list[str]] = {}
    for node_type in ("AlignProp_Trainer", *(t for t, _, _ in SETTINGS_NODES.values())):
        for name, spec in _inputs(info[node_type]).items():
            holders.setdefault(name, []).append(node_type)
    defaults = {**{f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)},
                **{f.name: getattr(LoraConfig(), f.name) for f in fields(LoraConfig)}}
    for name, default in defaults.items():
        if name in ("reward", "judges"):  # sockets, fed by reward nodes
            continue
        expected = ["AlignProp_LoraSettings"] if name in LORA_FIELDS else None
        assert len(holders.get(name, [])) == 1, (name, holders.get(name))
        assert expected is None or holders[name] == expected, (name, holders[name])
        spec = _inputs(info[holders[name][0]])[name]
        shown = ", ".join(default) if isinstance(default, tuple) else default
        assert spec[1]["default"] == shown, (name, spec[1]["default"], default)


def test_values_set_on_the_settings_nodes_are_the_runs(server, sd15_checkpoint):
    name = "alignprop_settings/changed"
    config = _run_config(server, trainer_graph(sd15_checkpoint, name, steps=1, eval_prompts="cat", **CHANGED),
                         name)
    for key, value in CHANGED.items():
        section = "lora" if key in LORA_FIELDS else "train"
        expected = [m.strip() for m in value.split(",")] if key == "target_modules" else value
        assert config[section][key] == expected, (key, config[section][key], value)
    assert load_lora(server.models_dir / "loras" / f"{name}.safetensors").rank == CHANGED["rank"]


def test_unconnected_settings_sockets_give_the_config_defaults(server, sd15_checkpoint):
    name = "alignprop_settings/defaults"
    graph = _without_settings(trainer_graph(sd15_checkpoint, name, steps=1, eval_prompts="cat"))
    config = _run_config(server, graph, name)
    train, lora = config["train"], config["lora"]
    for key in CHANGED:
        default = getattr(LoraConfig() if key in LORA_FIELDS else TrainConfig(), key)
        got = (lora if key in LORA_FIELDS else train)[key]
        assert got == (list(default) if isinstance(default, tuple) else default), (key, got, default)
    assert train["mixed_precision"] == TrainConfig().mixed_precision


def test_a_check_across_nodes_names_the_settings_input(server, sd15_checkpoint):
    """dihedral augmentation (Objective Settings) needs square images (the trainer's width and height)."""
    graph = trainer_graph(sd15_checkpoint, "alignprop_settings/never", reward_augment="dihedral", height=32)
    entry = _wait_any(server, server.queue(graph))
    assert entry["status"]["status_str"] == "error", _messages(entry)
    assert "reward_augment='dihedral' turns images by quarter turns" in _messages(entry), _messages(entry)
    assert "TrainConfig" not in _messages(entry)
    assert not (server.models_dir / "loras" / "alignprop_settings" / "never.safetensors").exists()


def test_init_lora_with_lora_settings_is_refused(server, sd15_checkpoint):
    from safetensors.torch import save_file

    name = "alignprop_settings_init/init.safetensors"
    path = server.models_dir / "loras" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    block = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{block}.lora_down.weight": torch.zeros(4, 320), f"{block}.lora_up.weight": torch.zeros(320, 4),
               f"{block}.alpha": torch.tensor(4.0)}, str(path))
    graph = trainer_graph(sd15_checkpoint, "alignprop_settings_init/continued", steps=1)
    graph["9"] = {"class_type": "AlignProp_LoadLora", "inputs": {"lora_name": name}}
    graph["4"]["inputs"]["init_lora"] = ["9", 0]
    entry = _wait_any(server, server.queue(graph))
    assert entry["status"]["status_str"] == "error", _messages(entry)
    assert "init_lora and lora_settings are both connected" in _messages(entry), _messages(entry)
    assert sorted(p.name for p in path.parent.iterdir()) == ["init.safetensors"]  # nothing written


def test_judges_pick_the_best_lora_and_reach_the_outputs(server, sd15_checkpoint):
    """AlignProp Judges on the trainer's judges socket: every evaluation is judged, best_by names the
    judge, the best LoRA is written beside the final one, and the evaluation table and best path are
    outputs; the pull toward the base model runs on the ComfyUI model (kl_weight); memory_budget auto
    plans on it (with this machine's free memory the fastest plan drops checkpointing)."""
    name = "alignprop_settings/judged"
    graph = trainer_graph(sd15_checkpoint, name, steps=2, eval_every=1, eval_prompts="cat", best_by="color_target",
                          kl_weight=1.0, lora_l2_weight=0.1, memory_budget="auto")
    graph["30"] = {"class_type": "AlignProp_SimpleReward",
                   "inputs": {"kind": "color_target", "red": 0.0, "green": 0.0, "blue": 1.0}}
    graph["31"] = {"class_type": "AlignProp_Judges", "inputs": {"judge_1": ["30", 0]}}
    # a second Judges node chained after the first: its judge comes after, named with #2
    graph["34"] = {"class_type": "AlignProp_SimpleReward",
                   "inputs": {"kind": "color_target", "red": 1.0, "green": 0.0, "blue": 0.0}}
    graph["35"] = {"class_type": "AlignProp_Judges", "inputs": {"judge_1": ["34", 0], "judges": ["31", 0]}}
    graph["4"]["inputs"]["judges"] = ["35", 0]
    graph["32"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 5]}}
    graph["33"] = {"class_type": "PreviewAny", "inputs": {"source": ["4", 6]}}
    entry = server.run(graph, timeout=900)
    table, best_path = (entry["outputs"][node]["text"][0] for node in ("32", "33"))
    folder = server.models_dir / "loras" / "alignprop_settings"
    config = json.loads(load_lora(folder / "judged.safetensors").metadata["alignprop.config"])
    assert config["train"]["judges"] == ["color_target[target=[0.0, 0.0, 1.0]]", "color_target[target=[1.0, 0.0, 0.0]]"]
    assert config["train"]["kl_weight"] == 1.0 and config["train"]["best_by"] == "color_target"
    assert config["sampler"]["checkpoint_unet"] is False and config["sampler"]["checkpoint_vae"] is False
    lines = table.splitlines()
    assert lines[0].split() == ["step", "reward", "color_target", "color_target#2"], table
    rows = [line.split() for line in lines[1:4]]
    assert [r[0] for r in rows] == ["0", "1", "2"], table
    judged = [float(r[-2]) for r in rows]  # the first judge, which best_by names
    best_step = judged.index(max(judged))
    assert rows[best_step][1] == "*", table  # the best row is marked
    assert best_path == str(folder / "judged-best.safetensors"), best_path
    assert load_lora(best_path).metadata["alignprop.step"] == str(best_step)
