"""One rank of the data-parallel tests (tests/test_data_parallel.py), run as its own process.

`python tests/dist_worker.py JOB.json` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (or
none of them: one process). It trains the tiny model with `alignprop_core.training.trainer.train` on
the world the environment describes and writes, into the job's folder, `rank<r>.json` (the SHA-256
of its LoRA after every step, and the metrics) and `rank<r>.safetensors` (its final LoRA). With
`die_at_step` rank `die_rank` exits abruptly once that step is done, as a crashed process would;
with `hang_at_step` it stops itself (SIGSTOP) instead, as a hung process would.
`build` is also imported by the test, so the single-process reference is the same run. With `judge`
a weight-free judge counts the held-out images this rank scored.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import make_backend  # noqa: E402

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig  # noqa: E402
from alignprop_core.lora import lora_state_dict  # noqa: E402
from alignprop_core.parallel import DistConfig, init_world  # noqa: E402
from alignprop_core.rewards import make_reward  # noqa: E402
from alignprop_core.rewards.base import FunctionReward  # noqa: E402

PROMPTS = ["a cat", "a dog", "a horse", "a cow", "a fish", "a bird"]
EVAL = ["a fox", "a lion"]


def build(job: dict):
    """(backend, reward, sampler, lora, train config) of a job: eta > 0 (noise every step), uniform K,
    hflip augmentation and a standardised mixture, so every sharded draw and the pooled statistics
    take part."""
    torch.manual_seed(0)
    backend = make_backend(torch.float32)
    reward = (make_reward("mixture", spec="smoothness:1, color_target:0.5", standardize=True)
              if job.get("reward", "mixture") == "mixture" else make_reward(job["reward"]))
    sampler = SamplerConfig(**{"steps": 3, "eta": 1.0, "guidance_scale": 3.0, "truncation": "uniform",
                               "k_min": 1, "k_max": 2, **job.get("sampler", {})})
    cfg = TrainConfig(reward=job.get("reward", "mixture"), steps=job["steps"], batch_size=job["batch_size"],
                      grad_accum=job.get("grad_accum", 1), lr=1e-2, width=16, height=16, eval_every=2,
                      eval_batch_size=2, eval_latents=job.get("eval_latents", 1), reward_augment="hflip",
                      save_every=job.get("save_every", 0), seed=0)
    return backend, reward, sampler, LoraConfig(rank=2, alpha=2.0), cfg


def lora_digest(backend) -> str:
    state = lora_state_dict(backend.lora_target)
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(job_path: str) -> None:
    from alignprop_core.training.trainer import train
    from safetensors.torch import save_file

    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    torch.set_num_threads(1)
    world = init_world(torch.device("cpu"), DistConfig(backend="gloo", timeout_s=job.get("timeout_s", 60)))
    backend, reward, sampler, lora, cfg = build(job)
    digests: list[str] = []
    judged = {"images": 0}  # held-out images this rank's judge scored

    def colourful(images, prompts):
        judged["images"] += images.shape[0]
        return colourfulness(images, prompts)

    colourfulness = make_reward("colourfulness")
    judges = [FunctionReward(colourfulness.spec, colourful)] if job.get("judge") else None

    def on_step(step: int, metrics: dict) -> None:
        if "eval_reward" in metrics:
            return
        digests.append(lora_digest(backend))
        if job.get("die_at_step") == step and world.rank == job.get("die_rank", 1):
            os._exit(3)
        if job.get("hang_at_step") == step and world.rank == job.get("die_rank", 1):
            os.kill(os.getpid(), signal.SIGSTOP)  # alive, connections open, never answering

    try:
        result = train(backend, reward, PROMPTS, EVAL, sampler, lora, cfg, out_dir=out / "lora",
                       resume_from=job.get("resume_from"), on_step=on_step, world=world, judges=judges)
    finally:
        world.close()
    (out / f"rank{world.rank}.json").write_text(json.dumps(
        {"digests": digests, "history": result.history, "evals": result.evals, "judged": judged["images"],
         "lora_path": str(result.lora_path) if result.lora_path else None}))
    save_file({k: v.contiguous() for k, v in lora_state_dict(backend.lora_target).items()},
              str(out / f"rank{world.rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1])
