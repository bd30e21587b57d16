"""A training rig built only from the library's own parts: model backend, LoRA, AdamW, reward.

`Rig.train_step` is one AlignProp optimiser step exactly as `alignprop_core.training.trainer.train` runs it
(`training.step.optimizer_step`: sample with the last K steps differentiable, decode, reward, backward,
clip, AdamW). `Rig.sample` is plain no-grad sampling of the same T steps plus decode, through
`alignprop_core.sampling.sampler.sample_images`, on the same model (with the same LoRA), batch and prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.models.backend import DiffusionBackend, diffusers_backend
from alignprop_core.lora import add_lora
from alignprop_core.parallel import World
from alignprop_core.rewards import RewardFn, make_reward
from alignprop_core.sampling.sampler import sample_images
from alignprop_core.training.step import make_optimizer, make_scaler, optimizer_step

from bench.models import build_backend, default_px

PROMPTS = ("a red cat on the grass", "a blue dog in a field", "a photo of a white horse",
           "a painting of a green frog", "a black bird on a yellow background", "an owl in the field")


@dataclass
class RigSpec:
    """Everything a measurement is a function of."""

    model: str = "tiny"
    reward: str = "smoothness"
    steps: int = 20  # T
    k: int = 1  # gradient window K
    batch: int = 2
    px: int = 0  # 0: the model's default size
    guidance: float = 7.5
    use_cfg: bool = True
    checkpoint: bool = True  # checkpoint the UNet steps and the VAE decode
    eta: float = 0.0
    lr: float = 1e-3
    seed: int = 0
    reward_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.px or default_px(self.model)


@dataclass
class Rig:
    backend: DiffusionBackend
    reward_fn: RewardFn
    sampler: SamplerConfig
    train: TrainConfig
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gen: torch.Generator
    prompts: Sequence[str]
    world: World | None = None  # a rank of a data-parallel run; None: one process

    def train_step(self) -> dict[str, Any]:
        """One AlignProp optimiser step, through the library's trainer."""
        return optimizer_step(self.backend, self.reward_fn, self.prompts, self.sampler, self.train,
                              self.params, self.optimizer, self.scaler, self.gen, step=0, world=self.world)

    def sample(self) -> torch.Tensor:
        """No-grad sampling of the same T steps plus decode, same batch size, same prompts."""
        idx = torch.randint(len(self.prompts), (self.train.batch_size,), generator=self.gen).tolist()
        shape = self.backend.latent_shape(self.train.batch_size, self.train.height, self.train.width)
        x_T = torch.randn(shape, generator=self.gen).to(self.backend.device)
        with torch.no_grad():
            return sample_images(self.backend, [self.prompts[i] for i in idx], self.sampler, x_T,
                                 self.train.negative_prompt, grad_steps=0, generator=self.gen)


def sampler_config(spec: RigSpec) -> SamplerConfig:
    return SamplerConfig(steps=spec.steps, k=spec.k, guidance_scale=spec.guidance, use_cfg=spec.use_cfg,
                         eta=spec.eta, checkpoint_unet=spec.checkpoint, checkpoint_vae=spec.checkpoint)


def default_prompts(reward: str) -> list[str]:
    """The toy world's training prompts for its rewards (toy_*), which need its captions; PROMPTS otherwise."""
    if reward.startswith("toy"):
        from alignprop_core.files.prompts import shipped_prompts

        return shipped_prompts("toy_train")
    return list(PROMPTS)


def build_rig(spec: RigSpec, model=None, prompts: Sequence[str] | None = None) -> Rig:
    """A rig for `spec`; pass `model` (a T2IModel) to reuse one already built (LoRA is added to it).
    `prompts` default to `default_prompts(spec.reward)`."""
    prompts = default_prompts(spec.reward) if prompts is None else prompts
    torch.manual_seed(spec.seed)
    backend = (diffusers_backend(model, name=spec.model) if model is not None
               else build_backend(spec.model, spec.seed))
    sampler = sampler_config(spec)
    train = TrainConfig(reward=spec.reward, batch_size=spec.batch, width=spec.size, height=spec.size,
                        lr=spec.lr, seed=spec.seed, eval_every=0)
    params = add_lora(backend.lora_target, LoraConfig(init_seed=spec.seed))
    optimizer = make_optimizer(params, train)
    scaler = make_scaler(torch.device("cpu"), train)
    return Rig(backend, make_reward(spec.reward, **spec.reward_kwargs), sampler, train, params,
               optimizer, scaler, torch.Generator().manual_seed(spec.seed), list(prompts))
