"""The reward registry: reward name -> factory of a differentiable ``fn(images, prompts) -> Tensor[B]``
(or of a `Reward` that says it is not differentiable, such as toy_blobs: a judge, never trained on).

Images are (B, 3, H, W) in [0, 1]; the result is one score per image, higher is better. A reward is
data first: a `RewardSpec` (name + arguments, one-line text) that `build_reward` turns into a
`Reward` carrying that spec, which the trainer records in the LoRA and its run files. Factories
keep heavy imports (open_clip, transformers) inside themselves, so importing this registry is cheap.
`REWARDS` fills the CLI choices and the ComfyUI dropdown. Rewards that need weights take local file
paths as factory arguments; nothing is ever downloaded.
"""
from __future__ import annotations

from typing import Any, Callable

from .aesthetic import make_aesthetic
from .base import FunctionReward, Reward, RewardFn, as_reward, check_images
from .clip_score import make_clip_score
from .color import make_color_target
from .colourfulness import make_colourfulness
from .hps import make_hps
from .jpeg import make_jpeg_compressibility, make_jpeg_incompressibility
from .mixture import MixtureReward, make_mixture, mixture_from_spec
from .object_count import make_object_count
from .pickscore import make_pickscore
from .smoothness import make_smoothness
from .spec import RewardSpec
from .toy_blobs import make_toy_blobs
from .toy_count import make_toy_count


def make_mixture_reward(spec: str, standardize: bool = False, momentum: float = 0.99) -> MixtureReward:
    """A weighted mix of registered rewards from a one-line spec, e.g.
    ``"aesthetic:1.0[toward=10; head_path=...], jpeg_compressibility:0.5"``."""
    return mixture_from_spec(spec, REWARDS, standardize=standardize, momentum=momentum)


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "aesthetic": make_aesthetic,
    "hps": make_hps,
    "pickscore": make_pickscore,
    "clip_score": make_clip_score,
    "jpeg_compressibility": make_jpeg_compressibility,
    "jpeg_incompressibility": make_jpeg_incompressibility,
    "object_count": make_object_count,
    "color_target": make_color_target,
    "smoothness": make_smoothness,
    "colourfulness": make_colourfulness,
    "toy_count": make_toy_count,
    "toy_blobs": make_toy_blobs,  # not differentiable: a judge only
    "mixture": make_mixture_reward,
}


RUNTIME_ARGS = ("device", "dtype", "clip_vision_state_dict")  # objects of the run, not of the reward


def build_reward(spec: RewardSpec | str, **runtime: Any) -> Reward:
    """The reward `spec` describes (a `RewardSpec` or its one-line text), built by its factory.

    Args:
        spec: registry name and factory arguments.
        runtime: factory arguments that belong to this run rather than to the reward (`RUNTIME_ARGS`:
            the device, a dtype, weights handed over in memory); they are not recorded in the spec.
    """
    spec = spec if isinstance(spec, RewardSpec) else RewardSpec.parse(spec)
    try:
        factory = REWARDS[spec.name]
    except KeyError:
        raise ValueError(f"unknown reward {spec.name!r}; valid rewards: {', '.join(sorted(REWARDS))}.") from None
    clash = sorted(set(spec.args) & set(runtime))
    if clash:
        raise ValueError(f"reward {spec.name}: {', '.join(clash)} given both in the spec and at run time.")
    built = factory(**spec.args, **runtime)
    reward = built if isinstance(built, Reward) else FunctionReward(spec, built)
    reward.spec = spec
    return reward


def make_reward(name: str, **kwargs: Any) -> Reward:
    """Build the reward called `name` with factory keyword arguments `kwargs`; those in
    `RUNTIME_ARGS` are passed on but not recorded in the reward's spec."""
    data = {k: v for k, v in kwargs.items() if k not in RUNTIME_ARGS}
    runtime = {k: v for k, v in kwargs.items() if k in RUNTIME_ARGS}
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; valid rewards: {', '.join(sorted(REWARDS))}.")
    return build_reward(RewardSpec(name, data), **runtime)


__all__ = ["REWARDS", "RUNTIME_ARGS", "Reward", "RewardFn", "RewardSpec", "as_reward", "build_reward",
           "check_images", "make_mixture", "make_reward"]
