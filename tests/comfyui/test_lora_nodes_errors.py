"""The LoRA nodes on a real ComfyUI server: bad LoRAs and inputs are refused, files are never clobbered.

AlignProp Apply LoRA refuses, on the random SD1.5 checkpoint, a LoRA whose shapes are SDXL's or
corrupted, one holding NaN, one whose modules the model lacks, and a NaN strength; each failure names
the problem, ComfyUI's own "shape invalid" patching errors never appear, and the server runs the next
prompt. A LoRA that fits applies. AlignProp Save LoRA writes a numbered file when the name exists and
replaces it only with overwrite on.
"""
from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import harness

pytestmark = pytest.mark.slow

FOLDER = "alignprop_lora_errors"
CH, CTX = harness.UNET_CONFIGS["sd15"]["model_channels"], harness.UNET_CONFIGS["sd15"]["context_dim"]
BLOCK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"  # LDM input_blocks.1.1, CH channels
TO_K = f"{BLOCK}_attn2_to_k"  # weight (CH, CTX): cross attention on the text features
RANK = 4


def good_state() -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on two attention layers of the harness's SD1.5 UNet (diffusers names)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, in_features in ((f"{BLOCK}_attn1_to_q", CH), (TO_K, CTX)):
        state[f"{name}.lora_down.weight"] = torch.randn(RANK, in_features, generator=g) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(CH, RANK, generator=g) * 0.1
        state[f"{name}.alpha"] = torch.tensor(float(RANK))
    return state


def write_lora(server, name: str, state: dict[str, torch.Tensor]) -> str:
    path = server.models_dir / "loras" / FOLDER / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return f"{FOLDER}/{name}.safetensors"


