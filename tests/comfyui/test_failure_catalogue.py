"""The node rows of the bad-input catalogue (tests/failure_catalogue.py) on one real ComfyUI server.

Each row puts one bad value into an otherwise good graph (random SD1.5 checkpoint) and queues it: the
prompt fails with a message that holds the row's fragments and names the input, from the row's own
node (or from ComfyUI's range check when the prompt is queued); models/loras and the output folder
(with the trainer's alignprop_state) hold the same files and folders afterwards; and the server
still answers. After the whole table a tiny training run succeeds on the same server.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from alignprop_core.lora import load_lora
from failure_catalogue import (APPLY, COMPRESSIBILITY, EVALUATION, LOAD, LORA_SETTINGS, MIX, MIXER, NODE_ROWS,
                               OBJECTIVE, OPTIMIZER, PREVIEW, SAMPLER, SAVE, SIMPLE, TRAINER, BadInput)

pytestmark = pytest.mark.slow

FOLDER = "alignprop_catalogue"  # in models/loras: the one LoRA the LoRA rows load
GOOD_LORA = f"{FOLDER}/good.safetensors"
NEVER = "catalogue_never_written"  # the trainer's lora_name unless a row gives one: no sub-folder to make
SAMPLER_INPUTS = {"steps": 2, "eta": 0.0, "guidance_scale": 5.0, "use_cfg": True, "truncation": "fixed", "k": 1,
                  "k_min": 1, "k_max": 1, "k_mean": 1.0, "k_std": 0.0, "checkpoint_unet": True,
                  "checkpoint_vae": True}
TRAIN_INPUTS = {"steps": 1, "batch_size": 1, "lr": 1e-3, "width": 64, "height": 64, "seed": 0}
# the trainer's settings nodes: node type -> (the trainer's socket, node id, inputs)
SETTINGS = {
    OPTIMIZER: ("optimizer", "21", {"grad_accum": 1, "lr_schedule": "constant", "lr_warmup_steps": 0,
                                    "weight_decay": 1e-4, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8,
                                    "max_grad_norm": 1.0, "mixed_precision": "no"}),
    EVALUATION: ("evaluation", "22", {"eval_every": 0, "eval_seed": 1234, "eval_latents": 1, "eval_batch_size": 1,
                                      "save_every": 0}),
    OBJECTIVE: ("objective", "23", {"loss": "maximize", "reward_target": 10.0, "reward_augment": "none",
                                    "negative_prompt": ""}),
    LORA_SETTINGS: ("lora_settings", "24", {"rank": 4, "alpha": 4.0, "target_modules": "to_q, to_k, to_v, to_out.0",
                                            "init_seed": 0}),
}
SIMPLE_INPUTS = {"kind": "smoothness", "red": 1.0, "green": 0.5, "blue": 0.1}


def _base(ckpt: str) -> dict:
    """Checkpoint, reward and sampler settings: what every graph starts from."""
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": SIMPLE, "inputs": dict(SIMPLE_INPUTS)},
            "3": {"class_type": SAMPLER, "inputs": dict(SAMPLER_INPUTS)}}


def _trainer(graph: dict, reward: list, **inputs) -> dict:
    """The trainer with its settings nodes, and a preview of its reward curve."""
    sockets = {}
    for node_type, (socket, node_id, values) in SETTINGS.items():
        graph[node_id] = {"class_type": node_type, "inputs": dict(values)}
        sockets[socket] = [node_id, 0]
    graph["4"] = {"class_type": TRAINER, "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "reward": reward, "sampler": ["3", 0], **sockets,
        "prompts": "cat\ndog", "lora_name": NEVER, **TRAIN_INPUTS, **inputs}}
    graph["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 2]}}
    return graph


def _lora_graph(graph: dict, surface: str, given: dict) -> dict:
    """Load -> (Mix ->) Save, or Load -> Apply -> Preview as Text; the row's node gets `given`."""
    graph["9"] = {"class_type": LOAD, "inputs": {"lora_name": GOOD_LORA}}
    lora = ["9", 0]
    if surface == MIX:
        graph["11"] = {"class_type": MIX, "inputs": {"lora_a": lora, "lora_b": lora, "t": 0.5, "mode": "weights"}}
        lora = ["11", 0]
    if surface == APPLY:
        graph["14"] = {"class_type": APPLY, "inputs": {"model": ["1", 0], "lora": lora, "strength": 1.0}}
        graph["15"] = {"class_type": "PreviewAny", "inputs": {"source": ["14", 0]}}
    else:
        graph["12"] = {"class_type": SAVE, "inputs": {"lora": lora, "lora_name": f"{FOLDER}/never",
                                                      "dtype": "fp32"}}
    target = {LOAD: "9", MIX: "11", SAVE: "12", APPLY: "14"}[surface]
    graph[target]["inputs"].update(given)
    return graph


