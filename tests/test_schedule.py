"""Our DDIM timesteps and update equal diffusers.DDIMScheduler's, for every spacing and prediction."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from alignprop_core.sampling.schedule import NoiseSchedule, ddim_step
from tiny_models import SD15_SCHEDULER


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
def test_timesteps_match_diffusers(spacing, steps):
    config = dict(SD15_SCHEDULER, timestep_spacing=spacing)
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(steps)
    ours = NoiseSchedule.from_diffusers_config(config)
    assert ours.timesteps(steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_step_matches_diffusers(prediction_type, eta, set_alpha_to_one):
    config = dict(SD15_SCHEDULER, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one)
    ref = DDIMScheduler.from_config(config)
    steps = 10
    ref.set_timesteps(steps)
    # run the reference in float64 too, so the comparison is not limited by float32 scalars
    ref.alphas_cumprod = ref.alphas_cumprod.double()
    ref.final_alpha_cumprod = torch.as_tensor(ref.final_alpha_cumprod).double()
    ours = NoiseSchedule.from_diffusers_config(config)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in ref.timesteps.tolist():
        out = torch.randn(x.shape, generator=g, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        got = ddim_step(out, x, ours.alpha_bar(t), ours.alpha_bar(ours.previous_timestep(t, steps)),
                        eta, prediction_type, noise)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        x = expected


def test_eta_without_noise_is_an_error():
    with pytest.raises(ValueError, match="needs `noise`"):
        ddim_step(torch.zeros(1), torch.zeros(1), 0.5, 0.6, 1.0, "epsilon", None)


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="flow"):
        NoiseSchedule(alphas_cumprod=torch.linspace(0.99, 0.01, 10), prediction_type="flow")
