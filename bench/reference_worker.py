"""Reference implementations of one AlignProp step, timed in a fresh process of the separate trl venv.

`bench/.venv-trl/bin/python -m bench.reference_worker '<JSON>'` prints one JSON line. Modes:

* ``trl``: Hugging Face TRL 0.23's `AlignPropTrainer.step` on a `DefaultDDPOStableDiffusionPipeline`
  loaded from a local diffusers folder, fixed truncation (K = T - truncated_backprop_timestep),
  LoRA r=4 on to_q/to_k/to_v/to_out.0 (TRL's fixed choice, also ours), fp32.
* ``official``: the official AlignProp repository's sampler, `sd_pipeline.pipeline_step_with_grad`,
  imported from the repository file given as `official_src` (nothing of it is copied here), driven by
  our transcription of its trainer's step (`alignprop_trainer.AlignPropTrainer.step`: sample with
  grad, loss = mean(-reward * grad_scale) * loss_coeff, backward, clip grad norm 1, AdamW, zero grad).

Both use the same reward function (from `alignprop_core.rewards`), prompts, T, K, guidance and batch
as `bench.worker`, and measure like it: one warm-up step, heap trim, then timed steps with peak RSS
above the pre-step RSS.
"""
from __future__ import annotations

import importlib.util
import json
import random
import sys

import torch

from alignprop_core.rewards import make_reward
from bench.rig import PROMPTS
from bench.rss import peak_rss_bytes, reset_peak, rss_bytes, trim_heap
from bench.timing import time_call


def _prompt_fn():
    return random.choice(PROMPTS), {}


def trl_stepper(p: dict):
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline

    reward = make_reward(p["reward"])
    pipeline = DefaultDDPOStableDiffusionPipeline(p["folder"], use_lora=True)
    config = AlignPropConfig(
        num_epochs=10 ** 6, sample_num_steps=p["steps"], sample_guidance_scale=p["guidance"],
        sample_eta=0.0, truncated_backprop_rand=False,
        truncated_backprop_timestep=p["steps"] - p["k"], train_batch_size=p["batch"],
        train_learning_rate=p["lr"], mixed_precision="no", log_with=None, save_freq=10 ** 9,
        seed=p["seed"], train_gradient_accumulation_steps=1, project_kwargs={"project_dir": p["tmp"]})
    trainer = AlignPropTrainer(config, lambda im, pr, meta: (reward(im.float(), list(pr)), {}),
                               _prompt_fn, pipeline)
    state = {"epoch": 0, "global_step": 0}

    def step() -> None:
        state["global_step"] = trainer.step(state["epoch"], state["global_step"])
        state["epoch"] += 1

    return step


def official_stepper(p: dict):
    spec = importlib.util.spec_from_file_location("official_sd_pipeline", p["official_src"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reward = make_reward(p["reward"])
    pipe = module.DiffusionPipeline(p["folder"], use_lora=True)
    unet = pipe.get_trainable_layers()
    params = [q for q in unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=p["lr"], betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    tok = pipe.tokenizer

    def embed(texts):
        ids = tok(list(texts), return_tensors="pt", padding="max_length", truncation=True,
                  max_length=tok.model_max_length).input_ids
        return pipe.text_encoder(ids)[0]

    neg = embed([""])
    grad_scale, loss_coeff = 1.0, 0.01  # the official config's defaults

    def step() -> None:
        pipe.unet.train()
        with torch.enable_grad():
            prompts = [_prompt_fn()[0] for _ in range(p["batch"])]
            out = pipe.rgb_with_grad(
                prompt_embeds=embed(prompts), negative_prompt_embeds=neg.repeat(p["batch"], 1, 1),
                num_inference_steps=p["steps"], guidance_scale=p["guidance"], eta=0.0,
                backprop_strategy="fixed", backprop_kwargs={"value": p["steps"] - p["k"]},
                output_type="pt")
            rewards = reward(out.images.float(), prompts)
            loss = (-rewards * grad_scale).mean() * loss_coeff
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()

    return step


def measure(p: dict) -> dict:
    from accelerate import PartialState

    PartialState()  # TRL's pipeline logs through accelerate, which needs its state first
    torch.set_num_threads(p.get("threads", 1))
    torch.manual_seed(p["seed"])
    random.seed(p["seed"])
    step = (trl_stepper if p["mode"] == "trl" else official_stepper)(p)
    step()  # warm-up: optimizer state and lazy initialisation belong to the baseline
    trim_heap()
    base = rss_bytes()
    reset_ok = reset_peak()
    times = [time_call(step) for _ in range(p["repeats"])]
    peak = peak_rss_bytes()
    return {"step_s": times, "rss_base": base, "rss_peak": peak, "rss_growth": peak - base,
            "peak_reset": reset_ok}


def main(argv: list[str]) -> int:
    print(json.dumps(measure(json.loads(argv[0]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
