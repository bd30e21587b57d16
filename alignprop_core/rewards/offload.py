"""Keeping a reward's networks off the training device except while they score
(`TrainConfig.offload_reward`).

A reward network (CLIP ViT-L/H, a detector) can take gigabytes that the denoiser's gradient window
needs more. `OffloadedReward` wraps a `Reward`: its `modules()` wait on the CPU, move to the device
they were built on just before a scoring pass, and go back to the CPU as soon as that pass is over:

- a pass that carries gradient (a training micro-batch) is over once backward has left the reward,
  which is when the gradient of the images the reward received is computed: a hook on those images
  parks the networks then, before the backward goes on through the VAE and the denoiser;
- a pass without gradient (evaluation, a report) is over when the call returns.

The weights travel both ways once per scoring pass (host <-> device copies: time for memory). The
scores are the same: only where the weights wait changes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from .base import Reward, StatsPool

PARK = torch.device("cpu")  # where the networks wait between scoring passes


def _home(module: torch.nn.Module) -> torch.device | None:
    """The device a module's weights live on (None for a module without any)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


class OffloadedReward(Reward):
    """`inner` with its networks on the CPU between scoring passes; scores, state and report are
    the inner reward's. `restore()` puts the networks back where they were built."""

    def __init__(self, inner: Reward, park: torch.device | str | None = None):
        super().__init__(inner.spec)
        self.inner, self.park_device = inner, torch.device(park if park is not None else PARK)
        self.has_report, self.differentiable = inner.has_report, inner.differentiable
        self.homes = [(m, home) for m in inner.modules() if (home := _home(m)) is not None]

    def load(self) -> None:
        """Networks to the device they were built on, for a scoring pass."""
        for module, home in self.homes:
            module.to(home)

    def park(self) -> None:
        """Networks to the CPU, between scoring passes."""
        for module, _ in self.homes:
            module.to(self.park_device)

    def restore(self) -> None:
        """Networks back where they were built, as the run found them."""
        self.load()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.load()
        try:
            scores = self.inner(images, prompts)
        except BaseException:
            self.park()
            raise
        if scores.requires_grad and images.requires_grad:
            images.register_hook(self._park_after_backward)
        else:
            self.park()
        return scores

    def _park_after_backward(self, grad: torch.Tensor) -> None:
        # the images' gradient exists: the reward's part of backward is done
        self.park()

    def report(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        self.load()
        try:
            return self.inner.report(images, prompts)
        finally:
            self.park()

    def modules(self) -> list[torch.nn.Module]:
        return self.inner.modules()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    @contextlib.contextmanager
    def scoring_only(self) -> Iterator[None]:
        with self.inner.scoring_only():
            yield

    def pool_batch_statistics(self, pool: StatsPool | None) -> None:
        self.inner.pool_batch_statistics(pool)

    def moves_state_in_evaluation(self) -> bool:
        return self.inner.moves_state_in_evaluation()


def offloaded(reward: Reward) -> OffloadedReward:
    """`reward` with its networks kept on the CPU between scoring passes (itself if it already is)."""
    return reward if isinstance(reward, OffloadedReward) else OffloadedReward(reward)
