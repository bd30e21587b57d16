"""Our rectified-flow sigmas, timesteps and Euler step equal diffusers' FlowMatchEulerDiscreteScheduler.

diffusers computes in float32; to compare to 1e-10 its scheduler module is run with float32 mapped
to float64 (`float64_diffusers`), and a separate test bounds the gap to the stock float32 scheduler.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers import scheduling_flow_match_euler_discrete as fm_module

from alignprop_core.sampling.flow_schedule import (UNSUPPORTED_OPTIONS, FlowSchedule,
                                                   dynamic_shift_mu, flow_euler_step,
                                                   flow_noise, flow_sigmas, flow_x0,
                                                   flux_sigmas, image_seq_len)

# the scheduler_config.json of the real models (SD3 medium and SD3.5 carry the same keys)
SD3_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0",
              "num_train_timesteps": 1000, "shift": 3.0}
FLUX_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0",
               "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
               "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
               "use_dynamic_shifting": True}
STEPS = [1, 2, 4, 20, 28, 50]
SIZES = [(256, 256), (512, 512), (1024, 1024), (1024, 768)]
TOL = dict(rtol=0.0, atol=1e-10)


class _Float64For32:
    """Stands in for a module inside diffusers' scheduler file, answering float32 with float64."""

    def __init__(self, module, wide):
        self._module, self._wide = module, wide

    def __getattr__(self, name):
        return self._wide if name == "float32" else getattr(self._module, name)


@pytest.fixture
def float64_diffusers(monkeypatch):
    """Build a FlowMatchEulerDiscreteScheduler from a config dict that computes in float64."""
    monkeypatch.setattr(fm_module, "torch", _Float64For32(torch, torch.float64))
    monkeypatch.setattr(fm_module, "np", _Float64For32(np, np.float64))

    def build(config):
        ref = FlowMatchEulerDiscreteScheduler.from_config(config)
        assert ref.sigmas.dtype == torch.float64, "the float64 stand-in no longer reaches diffusers"
        return ref
    return build


def set_reference(ref, steps, mu=None, flux_grid=False):
    """Call set_timesteps the way the SD3 (default grid) and FLUX (own grid) pipelines do."""
    kwargs = {} if mu is None else {"mu": mu}
    if flux_grid:
        ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kwargs)
    else:
        ref.set_timesteps(steps, **kwargs)
    assert ref.sigmas.dtype == torch.float64
    return ref


@pytest.mark.parametrize("flux_grid", [False, True])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.3])
@pytest.mark.parametrize("steps", STEPS)
def test_static_shift_sigmas_match_diffusers(float64_diffusers, steps, shift, flux_grid):
    config = dict(SD3_CONFIG, shift=shift)
    ref = set_reference(float64_diffusers(config), steps, flux_grid=flux_grid)
    sigmas, timesteps = flow_sigmas(FlowSchedule.from_config(config), steps,
                                    sigmas=flux_sigmas(steps) if flux_grid else None)
    assert sigmas.dtype == timesteps.dtype == torch.float64
    assert sigmas.shape == (steps + 1,) and timesteps.shape == (steps,)
    assert sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    torch.testing.assert_close(sigmas, ref.sigmas, **TOL)
    torch.testing.assert_close(timesteps, ref.timesteps, **TOL)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("flux_grid", [False, True])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("steps", STEPS)
def test_dynamic_shift_sigmas_match_diffusers(float64_diffusers, steps, size, flux_grid,
                                              time_shift_type):
    config = dict(FLUX_CONFIG, time_shift_type=time_shift_type)
    schedule = FlowSchedule.from_config(config)
    mu = dynamic_shift_mu(image_seq_len(*size), schedule)
    ref = set_reference(float64_diffusers(config), steps, mu=mu, flux_grid=flux_grid)
    sigmas, timesteps = flow_sigmas(schedule, steps, mu=mu,
                                    sigmas=flux_sigmas(steps) if flux_grid else None)
    torch.testing.assert_close(sigmas, ref.sigmas, **TOL)
    torch.testing.assert_close(timesteps, ref.timesteps, **TOL)


