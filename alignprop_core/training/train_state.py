"""Saving and restoring the full training state, for exact resume.

The state holds the step, the LoRA tensors, the AdamW moments, the grad-scaler state, the trainer's
random generator and the metric history. It is written atomically with `torch.save` and read back with
`torch.load(weights_only=True)`, so a state file can never run code when loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files.outputs import write_atomically

from ..files.safe_load import load_error_reason, quiet_pickle_protocol_warning


@dataclass
class TrainState:
    """Everything needed to continue a run as if it had never stopped."""

    step: int  # optimiser steps completed
    lora: dict[str, torch.Tensor]  # peft-form LoRA tensors
    optimizer: dict[str, Any]  # torch.optim state_dict
    scaler: dict[str, Any]  # torch.amp.GradScaler state_dict (empty when unused)
    generator: torch.Tensor  # torch.Generator.get_state() of the trainer's generator
    history: list[dict[str, Any]] = field(default_factory=list)  # per-step metrics so far
    evals: list[dict[str, Any]] = field(default_factory=list)  # evaluation results so far
    config: dict[str, Any] = field(default_factory=dict)  # the run's configs, to detect mismatches
    reward_state: dict[str, Any] = field(default_factory=dict)  # e.g. a mixture's running statistics


def save_train_state(path: str | os.PathLike, state: TrainState) -> Path:
    """Write `state` to `path` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": state.step,
        "lora": {k: v.detach().cpu().contiguous() for k, v in state.lora.items()},
        "optimizer": state.optimizer,
        "scaler": state.scaler,
        "generator": state.generator.cpu(),
        # metrics and configs travel as JSON text: plain data, loadable with weights_only=True
        "history": json.dumps(state.history),
        "evals": json.dumps(state.evals),
        "config": json.dumps(state.config),
        "reward_state": json.dumps(state.reward_state),
    }
    return write_atomically(path, lambda tmp: torch.save(payload, tmp))


def load_train_state(path: str | os.PathLike) -> TrainState:
    """Read a state written by `save_train_state` (no pickled code is ever executed).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: `path` is a folder, empty, damaged, holds pickled objects other than tensors and
            plain data (refused, never run), or is not an AlignProp training state.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training state {path} does not exist; give a file written by a "
                                "run with save_every > 0 (it is named train_state.pt in the output folder).")
    if path.is_dir():
        raise ValueError(f"training state {path} is a folder; give the train_state.pt file inside it.")
    if path.stat().st_size == 0:
        raise ValueError(f"training state {path} is empty (0 bytes); give a train_state.pt written by a "
                         "run with save_every > 0, or start without resuming.")
    try:
        with quiet_pickle_protocol_warning():
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure means: not a state we can read safely
        raise ValueError(f"training state {path} cannot be read safely ({load_error_reason(err)}); give "
                         "a train_state.pt written by AlignProp (pickled code is refused, never run), "
                         "or start without resuming.") from err
    missing = sorted({"step", "lora", "optimizer", "generator"} - set(raw)) if isinstance(raw, dict) else []
    if not isinstance(raw, dict) or missing:
        found = f"missing {missing}" if missing else f"it holds a {type(raw).__name__}, not a dict"
        raise ValueError(f"training state {path} is not an AlignProp training state ({found}); give "
                         "the train_state.pt of a run with save_every > 0.")
    try:
        return TrainState(step=int(raw["step"]), lora=raw["lora"], optimizer=raw["optimizer"],
                          scaler=raw.get("scaler", {}), generator=raw["generator"],
                          history=json.loads(raw.get("history", "[]")),
                          evals=json.loads(raw.get("evals", "[]")),
                          config=json.loads(raw.get("config", "{}")),
                          reward_state=json.loads(raw.get("reward_state", "{}")))
    except (TypeError, ValueError) as err:
        raise ValueError(f"training state {path} has a malformed field ({type(err).__name__}: {err}); "
                         "give an unmodified train_state.pt, or start without resuming.") from err


def check_resumable(state: TrainState, config: dict[str, Any], source: str | Path) -> None:
    """A saved state continues only the run it came from: same LoRA settings, same reward spec."""
    if not state.config:
        return
    if state.config.get("lora") != config["lora"]:
        raise ValueError(f"{source} was trained with LoRA settings {state.config.get('lora')}, "
                         f"not {config['lora']}; resume with the same LoRA settings.")
    saved, now = state.config.get("train", {}).get("reward"), config["train"]["reward"]
    if saved != now:
        raise ValueError(f"{source} was trained with the reward {saved}, but this run's reward is {now}; "
                         "resume with the same reward and arguments, or start a new run.")

