"""The noise schedule and the DDIM update (Song et al. 2021, eq. 12), written in plain torch.

`NoiseSchedule` holds the cumulative alphas of the forward process and the rule that picks the
inference timesteps; it is built from a diffusers scheduler config (SD1.x/SDXL) or, in ComfyUI, from
the model's own `model_sampling`. `ddim_step` is one differentiable DDIM update; a test proves it equals
`diffusers.DDIMScheduler.step` for eta 0 and eta 1 with the same noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class NoiseSchedule:
    """Forward-process schedule and inference-timestep rule of a diffusion model."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) float64, \bar{alpha}_t
    prediction_type: str = "epsilon"  # what the denoiser predicts: epsilon | v_prediction | sample
    timestep_spacing: str = "leading"  # how inference timesteps are spread over the train range
    steps_offset: int = 0  # added to every inference timestep (SD1.x uses 1)
    final_alpha_cumprod: float = 1.0  # \bar{alpha} used after the last step (set_alpha_to_one)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r} is not supported; "
                             f"use one of {', '.join(PREDICTION_TYPES)}.")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={self.timestep_spacing!r} is not supported; "
                             f"use one of {', '.join(TIMESTEP_SPACINGS)}.")
        self.alphas_cumprod = self.alphas_cumprod.detach().to("cpu", torch.float64)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Build from a diffusers scheduler config (the model's `scheduler/scheduler_config.json`).

        The betas are computed by diffusers' own DDIMScheduler so that every beta_schedule it knows
        (linear, scaled_linear, squaredcos_cap_v2, trained betas) is reproduced exactly.
        """
        from diffusers import DDIMScheduler

        keep = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        ref = DDIMScheduler.from_config(keep)
        final = 1.0 if ref.config.set_alpha_to_one else float(ref.alphas_cumprod[0])
        return cls(alphas_cumprod=ref.alphas_cumprod.to(torch.float64),
                   prediction_type=ref.config.prediction_type,
                   timestep_spacing=ref.config.timestep_spacing,
                   steps_offset=int(ref.config.steps_offset),
                   final_alpha_cumprod=final)

    def timesteps(self, num_steps: int) -> list[int]:
        """The inference timesteps, high noise first, as DDIMScheduler.set_timesteps picks them."""
        n_train = self.num_train_timesteps
        if not 1 <= num_steps <= n_train:
            raise ValueError(f"steps={num_steps} must lie in [1, {n_train}] for this schedule.")
        if self.timestep_spacing == "leading":
            ratio = n_train // num_steps
            ts = [i * ratio + self.steps_offset for i in range(num_steps)]
        elif self.timestep_spacing == "trailing":
            ratio = n_train / num_steps
            ts = [int(round(n_train - i * ratio)) - 1 for i in range(num_steps)][::-1]
        elif self.timestep_spacing == "linspace":
            ts = torch.linspace(0, n_train - 1, num_steps).round().long().tolist()
        else:
            raise ValueError(f"timestep_spacing={self.timestep_spacing!r} is not supported.")
        return ts[::-1]

    def previous_timestep(self, t: int, num_steps: int) -> int:
        """The timestep DDIM steps to from t (diffusers' rule: t - n_train // steps)."""
        return t - self.num_train_timesteps // num_steps

    def alpha_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


def split_prediction(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: float,
                     prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a denoiser output into (predicted x0, predicted epsilon) at noise level alpha_bar_t."""
    a = alpha_bar_t ** 0.5
    s = (1.0 - alpha_bar_t) ** 0.5
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (x_t - s * eps) / a
    elif prediction_type == "v_prediction":
        x0 = a * x_t - s * model_output
        eps = a * model_output + s * x_t
    elif prediction_type == "sample":
        x0 = model_output
        eps = (x_t - a * x0) / s
    else:
        raise ValueError(f"prediction_type={prediction_type!r} is not supported; "
                         f"use one of {', '.join(PREDICTION_TYPES)}.")
    return x0, eps


def ddim_step(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: float,
              alpha_bar_prev: float, eta: float, prediction_type: str,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12), differentiable in its inputs.

    Args:
        model_output: denoiser prediction at x_t, same shape as x_t.
        x_t: current latent, (B, C, h, w).
        alpha_bar_t, alpha_bar_prev: cumulative alphas of this and the previous timestep.
        eta: 0 for deterministic DDIM; 1 gives DDPM-like variance.
        prediction_type: epsilon | v_prediction | sample.
        noise: standard normal noise for eta > 0 (drawn by the caller so runs are reproducible).

    Returns:
        x_{t_prev}, same shape as x_t.
    """
    x0, eps = split_prediction(model_output, x_t, alpha_bar_t, prediction_type)
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    sigma = eta * max(variance, 0.0) ** 0.5
    direction = max(1 - alpha_bar_prev - sigma ** 2, 0.0) ** 0.5 * eps
    x_prev = alpha_bar_prev ** 0.5 * x0 + direction
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`; draw it from the run's generator.")
        x_prev = x_prev + sigma * noise
    return x_prev
