"""One sampling run as a list of steps, the same for every model family.

A schedule turns into `steps` steps for a run: `DDIMStep`s for epsilon/v models (`NoiseSchedule`,
SD1.x/SDXL) and `FlowStep`s for rectified-flow models (`FlowSchedule`, SD3/SD3.5, FLUX.1). Each
step knows the timestep its denoiser call is fed, how the model's output moves x to the next noise
level, the clean-latent estimate x0, and how to put a clean latent back at its own noise level (what
DRaFT-LV does on the last step). The sampler only walks the list, so truncation, checkpointing and
the estimators never know which family they run on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from .flow_schedule import (FlowSchedule, dynamic_shift_mu, flow_euler_step, flow_noise, flow_sigmas,
                            flow_x0, flux_sigmas)
from .schedule import NoiseSchedule, ddim_step, split_prediction


@dataclass(frozen=True)
class DDIMStep:
    """One DDIM update from timestep t (integer) to the previous inference timestep."""

    t: int  # what the denoiser is fed
    alpha_bar: float  # \bar{alpha} at t
    alpha_bar_prev: float  # \bar{alpha} at the step's target
    prediction_type: str  # epsilon | v_prediction | sample
    eta: float  # 0: deterministic DDIM

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0

    def update(self, out: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return ddim_step(out, x, self.alpha_bar, self.alpha_bar_prev, self.eta, self.prediction_type, noise)

    def x0(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return split_prediction(out, x, self.alpha_bar, self.prediction_type)[0]

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) e: the forward process to this step's level."""
        return self.alpha_bar ** 0.5 * x0 + (1.0 - self.alpha_bar) ** 0.5 * noise


@dataclass(frozen=True)
class FlowStep:
    """One Euler step of the rectified-flow ODE from noise level sigma to sigma_next."""

    t: float  # what the denoiser is fed: num_train_timesteps * sigma
    sigma: float
    sigma_next: float
    needs_noise = False

    def update(self, out: torch.Tensor, x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        return flow_euler_step(x, out, self.sigma, self.sigma_next)

    def x0(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return flow_x0(x, out, self.sigma)

    def renoise(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_sigma = (1 - sigma) x0 + sigma e: the forward process to this step's level."""
        return flow_noise(x0, noise, self.sigma)


Step = Union[DDIMStep, FlowStep]
Schedule = Union[NoiseSchedule, FlowSchedule]


def ddim_chain(schedule: NoiseSchedule, steps: int, eta: float) -> list[DDIMStep]:
    """The DDIM steps of a run, high noise first, with diffusers' timestep rule."""
    chain = []
    for t in schedule.timesteps(steps):
        t_prev = schedule.previous_timestep(t, steps)
        chain.append(DDIMStep(t, schedule.alpha_bar(t), schedule.alpha_bar(t_prev),
                              schedule.prediction_type, eta))
    return chain


def flow_chain(schedule: FlowSchedule, steps: int, latent_hw: tuple[int, int]) -> list[FlowStep]:
    """The Euler steps of a run on latents of height x width `latent_hw`, as the SD3 (default
    grid, static shift) or FLUX.1 (its own grid, shift by token count) pipelines space them."""
    mu = None
    if schedule.use_dynamic_shifting:
        h, w = latent_hw
        p = schedule.patch_size
        if h % p or w % p:
            raise ValueError(f"latents of {h}x{w} cells do not split into {p}x{p} patches; give an "
                             f"image size that is a multiple of the VAE factor times {p}.")
        mu = dynamic_shift_mu((h // p) * (w // p), schedule)
    grid = flux_sigmas(steps) if schedule.sigma_grid == "flux" else None
    sigmas, timesteps = flow_sigmas(schedule, steps, mu=mu, sigmas=grid)
    return [FlowStep(float(timesteps[i]), float(sigmas[i]), float(sigmas[i + 1])) for i in range(steps)]


def make_chain(schedule: Schedule, steps: int, eta: float, latent_shape: tuple[int, ...]) -> list[Step]:
    """The steps of one sampling run of `steps` model calls on latents of `latent_shape` (B, C, h, w).

    Raises:
        ValueError: eta > 0 on a flow model (its sampler is the deterministic ODE), or a schedule
            of another kind.
    """
    check_eta(schedule, eta)
    if isinstance(schedule, NoiseSchedule):
        return ddim_chain(schedule, steps, eta)
    return flow_chain(schedule, steps, tuple(latent_shape[-2:]))


def check_eta(schedule: Schedule, eta: float) -> None:
    """ValueError for eta > 0 on a flow model; TypeError for a schedule of another kind."""
    if not isinstance(schedule, (NoiseSchedule, FlowSchedule)):
        raise TypeError(f"schedule {type(schedule).__name__} is not a NoiseSchedule or FlowSchedule.")
    if isinstance(schedule, FlowSchedule):
        check_flow_eta(eta)


def check_flow_eta(eta: float) -> None:
    """ValueError for eta > 0, which a rectified-flow model cannot take."""
    if eta > 0:
        raise ValueError(f"eta={eta} adds DDIM's ancestral noise, which applies to epsilon/v models "
                         "(SD1.x, SDXL); this is a rectified-flow model, sampled with the "
                         "deterministic Euler ODE; set eta to 0.")
