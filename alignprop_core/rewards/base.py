"""What every reward shares: the `Reward` protocol the trainer uses, and the input checks.

A reward factory returns either a plain scoring function `fn(images, prompts) -> (B,)` or a `Reward`;
the registry wraps a plain function as a `FunctionReward`. The trainer only ever talks to a `Reward`:
it calls it, saves and restores its state (e.g. a standardised mixture's running statistics), scores
held-out images inside `scoring_only()` so evaluation does not move that state, and asks for its
`report` (extra per-component numbers, e.g. the toy world's count accuracy).

A reward whose score carries no gradient to the pixels (a count, an accuracy) sets
`differentiable = False`: it can judge held-out images (`TrainConfig.judges`) but the trainer
refuses to train on it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from .spec import RewardSpec

RewardFn = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
# per-component batch (means, population variances) -> those of the global batch over all ranks
StatsPool = Callable[[list[float], list[float]], tuple[list[float], list[float]]]


class Reward:
    """A differentiable reward with its spec. Subclasses score in `__call__` and override the
    state and report methods only if they keep state or have more to say."""

    has_report = False  # True where `report` has numbers to give
    differentiable = True  # False: the score has no gradient, so it may judge but never be trained on

    def __init__(self, spec: RewardSpec):
        self.spec = spec

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score images (B, 3, H, W) in [0, 1] for their prompts -> (B,), higher is better."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """What scoring has accumulated (saved with a training state); {} for a stateless reward."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`."""
        if state:
            raise ValueError(f"the {self.spec.name} reward keeps no state, but a saved reward state was "
                             "given; resume with the reward the run was started with.")

    @contextlib.contextmanager
    def scoring_only(self) -> Iterator[None]:
        """Score inside this block without updating the reward's state (e.g. for evaluation)."""
        yield

    def moves_state_in_evaluation(self) -> bool:
        """Whether scoring inside `scoring_only()` may still change the state, so that every rank of
        a data-parallel run must score every evaluation image itself. A reward with any state is
        assumed to; a stateless one never does."""
        return bool(self.state_dict())

    def pool_batch_statistics(self, pool: StatsPool | None) -> None:
        """Statistics a reward keeps of its training batches are to be pooled by `pool` (a
        data-parallel run: one rank scores only its rows of the global batch); a stateless reward
        keeps none."""

    def report(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Extra numbers about a batch beside its reward (e.g. accuracies); {} if there are none."""
        return {}

    def modules(self) -> list[torch.nn.Module]:
        """The networks this reward scores with (e.g. a CLIP tower and its head); [] for a reward
        computed from the pixels alone."""
        return []


class FunctionReward(Reward):
    """A stateless reward from a scoring function, with an optional report function and the
    networks the function scores with."""

    def __init__(self, spec: RewardSpec, fn: RewardFn,
                 report: Callable[[torch.Tensor, Sequence[str]], dict[str, float]] | None = None,
                 modules: Sequence[torch.nn.Module] = ()):
        super().__init__(spec)
        self.fn, self._report, self.networks = fn, report, list(modules)
        self.has_report = report is not None

    def modules(self) -> list[torch.nn.Module]:
        return list(self.networks)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.fn(images, prompts)

    def report(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        return self._report(images, prompts) if self._report is not None else {}


def reward_modules(reward: Reward | RewardFn) -> list[torch.nn.Module]:
    """The networks of `reward`: its `modules()` if it is a `Reward`; a plain function shows none."""
    return reward.modules() if isinstance(reward, Reward) else []


def as_reward(reward: Reward | RewardFn, spec: RewardSpec | str) -> Reward:
    """`reward` itself if it is a `Reward`, else the plain function wrapped, recorded under `spec`."""
    if isinstance(reward, Reward):
        return reward
    if not callable(reward):
        raise TypeError(f"a reward must be a Reward or a function (images, prompts) -> scores; got "
                        f"{type(reward).__name__}.")
    return FunctionReward(spec if isinstance(spec, RewardSpec) else RewardSpec.parse(spec), reward)


def check_images(images: torch.Tensor, prompts: Sequence[str] | None = None, tol: float = 1e-4) -> None:
    """Raise a ValueError unless images are (B, 3, H, W) in [0, 1] with one prompt per image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards take images of shape (B, 3, H, W); got {tuple(images.shape)}. "
                         "Convert ComfyUI IMAGE (B, H, W, 3) with .permute(0, 3, 1, 2).")
    lo, hi = float(images.detach().min()), float(images.detach().max())
    if lo < -tol or hi > 1 + tol:
        raise ValueError(f"rewards take images in [0, 1]; got values in [{lo:.3g}, {hi:.3g}]. "
                         "Map [-1, 1] images with x / 2 + 0.5 first.")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; "
                         "give one prompt per image.")


def check_prompts(prompts: Sequence[str] | None, reward: str) -> list[str]:
    """Raise a ValueError unless every prompt is a non-empty string; return them as a list.

    Args:
        prompts: one prompt per image.
        reward: reward name for the message.
    """
    if prompts is None:
        raise ValueError(f"the {reward} reward compares images with text; give one prompt per image.")
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if bad:
        raise ValueError(f"the {reward} reward needs a non-empty text prompt for every image; prompts at "
                         f"positions {bad} are empty. Give each image its prompt.")
    return prompts
