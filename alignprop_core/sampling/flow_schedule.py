"""The rectified-flow noise schedule and its Euler update (SD3/SD3.5, FLUX.1), in plain torch.

Rectified flow (Liu et al. 2023; Esser et al. 2024, SD3 section 2) interpolates data and noise in a
straight line and the model predicts the velocity along it:

    x_s = (1 - s) x0 + s e,     v = dx_s/ds = e - x0,     s in [0, 1] (the "sigma"; s = 1 is noise).

Sampling integrates dx/ds = v from s = 1 down to 0 with Euler steps on a decreasing grid
s_0 > s_1 > ... > s_{n-1} > s_n = 0:

    x_{s_{i+1}} = x_{s_i} + (s_{i+1} - s_i) v(x_{s_i}, s_i),     x0 estimate = x_s - s v.

The grid is a uniform grid u warped towards high noise by a time shift
(SD3 eq. 23 written for s in place of t):

    s = a u / (1 + (a - 1) u)        static shift a (SD3/SD3.5: a = 3), or
    a = exp(mu)                      dynamic shift (FLUX.1, time_shift_type "exponential"), or
    a = mu                           dynamic shift with time_shift_type "linear",

where FLUX's mu grows linearly with the image's token count L between (base_image_seq_len,
base_shift) and (max_image_seq_len, max_shift). The model is fed the timestep t = 1000 s.

`flow_sigmas` reproduces `diffusers.FlowMatchEulerDiscreteScheduler.set_timesteps` in float64 (a
test compares them to 1e-10 with diffusers run in float64), including its default grid, which runs
u from 1 down to the shifted training sigma at t = 1 (diffusers' `sigma_min`), so a static shift is
applied to that end point twice; the FLUX pipelines pass their own grid u = linspace(1, 1/n, n)
instead (`flux_sigmas`). The DDIM path for epsilon/v models is `schedule.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

TIME_SHIFT_TYPES = ("exponential", "linear")
SIGMA_GRIDS = ("default", "flux")

# diffusers options this module does not implement, with the value that means "off"
UNSUPPORTED_OPTIONS = {
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
    "invert_sigmas": False,
    "shift_terminal": None,
}
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class FlowSchedule:
    """Noise-level rule of a rectified-flow model (diffusers' FlowMatchEulerDiscreteScheduler)."""

    num_train_timesteps: int = 1000  # timestep fed to the model is num_train_timesteps * sigma
    shift: float = 1.0  # static time shift a (> 0; 1 = none; SD3/SD3.5 use 3.0); unused if dynamic
    use_dynamic_shifting: bool = False  # shift from the image size via mu (FLUX.1)
    base_shift: float = 0.5  # mu at base_image_seq_len tokens
    max_shift: float = 1.15  # mu at max_image_seq_len tokens
    base_image_seq_len: int = 256  # token count (latent patches) where mu = base_shift
    max_image_seq_len: int = 4096  # token count where mu = max_shift
    time_shift_type: str = "exponential"  # dynamic shift a = exp(mu) ("exponential") or mu ("linear")
    # how the pipeline spaces its steps before the shift: diffusers' default grid (SD3 pipelines)
    # or linspace(1, 1/n, n) (FLUX pipelines); not a scheduler-config key, the backend sets it
    sigma_grid: str = "default"
    patch_size: int = 2  # latent cells per transformer token side: the dynamic shift counts tokens

    def __post_init__(self) -> None:
        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be a positive "
                             "integer (the models of this family use 1000).")
        if not _is_finite_number(self.shift) or self.shift <= 0:
            raise ValueError(f"shift={self.shift!r} must be a finite number > 0 (1.0 = no shift; "
                             "SD3/SD3.5 use 3.0).")
        if not isinstance(self.use_dynamic_shifting, bool):
            raise ValueError(f"use_dynamic_shifting={self.use_dynamic_shifting!r} must be True or "
                             "False.")
        for name in ("base_shift", "max_shift"):
            value = getattr(self, name)
            if not _is_finite_number(value):
                raise ValueError(f"{name}={value!r} must be a finite number (FLUX.1 uses "
                                 "base_shift=0.5, max_shift=1.15).")
        for name in ("base_image_seq_len", "max_image_seq_len"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer token count "
                                 "(FLUX.1 uses 256 and 4096).")
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(f"max_image_seq_len={self.max_image_seq_len} must be larger than "
                             f"base_image_seq_len={self.base_image_seq_len}; mu is interpolated "
                             "between them.")
        if self.sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"sigma_grid={self.sigma_grid!r} is not known; use one of "
                             f"{', '.join(SIGMA_GRIDS)}.")
        if not _is_int(self.patch_size) or self.patch_size < 1:
            raise ValueError(f"patch_size={self.patch_size!r} must be a positive integer (SD3 and "
                             "FLUX.1 use 2).")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type={self.time_shift_type!r} is not supported; use one "
                             f"of {', '.join(TIME_SHIFT_TYPES)}.")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "FlowSchedule":
        """Build from a diffusers scheduler config (the model's `scheduler/scheduler_config.json`).

        Keys this schedule does not know are ignored; options it does not implement (Karras,
        exponential or beta sigmas, stochastic sampling, inverted sigmas, shift_terminal) are
        refused when set, by name. A missing key takes diffusers' default.
        """
        cls_name = config.get("_class_name")
        if cls_name is not None and cls_name != _SCHEDULER_CLASS:
            raise ValueError(f"scheduler config is for {cls_name!r}, not {_SCHEDULER_CLASS}; "
                             "FlowSchedule is for rectified-flow models (SD3/SD3.5, FLUX.1). For "
                             "epsilon/v models use NoiseSchedule.from_diffusers_config.")
        # diffusers reads each of these by truthiness, so 0 / null / false all mean "off"
        set_options = [k for k in UNSUPPORTED_OPTIONS if config.get(k)]
        if set_options:
            raise ValueError(f"scheduler config sets {', '.join(set_options)}, which FlowSchedule "
                             "does not implement; set "
                             f"{' and '.join(f'{k}={UNSUPPORTED_OPTIONS[k]}' for k in set_options)} "
                             "or sample with diffusers' scheduler.")
        kwargs = {}
        for f in fields(cls):
            if f.name not in config:
                continue
            value = config[f.name]
            # diffusers allows null shift bounds; they are only read when shifting dynamically
            if value is None and f.name in ("base_shift", "max_shift", "base_image_seq_len",
                                            "max_image_seq_len"):
                if config.get("use_dynamic_shifting"):
                    raise ValueError(f"scheduler config has {f.name}=null with "
                                     "use_dynamic_shifting=true; give a number for it.")
                continue
            kwargs[f.name] = value
        return cls(**kwargs)


