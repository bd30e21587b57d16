"""Held-out evaluation: the reward of images sampled from fixed latents, without gradient.

`evaluate` scores the held-out images with one reward (and can hand the images back). `evaluate_held_out`
is what a training run records at each evaluation: the same images scored by the training reward and by
every judge (rewards that are never trained on, so a hacked reward shows as a gap between them), and
their diversity (`training.diversity`). On the ranks of a data-parallel run it can be split: each rank
samples and scores every size-th batch of images and the ranks sum their numbers into the record one
process would make (`shard_evaluation` says when that is exact).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import SamplerConfig, TrainConfig
from ..models.backend import DiffusionBackend
from ..rewards import Reward, RewardFn
from ..parallel.shard import ONE, Shard
from ..sampling.sampler import sample_images
from .diversity import downsample, held_out_diversity
from .step import autocast_context


@dataclass
class HeldOutScores:
    """One evaluation's numbers: per-image scores of the reward and of each judge, and the diversity."""

    scores: list[float]  # the training reward of each held-out image
    judges: dict[str, list[float]] = field(default_factory=dict)  # judge name -> its score of each image
    diversity: float | None = None  # None with one image per prompt

    def record(self, step: int) -> dict[str, Any]:
        """The evaluation record a run keeps: {"step", "eval_reward", "judges": {name: mean},
        "diversity"}."""
        return {"step": step, "eval_reward": _mean(self.scores),
                "judges": {name: _mean(values) for name, values in self.judges.items()},
                "diversity": self.diversity}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _sample_held_out(backend: DiffusionBackend, prompts: Sequence[str], sampler: SamplerConfig,
                     cfg: TrainConfig, score: Callable[[int, list[str], torch.Tensor], None],
                     shard: Shard = ONE) -> None:
    """Sample every held-out image from its fixed latent, batch by batch, and hand each batch
    (index of its first image, prompts, images (B, 3, H, W) float in [0, 1]) to `score`, under the
    run's autocast. With `shard`, only the batches numbered rank, rank + size, ... (sampling draws
    no noise then: see `shard_evaluation`)."""
    gen = torch.Generator().manual_seed(cfg.eval_seed)
    entries = eval_entries(prompts, cfg)
    shape = backend.latent_shape(len(entries), cfg.height, cfg.width)
    x_T = torch.randn(shape, generator=gen).to(backend.device)
    for n, i in enumerate(range(0, len(entries), cfg.eval_batch_size)):
        if n % shard.size != shard.rank:
            continue
        chunk = list(entries[i:i + cfg.eval_batch_size])
        with autocast_context(backend.device, cfg.mixed_precision):
            img = sample_images(backend, chunk, sampler, x_T[i:i + len(chunk)],
                                cfg.negative_prompt, grad_steps=0, generator=gen)
            score(i, chunk, img.float())


def _scoring_only(reward: Reward | RewardFn) -> contextlib.AbstractContextManager:
    # only a Reward can keep state that scoring would move; a plain function needs no guard
    return reward.scoring_only() if isinstance(reward, Reward) else contextlib.nullcontext()


@torch.no_grad()
def evaluate(backend: DiffusionBackend, reward: Reward | RewardFn, prompts: Sequence[str],
             sampler: SamplerConfig, cfg: TrainConfig, return_images: bool = False
             ) -> tuple[list[float], torch.Tensor | None]:
    """Reward of each held-out image, sampled from fixed latents (seeded by cfg.eval_seed).

    Every prompt is scored cfg.eval_latents times, each time from its own latent; the images
    follow `eval_entries(prompts, cfg)` (the prompt list repeated), so the first len(prompts) are
    the same whatever eval_latents is. The reward scores inside `scoring_only()`: evaluation does
    not move its state (a standardised mixture's statistics).

    Returns:
        (per-image rewards, images (N,3,H,W) on the CPU if return_images else None)
    """
    scores: list[float] = []
    images: list[torch.Tensor] = []

    def score(start: int, chunk: list[str], img: torch.Tensor) -> None:
        scores.extend(reward(img, chunk).float().tolist())
        if return_images:
            images.append(img.cpu())

    with _scoring_only(reward):
        _sample_held_out(backend, prompts, sampler, cfg, score)
    return scores, (torch.cat(images) if return_images else None)


def shard_evaluation(sampler: SamplerConfig, scorers: Sequence[Reward | RewardFn]) -> bool:
    """Whether splitting an evaluation over ranks gives exactly the one-process record: sampling must
    draw no noise (eta = 0; the noise of a batch follows the batches before it) and no scorer may move
    its state while it scores (a standardised mixture's first evaluation sets its statistics)."""
    return sampler.eta == 0 and not any(isinstance(s, Reward) and s.moves_state_in_evaluation()
                                        for s in scorers)


@torch.no_grad()
def evaluate_held_out(backend: DiffusionBackend, reward: Reward | RewardFn, prompts: Sequence[str],
                      sampler: SamplerConfig, cfg: TrainConfig,
                      judges: Mapping[str, Reward | RewardFn] | None = None, shard: Shard = ONE,
                      gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> HeldOutScores:
    """The held-out images (as `evaluate` samples them) scored by `reward` and by every judge, and
    their diversity when cfg.eval_latents >= 2.

    Each reward scores inside its own `scoring_only()`. Only downsampled copies of the images are
    kept (for the diversity), so memory stays small however many held-out images there are.

    Args:
        judges: judge name (`config.judge_names`) -> reward; none by default.
        shard, gather: on a rank of a data-parallel run, this rank's share of the batches
            (`_sample_held_out`) and the sum of a tensor over the ranks; every rank then returns the
            whole record. Only where `shard_evaluation` holds.
    """
    judges = dict(judges or {})
    n = len(eval_entries(prompts, cfg))
    # every number by image position, zeros where another rank scores: the sum over ranks is exact
    table = torch.zeros(1 + len(judges), n, dtype=torch.float64)
    small: torch.Tensor | None = None

    def score(start: int, chunk: list[str], img: torch.Tensor) -> None:
        nonlocal small
        end = start + len(chunk)
        table[0, start:end] = reward(img, chunk).double().cpu()
        for row, judge in enumerate(judges.values(), 1):
            table[row, start:end] = judge(img, chunk).double().cpu()
        if cfg.eval_latents >= 2:
            tiny = downsample(img).double()
            small = small if small is not None else torch.zeros(n, *tiny.shape[1:], dtype=torch.float64)
            small[start:end] = tiny

    with contextlib.ExitStack() as stack:
        for scorer in (reward, *judges.values()):
            stack.enter_context(_scoring_only(scorer))
        _sample_held_out(backend, prompts, sampler, cfg, score, shard)
    if shard.size > 1:
        if gather is None:
            raise ValueError("evaluate_held_out: a shard of the evaluation needs `gather` to sum the ranks' numbers.")
        if cfg.eval_latents >= 2:  # a rank that scored no batch still sends its zeros, shaped alike
            shape = downsample(torch.zeros(1, 3, cfg.height, cfg.width)).shape[1:]
            small = gather(small if small is not None else torch.zeros(n, *shape, dtype=torch.float64))
        table = gather(table)
    result = HeldOutScores(scores=table[0].float().tolist(),
                           judges={name: table[row].float().tolist() for row, name in enumerate(judges, 1)})
    if small is not None:
        result.diversity = held_out_diversity(small.float(), len(prompts))
    return result


def eval_entries(prompts: Sequence[str], cfg: TrainConfig) -> list[str]:
    """The prompt of each image `evaluate` samples: the list, cfg.eval_latents times over."""
    return list(prompts) * cfg.eval_latents