@pytest.mark.parametrize("config,mu", [(SD3_CONFIG, None), (FLUX_CONFIG, 1.15)])
@pytest.mark.parametrize("steps", [4, 28])
def test_stock_float32_scheduler_differs_only_by_float32_rounding(config, mu, steps):
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    sigmas, timesteps = flow_sigmas(FlowSchedule.from_config(config), steps, mu=mu)
    torch.testing.assert_close(sigmas.float(), ref.sigmas, rtol=0.0, atol=3e-7)
    torch.testing.assert_close(timesteps.float(), ref.timesteps, rtol=0.0, atol=3e-4)


def test_mu_and_token_count_match_the_flux_pipeline():
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

    schedule = FlowSchedule.from_config(FLUX_CONFIG)
    for height, width in SIZES + [(1000, 776), (2048, 2048), (128, 64)]:
        # the pipeline's latent is (B, 16, 2 * (h // 16), 2 * (w // 16)), packed into 2x2 patches
        lat_h, lat_w = 2 * (height // 16), 2 * (width // 16)
        packed = FluxPipeline._pack_latents(torch.zeros(1, 16, lat_h, lat_w), 1, 16, lat_h, lat_w)
        seq_len = image_seq_len(height, width)
        assert seq_len == packed.shape[1]
        assert dynamic_shift_mu(seq_len, schedule) == pytest.approx(
            calculate_shift(seq_len, 256, 4096, 0.5, 1.15), abs=1e-12)
    assert dynamic_shift_mu(image_seq_len(1024, 1024), schedule) == pytest.approx(1.15)
    assert dynamic_shift_mu(image_seq_len(256, 256), schedule) == pytest.approx(0.5)


@pytest.mark.parametrize("config,size,flux_grid", [(SD3_CONFIG, None, False),
                                                   (FLUX_CONFIG, (1024, 768), True),
                                                   (FLUX_CONFIG, (512, 512), False)])
def test_euler_chain_matches_diffusers_step(float64_diffusers, config, size, flux_grid):
    steps = 12
    schedule = FlowSchedule.from_config(config)
    mu = None if size is None else dynamic_shift_mu(image_seq_len(*size), schedule)
    ref = set_reference(float64_diffusers(config), steps, mu=mu, flux_grid=flux_grid)
    sigmas, _ = flow_sigmas(schedule, steps, mu=mu, sigmas=flux_sigmas(steps) if flux_grid else None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    for i, t in enumerate(ref.timesteps):
        velocity = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = ref.step(velocity, t, x).prev_sample
        assert expected.dtype == torch.float64
        got = flow_euler_step(x, velocity, float(sigmas[i]), float(sigmas[i + 1]))
        torch.testing.assert_close(got, expected, **TOL)
        x = expected


def test_forward_noise_and_x0_round_trip(float64_diffusers):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    velocity = noise - x0  # the exact velocity of the straight path
    ref = set_reference(float64_diffusers(SD3_CONFIG), 10)
    sigmas, _ = flow_sigmas(FlowSchedule.from_config(SD3_CONFIG), 10)
    for i in range(10):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x = flow_noise(x0, noise, sigma)
        expected = ref.scale_noise(x0, ref.timesteps[i:i + 1], noise)
        torch.testing.assert_close(x, expected, **TOL)
        torch.testing.assert_close(flow_x0(x, velocity, sigma), x0, **TOL)
        # on a straight path one Euler step is exact
        torch.testing.assert_close(flow_euler_step(x, velocity, sigma, sigma_next),
                                   flow_noise(x0, noise, sigma_next), **TOL)
    torch.testing.assert_close(flow_noise(x0, noise, 1.0), noise, **TOL)
    torch.testing.assert_close(flow_noise(x0, noise, 0.0), x0, **TOL)


def test_per_sample_sigmas_broadcast():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    sigma = torch.tensor([0.8, 0.3], dtype=torch.float64).view(2, 1, 1, 1)
    got = flow_euler_step(x, v, sigma, sigma - 0.1)
    for b in range(2):
        s = float(sigma[b])
        torch.testing.assert_close(got[b], flow_euler_step(x[b], v[b], s, s - 0.1), **TOL)


def test_updates_are_differentiable():
    g = torch.Generator().manual_seed(2)
    x, v, x0, e = (torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
                   for _ in range(4))
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sigma_next = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(flow_euler_step, (x, v, sigma, sigma_next))
    assert torch.autograd.gradcheck(lambda a, b: flow_euler_step(a, b, 0.7, 0.4), (x, v))
    assert torch.autograd.gradcheck(flow_x0, (x, v, sigma))
    assert torch.autograd.gradcheck(flow_noise, (x0, e, sigma))


def test_real_configs_read_as_expected():
    sd3 = FlowSchedule.from_config(SD3_CONFIG)
    assert sd3 == FlowSchedule(shift=3.0)
    flux = FlowSchedule.from_config(FLUX_CONFIG)
    assert flux.use_dynamic_shifting and flux.max_shift == 1.15
    # keys of other options or versions are ignored
    assert FlowSchedule.from_config(dict(SD3_CONFIG, some_future_key=1)) == sd3
    # off values of the refused options are fine (diffusers writes them all out)
    assert FlowSchedule.from_config(dict(SD3_CONFIG, **UNSUPPORTED_OPTIONS)) == sd3
    # FrozenDict from a loaded diffusers scheduler works too
    assert FlowSchedule.from_config(FlowMatchEulerDiscreteScheduler.from_config(FLUX_CONFIG).config
                                    ) == flux


@pytest.mark.parametrize("option,value", [("use_karras_sigmas", True),
                                          ("use_exponential_sigmas", True),
                                          ("use_beta_sigmas", True),
                                          ("stochastic_sampling", True),
                                          ("invert_sigmas", True),
                                          ("shift_terminal", 0.02)])
def test_unimplemented_options_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        FlowSchedule.from_config(dict(SD3_CONFIG, **{option: value}))


@pytest.mark.parametrize("config,match", [
    ({"_class_name": "DDIMScheduler"}, "NoiseSchedule.from_diffusers_config"),
    (dict(FLUX_CONFIG, base_shift=None), "base_shift=null"),
    (dict(SD3_CONFIG, shift=0.0), "shift"),
    (dict(SD3_CONFIG, time_shift_type="cubic"), "time_shift_type"),
])
def test_bad_config_dicts_are_named(config, match):
    with pytest.raises(ValueError, match=match):
        FlowSchedule.from_config(config)


def test_null_shift_bounds_are_fine_without_dynamic_shifting():
    assert FlowSchedule.from_config(dict(SD3_CONFIG, base_shift=None)) == FlowSchedule(shift=3.0)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 1000.0}, "num_train_timesteps"),
    ({"shift": 0.0}, "shift"),
    ({"shift": -1.0}, "shift"),
    ({"shift": float("nan")}, "shift"),
    ({"use_dynamic_shifting": "yes"}, "use_dynamic_shifting"),
    ({"base_shift": float("inf")}, "base_shift"),
    ({"max_shift": "1.15"}, "max_shift"),
    ({"base_image_seq_len": 0}, "base_image_seq_len"),
    ({"max_image_seq_len": 256}, "max_image_seq_len"),
    ({"time_shift_type": "cubic"}, "time_shift_type"),
])
def test_bad_fields_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowSchedule(**kwargs)


