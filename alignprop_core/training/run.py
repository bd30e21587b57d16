"""A training run as an object: set up once, then `step()`, `evaluate()` and save, in any loop.

`TrainRun` holds what a run changes as it goes: the LoRA on the backend's denoiser, AdamW, the loss
scaler, the one generator every random draw comes from, the reward (and its state) and the metric
history. `training.trainer.train` is the plain loop over it with callbacks and file outputs; the
ComfyUI node, the bench and future multi-process training use the same pieces.

A run records what it is as data (`config`: the sampler, LoRA and training configs, with the reward's
one-line spec in `train.reward` and the judges' in `train.judges`); a saved state resumes only into a
run with the same LoRA settings and the same reward spec.

Each evaluation scores the held-out images with the training reward and every judge (rewards that only
watch, e.g. the toy world's weight-free blob count) and measures their diversity; a reward that is not
differentiable can only be a judge.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import LoraConfig, SamplerConfig, TrainConfig, judge_names, to_dict
from ..lora import LoraFile, add_lora, apply_lora_file, lora_state_dict, save_lora, set_lora_state_dict
from ..models.backend import DiffusionBackend
from ..parallel.shard import ONE
from ..parallel.world import World, single_process
from ..rewards import Reward, RewardFn, as_reward, build_reward
from ..rewards.offload import OffloadedReward, offloaded
from ..sampling.sampler import check_sampler_fits
from .evaluate import evaluate_held_out, shard_evaluation
from .step import make_optimizer, make_scaler, optimizer_step
from .train_state import TrainState, check_resumable, save_train_state


def check_run_inputs(backend: DiffusionBackend, prompts: Sequence[str], eval_prompts: Sequence[str],
                     cfg: TrainConfig, sampler: SamplerConfig | None = None) -> None:
    """Refuse empty prompt lists, a resolution and sampler settings the model cannot take, before
    any work."""
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("no training prompts were given; give at least one prompt (one per line).")
    if not eval_prompts:
        raise ValueError("no evaluation prompts were given; give at least one held-out prompt.")
    backend.latent_shape(1, cfg.height, cfg.width)  # raises on a bad resolution
    if sampler is not None:
        check_sampler_fits(backend, sampler)


def check_trainable(reward: Reward | RewardFn) -> None:
    """ValueError if `reward` says it has no gradient (`Reward.differentiable` is False)."""
    if isinstance(reward, Reward) and not reward.differentiable:
        raise ValueError(f"the reward {reward.spec.text()} is not differentiable; use it as a judge "
                         "(TrainConfig.judges, --judges) and train on a differentiable reward such as "
                         "toy_count.")


def _build_judge(text: str) -> Reward:
    try:
        return build_reward(text)
    except (TypeError, ValueError) as err:
        raise ValueError(f"TrainConfig.judges: the judge {text!r} cannot be built ({err}); give a reward "
                         "spec as for the training reward, e.g. toy_blobs.") from err


def build_judges(judges: Sequence[Reward] | None, cfg: TrainConfig) -> tuple[dict[str, Reward], TrainConfig]:
    """The run's judges by name, and `cfg` with `judges` recording their specs.

    Given `Reward` objects are used as they are (cfg.judges becomes their spec texts); otherwise each
    spec of cfg.judges is built by the reward registry. The returned config is validated again, so
    best_by must name one of these judges.
    """
    if judges is None:
        built = [_build_judge(text) for text in cfg.judges]
    else:
        built = list(judges)
        wrong = [type(j).__name__ for j in built if not isinstance(j, Reward)]
        if wrong:
            raise TypeError(f"judges must be Reward objects (with a spec to record), got {', '.join(wrong)}; "
                            "wrap a plain function with rewards.as_reward(fn, 'name').")
    cfg = dataclasses.replace(cfg, judges=tuple(j.spec.text() for j in built))
    return dict(zip(judge_names(cfg.judges), built)), cfg


class TrainRun:
    """One AlignProp run on `backend`: LoRA added at construction, trained by `step()`.

    Args:
        backend: the model as callables (see `models.backend.DiffusionBackend`).
        reward: a `Reward` (or a plain scoring function, recorded under `cfg.reward`).
        prompts / eval_prompts: training prompts and held-out prompts for evaluation.
        sampler, lora, cfg: the three configs.
        init_lora: a LoRA file to start from (its rank, alpha and modules must match `lora`).
        state: a saved training state to continue exactly (checked by `check_resumable`).
        source: where `state` came from, for messages.
        judges: rewards that score each evaluation beside `reward` (default: built from cfg.judges);
            given ones replace cfg.judges by their specs.
        world: this rank of a data-parallel run (`parallel.world`; default one process). Every rank
            builds the same run and takes the same steps on its rows of each global batch; the ranks
            are checked to agree on the configs, prompts and starting state.

    With `cfg.offload_reward` the reward's and judges' networks wait on the CPU between scoring passes
    (`rewards.offload`); `close()` puts them back where they were built.
    """

    def __init__(self, backend: DiffusionBackend, reward: Reward | RewardFn, prompts: Sequence[str],
                 eval_prompts: Sequence[str], sampler: SamplerConfig, lora: LoraConfig, cfg: TrainConfig,
                 init_lora: LoraFile | None = None, state: TrainState | None = None,
                 source: str | Path = "the training state", judges: Sequence[Reward] | None = None,
                 world: World | None = None):
        check_run_inputs(backend, prompts, eval_prompts, cfg, sampler)
        self.reward = as_reward(reward, cfg.reward)
        check_trainable(self.reward)
        self.judges, cfg = build_judges(judges, cfg)  # name -> judge
        self.cfg = dataclasses.replace(cfg, reward=self.reward.spec.text())  # the reward as it was built
        self.backend, self.prompts, self.eval_prompts = backend, list(prompts), list(eval_prompts)
        self.sampler, self.lora = sampler, lora
        self.config = {"sampler": to_dict(sampler), "lora": to_dict(lora), "train": to_dict(self.cfg)}
        if state is not None:
            check_resumable(state, self.config, source)

        # only the LoRA parameters train (kept in fp32 by add_lora)
        self.params = add_lora(backend.lora_target, lora, device=backend.device)
        if init_lora is not None:
            apply_lora_file(backend.lora_target, init_lora)
        self.optimizer = make_optimizer(self.params, self.cfg)
        self.scaler = make_scaler(backend.device, self.cfg)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.steps_done = 0
        self.history: list[dict[str, Any]] = []  # metrics of every optimiser step
        self.evals: list[dict[str, Any]] = []  # evaluation records (see `evaluate`)
        if state is not None:
            self._load(state)
        self.world = world or single_process()
        if self.world.size > 1:
            self.reward.pool_batch_statistics(self.world.pool_statistics)
            self.world.check_same(json.dumps([self.config, self.prompts, self.eval_prompts, self.steps_done,
                                              self.gen.get_state().tolist(), backend.name]),
                                  "the run's settings, prompts and starting state")
        if self.cfg.offload_reward:  # last: a run refused above leaves the rewards where they were
            self.reward = offloaded(self.reward)
            self.judges = {name: offloaded(judge) for name, judge in self.judges.items()}
            for scorer in (self.reward, *self.judges.values()):
                scorer.park()

    def close(self) -> None:
        """Put what the run moved back as the caller gave it: offloaded reward and judge networks
        return to the device they were built on. Call once the run is over."""
        for scorer in (self.reward, *self.judges.values()):
            if isinstance(scorer, OffloadedReward):
                scorer.restore()

    def _load(self, state: TrainState) -> None:
        """Restore every piece of state that influences what comes next."""
        set_lora_state_dict(self.backend.lora_target, state.lora)
        self.optimizer.load_state_dict(state.optimizer)
        if state.scaler:
            self.scaler.load_state_dict(state.scaler)
        self.gen.set_state(state.generator)
        self.reward.load_state_dict(state.reward_state)
        self.steps_done, self.history, self.evals = state.step, state.history, state.evals

    @property
    def done(self) -> bool:
        """All cfg.steps optimiser steps have been taken."""
        return self.steps_done >= self.cfg.steps

    def step(self) -> dict[str, Any]:
        """One optimiser step; returns its metrics (also appended to `history`).

        If the step fails or is interrupted, the random stream and the reward's state are put back
        as they were before it, so `state()` resumes exactly here. The LoRA and AdamW need nothing:
        they only change in the step's last call, `optimizer.step`.
        """
        before = self.gen.get_state(), copy.deepcopy(self.reward.state_dict())
        try:
            metrics = optimizer_step(self.backend, self.reward, self.prompts, self.sampler, self.cfg,
                                     self.params, self.optimizer, self.scaler, self.gen, self.steps_done,
                                     self.world)
        except BaseException:
            self.gen.set_state(before[0])
            self.reward.load_state_dict(before[1])
            raise
        self.steps_done += 1
        metrics["step"] = self.steps_done
        self.history.append(metrics)
        return metrics

    def evaluate(self) -> dict[str, Any]:
        """Score the held-out images at the current step; returns the record (also appended to
        `evals`): {"step", "eval_reward" (mean training reward), "judges": {name: mean score},
        "diversity": mean pairwise distance of each prompt's images, None with eval_latents = 1}.

        On several ranks each samples and scores its share of the images where that gives the same
        record (`evaluate.shard_evaluation`: eta = 0, no scorer whose state would move); otherwise
        every rank evaluates everything."""
        split = self.world.size > 1 and shard_evaluation(self.sampler, [self.reward, *self.judges.values()])
        held_out = evaluate_held_out(self.backend, self.reward, self.eval_prompts, self.sampler, self.cfg,
                                     self.judges, shard=self.world.shard if split else ONE,
                                     gather=self.world.sum_tensor)
        self.evals.append(held_out.record(self.steps_done))
        return copy.deepcopy(self.evals[-1])

    def state(self) -> TrainState:
        """Everything needed to continue this run as if it had never stopped."""
        return TrainState(step=self.steps_done, lora=lora_state_dict(self.backend.lora_target),
                          optimizer=self.optimizer.state_dict(),
                          scaler=self.scaler.state_dict() if self.scaler.is_enabled() else {},
                          generator=self.gen.get_state(), history=self.history, evals=self.evals,
                          config=self.config, reward_state=self.reward.state_dict())

    def save_state(self, path: str | Path) -> Path:
        """Write `state()` to `path` atomically."""
        return save_train_state(path, self.state())

    def lora_metadata(self) -> dict[str, str]:
        """What the LoRA file says about its run: step, base model, reward spec and all configs."""
        return {"alignprop.step": str(self.steps_done), "alignprop.base_model": self.backend.name,
                "alignprop.reward": self.cfg.reward, "alignprop.config": json.dumps(self.config)}

    def save_lora(self, path: str | Path) -> Path:
        """Write the LoRA as it is now (kohya format, with `lora_metadata()`) to `path`."""
        return save_lora(path, self.backend.lora_target, self.lora, metadata=self.lora_metadata(),
                         arch=self.backend.arch)