def apply_graph(ckpt: str, lora_name: str, strength: float = 1.0, prefix: str = "lora_errors") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "AlignProp_LoadLora", "inputs": {"lora_name": lora_name}},
        "3": {"class_type": "AlignProp_ApplyLora", "inputs": {"model": ["1", 0], "lora": ["2", 0],
                                                              "strength": strength}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["4", 0],
                                                   "latent_image": ["5", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def finish(server, prompt: dict, timeout: float = 900.0) -> dict:
    """History entry of a prompt once it has finished, successfully or not."""
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = (server._request(f"/history/{prompt_id}") or {}).get(prompt_id)
        if entry and entry.get("status", {}).get("status_str"):
            return entry
        time.sleep(0.5)
    raise TimeoutError(f"prompt {prompt_id} did not finish\n{server.log_tail()}")


def error_of(entry: dict) -> str:
    """The exception message of a failed prompt (fails the test if it succeeded)."""
    assert entry["status"]["status_str"] == "error", entry["status"]
    errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert errors, entry["status"]["messages"]
    return errors[0]["exception_message"]


def _sdxl_width(state):
    return {**state, f"{TO_K}.lora_down.weight": torch.zeros(RANK, 2048)}  # SDXL's context width


def _corrupt_up(state):
    return {**state, f"{BLOCK}_attn1_to_q.lora_up.weight": torch.zeros(CH + 1, RANK)}


def _with_nan(state):
    broken = state[f"{TO_K}.lora_up.weight"].clone()
    broken[3, 1] = float("nan")
    return {**state, f"{TO_K}.lora_up.weight": broken}


def _foreign_module(state):
    name = f"{BLOCK.replace('blocks_0', 'blocks_7')}_attn1_to_q"  # depth 8+: an SDXL block
    return {**state, f"{name}.lora_down.weight": torch.zeros(RANK, CH), f"{name}.lora_up.weight":
            torch.zeros(CH, RANK), f"{name}.alpha": torch.tensor(float(RANK))}


@pytest.mark.parametrize("name, corrupt, expected", [
    ("sdxl_width", _sdxl_width, [f"LoRA key '{TO_K}.lora_down.weight' has shape (4, 2048)",
                                 f"weight shape ({CH}, {CTX})", f"would need (4, {CTX})",
                                 "made for another model"]),
    ("corrupt_up", _corrupt_up, [f"LoRA key '{BLOCK}_attn1_to_q.lora_up.weight' has shape ({CH + 1}, 4)",
                                 f"weight shape ({CH}, {CH})", "made for another model"]),
    ("nan", _with_nan, [f"tensor '{TO_K}.lora_up.weight' holds 1 NaN", "broken", "retrain it or pick another"]),
    ("foreign_module", _foreign_module, ["1 LoRA module(s) are not in this MODEL", "transformer_blocks_7",
                                         "made for another model"]),
])
def test_apply_refuses_a_lora_that_does_not_fit(server, sd15_checkpoint, name, corrupt, expected):
    lora_name = write_lora(server, name, corrupt(good_state()))
    log_before = server.log_text()
    message = error_of(finish(server, apply_graph(sd15_checkpoint, lora_name)))
    for part in expected:
        assert part in message, message
    assert "shape invalid" not in server.log_text()[len(log_before):]  # ComfyUI never tried to patch


def test_apply_refuses_a_nan_strength_then_applies_a_fitting_lora(server, sd15_checkpoint):
    lora_name = write_lora(server, "good", good_state())
    message = error_of(finish(server, apply_graph(sd15_checkpoint, lora_name, strength=float("nan"))))
    assert "strength must be a finite number" in message, message
    log_before = server.log_text()
    entry = finish(server, apply_graph(sd15_checkpoint, lora_name, prefix="lora_errors_good"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    new_log = server.log_text()[len(log_before):]
    assert "shape invalid" not in new_log and "lora key not loaded" not in new_log, new_log[-3000:]


def save_graph(lora_name: str, name: str, dtype: str, overwrite: bool | None = None, t: float = 0.5,
               mode: str = "weights") -> dict:
    save = {"lora": ["2", 0], "lora_name": name, "dtype": dtype}
    if overwrite is not None:
        save["overwrite"] = overwrite
    return {
        "1": {"class_type": "AlignProp_LoadLora", "inputs": {"lora_name": lora_name}},
        "2": {"class_type": "AlignProp_MixLoras", "inputs": {"lora_a": ["1", 0], "lora_b": ["1", 0], "t": t,
                                                             "mode": mode}},
        "3": {"class_type": "AlignProp_SaveLora", "inputs": save},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }


def written_path(entry: dict) -> str:
    assert entry["status"]["status_str"] == "success", entry["status"]
    (text,) = entry["outputs"]["4"]["text"]
    return text


def test_save_never_replaces_a_file_unless_told(server):
    lora_name = write_lora(server, "to_save", good_state())
    folder = server.models_dir / "loras" / FOLDER
    name = f"{FOLDER}/saved"
    # each run differs in dtype, or ComfyUI would answer the repeat from its cache without saving
    first = written_path(finish(server, save_graph(lora_name, name, "fp32")))
    second = written_path(finish(server, save_graph(lora_name, name, "fp16")))
    assert first == str(folder / "saved.safetensors") and second == str(folder / "saved_00001.safetensors")
    assert load_file(first)[f"{TO_K}.lora_up.weight"].dtype == torch.float32
    assert load_file(second)[f"{TO_K}.lora_up.weight"].dtype == torch.float16
    third = written_path(finish(server, save_graph(lora_name, name, "bf16", overwrite=True)))
    assert third == first and load_file(first)[f"{TO_K}.lora_up.weight"].dtype == torch.bfloat16
    assert sorted(p.name for p in folder.glob("saved*")) == ["saved.safetensors", "saved_00001.safetensors"]


@pytest.mark.parametrize("change, expected", [
    ({"t": float("nan")}, "t must be a finite number"),
    ({"mode": "blend"}, "mode='blend' is not one of its options"),
    ({"dtype": "fp8"}, "dtype='fp8' is not one of its options"),
    ({"name": "bad.ckpt"}, "ends in .ckpt"),
])
def test_mix_and_save_refuse_bad_inputs(server, change, expected):
    lora_name = write_lora(server, "to_mix", good_state())
    args = {"name": f"{FOLDER}/never", "dtype": "fp32", **change}
    entry = finish(server, save_graph(lora_name, **args))
    message = error_of(entry)
    assert expected in message, json.dumps(entry["status"])[-2000:]
    assert not list((server.models_dir / "loras").glob("**/never*"))
    assert not list((server.models_dir / "loras").glob("**/bad*"))