def image_seq_len(height: int, width: int, vae_factor: int = 8, patch: int = 2) -> int:
    """Number of transformer tokens of an image: latent patches, as the FLUX/SD3 pipelines count.

    Args:
        height, width: image size in pixels (a remainder below vae_factor * patch is dropped, as
            the pipelines do).
        vae_factor: pixels per latent cell (8 for the SD3/FLUX VAEs).
        patch: latent cells per token side (2 for SD3 and FLUX).

    Returns:
        (height // (vae_factor * patch)) * (width // (vae_factor * patch)).
    """
    for name, value in (("vae_factor", vae_factor), ("patch", patch)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer.")
    cell = vae_factor * patch
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value < cell:
            raise ValueError(f"{name}={value!r} must be an integer of at least {cell} pixels "
                             f"(vae_factor * patch).")
    return (height // cell) * (width // cell)


def dynamic_shift_mu(seq_len: int, schedule: FlowSchedule) -> float:
    """FLUX's mu for an image of `seq_len` tokens: the line through (base_image_seq_len, base_shift)
    and (max_image_seq_len, max_shift), extrapolated outside that range as diffusers does."""
    if not _is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer token count; get it "
                         "from image_seq_len(height, width).")
    slope = ((schedule.max_shift - schedule.base_shift)
             / (schedule.max_image_seq_len - schedule.base_image_seq_len))
    return schedule.base_shift + slope * (seq_len - schedule.base_image_seq_len)


def flux_sigmas(steps: int) -> torch.Tensor:
    """The unshifted grid u = linspace(1, 1/steps, steps) that the FLUX pipelines pass as `sigmas`."""
    _check_steps(steps)
    return torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)


def _check_steps(steps: int) -> None:
    if not _is_int(steps) or steps < 1:
        raise ValueError(f"steps={steps!r} must be a positive integer.")


