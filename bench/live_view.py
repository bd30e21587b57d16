"""The live view's cost to training: train() with the trainer node's live-view hook on / off.

"On" does per step what the AlignProp Trainer node does for its live view: the step's reward (and
each held-out reward) into a `LiveRun`, and, when its throttle allows, the message built and
serialised to JSON as ComfyUI's websocket does. Previews are left out: they are a sampling run the
user asks for with preview_every, not part of the view. Both runs are timed back to back in one
process, round by round; the figure is the median of the per-round ratios (on / off).

    python -m bench.live_view [--model tiny] [--steps 20] [--repeats 5] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.lora import remove_lora
from alignprop_core.rewards import make_reward
from alignprop_core.training.live import LiveRun
from alignprop_core.training.trainer import train
from bench.models import build_backend, default_px
from bench.timing import interleaved_medians, median, paired_ratio

TARGET = 1.02
PROMPTS = ["a cat", "a dog", "a horse", "a cow"]


def view_hook(total: int, sink: list):
    """The node's on_step for its live view, sending into `sink` instead of the websocket."""
    live = LiveRun("bench", total=total)

    def on_step(step: int, metrics: dict) -> None:
        if "eval_reward" in metrics:
            live.add_eval(step, metrics["eval_reward"])
        else:
            live.add_step(step, metrics["reward"])
        if live.due():
            sink.append(json.dumps({"node": "1", **live.message()}))
    return on_step


def run(model: str = "tiny", steps: int = 20, repeats: int = 5, threads: int = 1, reward: str = "smoothness",
        sampler_steps: int = 10) -> dict:
    torch.set_num_threads(threads)
    backend = build_backend(model)
    px = default_px(model)
    sampler = SamplerConfig(steps=sampler_steps, k=1)
    cfg = TrainConfig(reward=reward, steps=steps, batch_size=1, width=px, height=px, eval_every=steps // 2,
                      eval_batch_size=1, seed=0)
    fn = make_reward(reward)
    sent: list[str] = []

    def once(view: bool):
        def go():
            hook = view_hook(steps, sent) if view else None
            try:
                train(backend, fn, PROMPTS, PROMPTS[:1], sampler, LoraConfig(), cfg, on_step=hook)
            finally:  # train() leaves its LoRA layers on the model for the caller to use
                remove_lora(backend.lora_target)
        return go

    times = interleaved_medians({"off": once(False), "on": once(True)}, repeats)
    ratio = paired_ratio(times["on"], times["off"])
    row = {"model": model, "px": px, "train_steps": steps, "T": sampler_steps, "repeats": repeats,
           "off_s": median(times["off"]), "on_s": median(times["on"]), "ratio": ratio, "target": TARGET,
           "met": ratio <= TARGET, "messages_per_run": len(sent) / (repeats + 1), "raw": times}
    print(f"[live_view] {model}: on/off = {ratio:.4f} ({row['on_s']:.2f} s / {row['off_s']:.2f} s per run, "
          f"{row['messages_per_run']:.0f} messages per run)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="optimiser steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    row = run(args.model, args.steps, args.repeats, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "live_view.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