def test_bad_sampling_requests_say_what_to_do():
    flux = FlowSchedule.from_config(FLUX_CONFIG)
    sd3 = FlowSchedule.from_config(SD3_CONFIG)
    with pytest.raises(ValueError, match="image_seq_len"):
        flow_sigmas(flux, 28)
    with pytest.raises(ValueError, match="drop mu"):
        flow_sigmas(sd3, 28, mu=1.15)
    with pytest.raises(ValueError, match="steps"):
        flow_sigmas(sd3, 0)
    with pytest.raises(ValueError, match="steps"):
        flux_sigmas(0)
    with pytest.raises(ValueError, match="one unshifted sigma per step"):
        flow_sigmas(sd3, 4, sigmas=flux_sigmas(5))
    with pytest.raises(ValueError, match="decreasing"):
        flow_sigmas(sd3, 3, sigmas=[0.5, 0.5, 0.2])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        flow_sigmas(sd3, 2, sigmas=[1.5, 0.5])
    linear = FlowSchedule.from_config(dict(FLUX_CONFIG, time_shift_type="linear"))
    with pytest.raises(ValueError, match="linear"):
        flow_sigmas(linear, 4, mu=0.0)
    with pytest.raises(ValueError, match="seq_len"):
        dynamic_shift_mu(0, flux)
    with pytest.raises(ValueError, match="height"):
        image_seq_len(8, 1024)
    with pytest.raises(ValueError, match="patch"):
        image_seq_len(1024, 1024, patch=0)