def _time_shift(u: torch.Tensor, a: float) -> torch.Tensor:
    # a u / (1 + (a - 1) u) equals diffusers' a / (a + 1/u - 1) but stays finite at u = 0
    return a * u / (1.0 + (a - 1.0) * u)


def flow_sigmas(schedule: FlowSchedule, steps: int, mu: float | None = None,
                sigmas: Sequence[float] | torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels of an Euler sampling run, as FlowMatchEulerDiscreteScheduler.set_timesteps.

    Args:
        schedule: the model's flow schedule.
        steps: number of Euler steps (model calls).
        mu: the dynamic shift (`dynamic_shift_mu(image_seq_len(h, w), schedule)`); required when
            the schedule shifts dynamically, refused when it does not.
        sigmas: an unshifted grid of `steps` values in (0, 1], decreasing (the FLUX pipelines give
            `flux_sigmas(steps)`); None takes diffusers' default grid (what the SD3 pipeline uses).

    Returns:
        (sigmas, timesteps): sigmas (steps + 1,) float64, decreasing, ending with 0; timesteps
        (steps,) float64, num_train_timesteps * sigmas[:-1], the values fed to the model.
    """
    _check_steps(steps)
    if schedule.use_dynamic_shifting:
        if mu is None:
            raise ValueError("this flow schedule shifts its sigmas by image size "
                             "(use_dynamic_shifting); give mu=dynamic_shift_mu(image_seq_len("
                             "height, width), schedule).")
        if not _is_finite_number(mu):
            raise ValueError(f"mu={mu!r} must be a finite number.")
        if schedule.time_shift_type == "linear" and mu <= 0:
            raise ValueError(f"mu={mu!r} must be > 0 with time_shift_type='linear' (it is the "
                             "shift itself); check base_shift and max_shift.")
        a = math.exp(mu) if schedule.time_shift_type == "exponential" else float(mu)
    else:
        if mu is not None:
            raise ValueError(f"mu={mu!r} was given but this flow schedule uses the static "
                             f"shift={schedule.shift} (use_dynamic_shifting is False); drop mu.")
        a = float(schedule.shift)

    if sigmas is None:
        # diffusers' default grid: uniform from the training schedule's largest to its smallest
        # sigma (t = N and t = 1), where a static shift is already applied to the training sigmas
        n_train = schedule.num_train_timesteps
        u_min = torch.tensor(1.0 / n_train, dtype=torch.float64)
        if not schedule.use_dynamic_shifting:
            u_min = _time_shift(u_min, a)
        u = torch.linspace(1.0, float(u_min), steps, dtype=torch.float64)
    else:
        u = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
        if u.ndim != 1 or u.shape[0] != steps:
            raise ValueError(f"sigmas has shape {tuple(u.shape)} but steps={steps}; give one "
                             "unshifted sigma per step, e.g. flux_sigmas(steps).")
        if not (torch.isfinite(u).all() and (u > 0).all() and (u <= 1).all()):
            raise ValueError("sigmas must lie in (0, 1]; the final 0 is appended by flow_sigmas.")
        if steps > 1 and not (u[1:] < u[:-1]).all():
            raise ValueError("sigmas must be strictly decreasing (high noise first).")

    shifted = _time_shift(u, a)
    timesteps = shifted * schedule.num_train_timesteps
    return torch.cat([shifted, shifted.new_zeros(1)]), timesteps


def flow_euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: float | torch.Tensor,
                    sigma_next: float | torch.Tensor) -> torch.Tensor:
    """One Euler step of dx/ds = v from noise level sigma to sigma_next, differentiable in all inputs.

    Args:
        x: current latent x_sigma.
        velocity: model prediction v = e - x0 at (x, sigma), same shape as x.
        sigma, sigma_next: this and the next noise level (sigma_next < sigma); floats or tensors
            that broadcast against x.

    Returns:
        x + (sigma_next - sigma) * velocity, same shape as x.
    """
    return x + (sigma_next - sigma) * velocity


def flow_x0(x: torch.Tensor, velocity: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The clean-latent estimate x0 = x - sigma * v (the Euler step straight to sigma = 0)."""
    return x - sigma * velocity


def flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The forward process x_sigma = (1 - sigma) x0 + sigma e (used to re-noise a clean latent)."""
    return (1.0 - sigma) * x0 + sigma * noise
