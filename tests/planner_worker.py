"""One memory measurement in a fresh process, for tests/test_planner.py: `python tests/planner_worker.py
'<JSON>'` prints one JSON line.

JSON: {"model": "tiny" | "toy", "mode": "probe" | "train", "k", "batch", "checkpoint"}. probe: the
planner's StepCosts for the model's run. train: the peak RSS above the memory held before the LoRA is
added, over two optimiser steps at K, batch and checkpointing (UNet and VAE alike) as given: what the
planner estimates. A process per measurement keeps one heap's retention out of the other's peak.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig  # noqa: E402
from alignprop_core.lora import add_lora  # noqa: E402
from alignprop_core.planning import probe_costs  # noqa: E402
from alignprop_core.planning.host_memory import PeakMeter  # noqa: E402
from alignprop_core.rewards import make_reward  # noqa: E402
from alignprop_core.training.step import make_optimizer, make_scaler, optimizer_step  # noqa: E402


def model_run(model: str):
    """(backend, reward, prompts, sampler, lora, cfg) of the tiny model or the toy world."""
    sampler, lora = SamplerConfig(steps=10, guidance_scale=4.0), LoraConfig(rank=8, alpha=8.0)
    if model == "toy":
        from alignprop_core.files.prompts import shipped_prompts
        from alignprop_core.models.loading import load_backend
        from alignprop_core.toy import toy_model_dir

        return (load_backend(toy_model_dir()), make_reward("toy_count"), shipped_prompts("toy_train"),
                sampler, lora, TrainConfig(reward="toy_count", width=32, height=32, eval_every=0))
    from alignprop_core.models.backend import diffusers_backend
    from alignprop_core.models.tiny_model import build_tiny_model

    return (diffusers_backend(build_tiny_model(0)), make_reward("smoothness"), ["a red cat", "a blue dog"],
            sampler, lora, TrainConfig(reward="smoothness", width=32, height=32, eval_every=0))


def main(raw: dict) -> dict:
    torch.set_num_threads(1)
    backend, reward, prompts, sampler, lora, cfg = model_run(raw["model"])
    if raw["mode"] == "probe":
        return dataclasses.asdict(probe_costs(backend, reward, prompts, sampler, lora, cfg))
    sampler = dataclasses.replace(sampler, k=raw["k"], checkpoint_unet=raw["checkpoint"],
                                  checkpoint_vae=raw["checkpoint"])
    cfg = dataclasses.replace(cfg, batch_size=raw["batch"])
    meter = PeakMeter(torch.device("cpu"))
    meter.start()
    params = add_lora(backend.lora_target, lora)
    optimizer, scaler = make_optimizer(params, cfg), make_scaler(backend.device, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in range(2):
        optimizer_step(backend, reward, prompts, sampler, cfg, params, optimizer, scaler, gen, step)
    return {"peak": meter.peak_above_baseline()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