def graph_for(row: BadInput, ckpt: str) -> dict:
    """A good graph around the row's node, with the row's bad value in it."""
    graph = _base(ckpt)
    if row.surface == TRAINER:
        return _trainer(graph, ["2", 0], **row.given)
    if row.surface in SETTINGS:
        graph = _trainer(graph, ["2", 0])
        graph[SETTINGS[row.surface][1]]["inputs"].update(row.given)
        return graph
    if row.surface in (SAMPLER, SIMPLE):
        graph["3" if row.surface == SAMPLER else "2"]["inputs"].update(row.given)
        return _trainer(graph, ["2", 0])
    if row.surface == COMPRESSIBILITY:
        graph["2"] = {"class_type": COMPRESSIBILITY, "inputs": {"quality": 95, "direction": "compressible",
                                                                **row.given}}
        return _trainer(graph, ["2", 0])
    if row.surface == MIXER:
        graph["8"] = {"class_type": MIXER, "inputs": {"reward_1": ["2", 0], "weight_1": 1.0, "reward_2": ["2", 0],
                                                      "weight_2": 1.0, "weight_3": 1.0, "standardize": False,
                                                      **row.given}}
        return _trainer(graph, ["8", 0])
    if row.surface == PREVIEW:
        graph["6"] = {"class_type": PREVIEW, "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "sampler": ["3", 0], "prompt": "a cat",
            "negative_prompt": "", "width": 64, "height": 64, "seed": 0, **row.given}}
        graph["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
        return graph
    if row.surface in (LOAD, MIX, SAVE, APPLY):
        return _lora_graph(graph, row.surface, row.given)
    raise ValueError(f"no graph for surface {row.surface!r}; add one to graph_for")


def _snapshot(server) -> set[tuple[str, int, int]]:
    """Every file and folder under models/loras and output (which holds alignprop_state), with its size
    and modification time."""
    found = set()
    for root in (server.models_dir / "loras", server.output_dir):
        for path in root.rglob("*"):
            stat = path.lstat()
            found.add((str(path.relative_to(server.base_dir)), stat.st_size if path.is_file() else -1,
                       stat.st_mtime_ns if path.is_file() else 0))
    return found


def _finish(server, prompt_id: str, timeout: float = 300.0) -> dict:
    """History entry of a prompt once it has finished, successfully or not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = (server._request(f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and entry.get("status", {}).get("status_str"):
            return entry
        time.sleep(0.1)
    raise TimeoutError(f"prompt {prompt_id} did not finish\n{server.log_tail()}")


def _refusal(server, row: BadInput, graph: dict) -> str:
    """The error text of the row's graph: the failing node's exception, or ComfyUI's validation
    errors ('message: details', as ComfyUI logs them) when it refuses the prompt outright."""
    try:
        prompt_id = server.queue(graph)
    except RuntimeError as err:  # HTTP 400 from /prompt
        assert row.comfy_validation, f"{row.id}: ComfyUI refused the prompt itself: {err}"
        reply = json.loads(str(err).split("): ", 1)[1])
        return "\n".join(f"{e['message']}: {e['details']}" for node in reply["node_errors"].values()
                         for e in node["errors"])
    assert not row.comfy_validation, f"{row.id}: ComfyUI queued the prompt; its range check did not refuse it"
    entry = _finish(server, prompt_id)
    assert entry["status"]["status_str"] == "error", (row.id, entry["status"])
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors and errors[0]["node_type"] == row.surface, (row.id, errors)
    return f"{errors[0]['exception_type']}: {errors[0]['exception_message']}"


@pytest.fixture(scope="module")
def good_lora(server) -> str:
    """A rank-4 LoRA on one attention layer of the random SD1.5 UNet, for the LoRA rows to load."""
    g = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = server.models_dir / "loras" / GOOD_LORA
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"{name}.lora_down.weight": torch.randn(4, 320, generator=g) * 0.1,
               f"{name}.lora_up.weight": torch.randn(320, 4, generator=g) * 0.1,
               f"{name}.alpha": torch.tensor(4.0)}, str(path))
    return GOOD_LORA


@pytest.mark.parametrize("row", NODE_ROWS, ids=[row.id for row in NODE_ROWS])
def test_bad_node_input_is_refused_by_name_and_writes_nothing(server, sd15_checkpoint, good_lora, row):
    before = _snapshot(server)
    message = _refusal(server, row, graph_for(row, sd15_checkpoint))
    print(f"\n[catalogue] {row.id}: {message[:300]}")
    for fragment in row.expect:
        assert fragment in message, (row.id, fragment, message)
    assert row.named_by in message, (row.id, message)
    assert _snapshot(server) ^ before == set(), (row.id, _snapshot(server) ^ before)
    assert TRAINER in server.object_info()  # the server still answers


@pytest.mark.parametrize("given", [{"resume": True}, {"width": 60}], ids=["resume", "width"])
def test_refused_run_leaves_no_new_folder(server, sd15_checkpoint, given):
    folder = server.models_dir / "loras" / "catalogue_new_folder"
    before = _snapshot(server)
    entry = _finish(server, server.queue(_trainer(_base(sd15_checkpoint), ["2", 0],
                                                  lora_name="catalogue_new_folder/never", **given)))
    assert entry["status"]["status_str"] == "error"
    made = _snapshot(server) ^ before
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()  # so the next case starts without it
    assert made == set(), made


def test_training_succeeds_after_the_catalogue(server, sd15_checkpoint):
    graph = _trainer(_base(sd15_checkpoint), ["2", 0], lora_name=f"{FOLDER}/after_catalogue", overwrite=True)
    started = time.monotonic()
    entry = server.run(graph, timeout=900)
    print(f"\n[catalogue] tiny training run after the table: {time.monotonic() - started:.1f} s")
    assert entry["status"]["status_str"] == "success"
    lora = load_lora(Path(server.models_dir / "loras" / FOLDER / "after_catalogue.safetensors"))
    assert lora.metadata["alignprop.step"] == "1"
    assert all(math.isfinite(float(t.abs().sum())) for t in lora.state.values())

