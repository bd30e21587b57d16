"""The memory and time model of one AlignProp optimiser step, as a function of its settings.

Memory. The peak of a step is what the process holds before it (`StepCosts.baseline`: the weights of
the denoiser, VAE, text encoders and reward, and whatever else is resident) plus the step's own
growth, which is linear in the micro-batch size B:

    peak = baseline + fixed + B * (per_sample + window + decode)

    window = W * latent + denoiser_step     with the denoiser checkpointed
           = W * denoiser_step              without
    decode = 0 with the VAE checkpointed, else the decoder's saved activations per image

W is the number of denoiser steps that carry gradient per image (K, or 1 + n for DRaFT-LV's n
re-noised copies). With checkpointing each window step keeps one latent-sized tensor and backward
recomputes one step's activations at a time; without it every window step keeps a whole denoiser
step of activations. With the reward offloaded (`TrainConfig.offload_reward`) its weights
(`StepCosts.reward_weights`) are on the device only while it scores and runs its backward, when no
denoiser step's activations are alive, so the peak is the larger of the scoring phase (the weights,
the saved window, the decode) and the chain phase (everything else, without the weights); without
denoiser checkpointing every window step's activations are alive while it scores, and offloading
saves nothing, so that pairing is never a candidate. `fixed` is what does not scale with the batch (the LoRA, its gradient and
AdamW's two moments, work buffers); `per_sample` is the rest per image (decoding and scoring, the
recomputed decode included). The model is additive: the decoder's activations kept without VAE
checkpointing are counted on top of everything else, which slightly overstates that case (they are
freed before the denoiser's recomputation runs), a safe error for a planner.

Time, in units of one denoiser forward pass on one image: T sampling steps (plus DRaFT-LV's extra
copies), backward through the window (about two forwards per step), one more forward per window step
when checkpointed, the decode (`DECODE_COST` forwards; backward two, recomputation one more), and a
fixed cost per denoiser call of each micro-batch (`CALL_COST`), so fewer, larger micro-batches are
faster; offloading the reward costs `OFFLOAD_COST` per micro-batch (its weights cross the bus twice:
about two forwards each for a 1 GB network at PCIe speed against an SD1.5 step). Only the ranking of candidates matters, not the absolute numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import SamplerConfig, TrainConfig

GB = 2 ** 30  # the planner's gigabyte: budgets and estimates are in GiB, as cards are sold
DECODE_COST = 1.0  # a VAE decode of one image, in denoiser forwards of one image
CALL_COST = 0.5  # fixed cost of one batched denoiser call (launches, Python), in image forwards
OFFLOAD_COST = 4.0  # moving the reward network to the device and back once, in image forwards


@dataclass
class StepCosts:
    """The terms of the memory model, in bytes (measured by `probe.probe_costs` or calculated)."""

    baseline: int  # held before the step: weights of every network and whatever else is resident
    fixed: int  # step growth that does not scale with the batch: LoRA, its gradient, AdamW state
    per_sample: int  # per image outside the gradient window: decode (checkpointed), reward, images
    latent: int  # one saved window tensor per image (an x_t)
    denoiser_step: int | None  # one window step's activations per image; None: not measured
    decode: int | None  # the decoder's saved activations per image without checkpointing; None: unknown
    reward_weights: int = 0  # the reward's and judges' networks on the training device (0 on the CPU)


@dataclass(frozen=True)
class Setting:
    """The memory-relevant choices of one optimiser step."""

    window: int  # W: denoiser steps with gradient per image (K; 1 + n for DRaFT-LV)
    batch: int  # images per micro-batch
    grad_accum: int  # micro-batches per optimiser step
    checkpoint_unet: bool  # checkpoint every window step of the denoiser
    checkpoint_vae: bool  # checkpoint the VAE decode
    offload_reward: bool = False  # the reward's networks wait on the CPU between scoring passes

    def label(self) -> str:
        """A short human description, e.g. '4 x 1, ckpt unet+vae, offload'."""
        ckpt = "+".join(n for n, on in (("unet", self.checkpoint_unet), ("vae", self.checkpoint_vae)) if on)
        return f"{self.batch} x {self.grad_accum}, ckpt {ckpt or 'none'}" + (", offload" if self.offload_reward else "")


def window_steps(sampler: SamplerConfig) -> int:
    """W for the largest K the sampler can draw (the peak comes from the largest window)."""
    if sampler.estimator == "draft_lv":
        return 1 + sampler.lv_samples
    if sampler.truncation == "fixed":
        return sampler.k
    if sampler.truncation == "uniform":
        return sampler.k_max
    # gaussian: three standard deviations above the mean covers all but 0.1% of draws
    return int(min(sampler.steps, max(1, round(sampler.k_mean + 3 * sampler.k_std))))


def setting_of(sampler: SamplerConfig, cfg: TrainConfig) -> Setting:
    """The setting the configs ask for as they are."""
    return Setting(window_steps(sampler), cfg.batch_size, cfg.grad_accum, sampler.checkpoint_unet,
                   sampler.checkpoint_vae, cfg.offload_reward)


def can_estimate(costs: StepCosts, setting: Setting) -> bool:
    """False where a term the setting needs was not measured (e.g. the probe without checkpointing
    ran out of memory)."""
    if costs.denoiser_step is None and not setting.checkpoint_unet and setting.window > 1:
        return False
    return costs.decode is not None or setting.checkpoint_vae


def estimate_peak(costs: StepCosts, setting: Setting) -> int:
    """Peak memory of one optimiser step at `setting`, in bytes (see the module docstring)."""
    if not can_estimate(costs, setting):
        raise ValueError(f"the probe did not measure what {setting.label()} needs; keep checkpointing on.")
    step = costs.denoiser_step or 0
    window = setting.window * costs.latent + step if setting.checkpoint_unet else setting.window * step
    decode = 0 if setting.checkpoint_vae else (costs.decode or 0)
    peak = costs.baseline + costs.fixed + setting.batch * (costs.per_sample + window + decode)
    if not (setting.offload_reward and setting.checkpoint_unet):
        return peak
    scoring = costs.baseline + costs.fixed + setting.batch * (costs.per_sample + setting.window * costs.latent + decode)
    return max(scoring, peak - costs.reward_weights)


def relative_time(setting: Setting, steps: int, k: int) -> float:
    """Time of one optimiser step in image-forward units (see the module docstring).

    Args:
        setting: the candidate.
        steps: T, the sampler's denoising steps.
        k: the gradient window K of the chain (DRaFT-LV: 1; its copies are window - k extra steps).
    """
    images = setting.batch * setting.grad_accum
    forwards = steps + (setting.window - k)  # the chain plus DRaFT-LV's re-noised copies
    per_image = forwards + 2 * setting.window + (setting.window if setting.checkpoint_unet else 0)
    per_image += DECODE_COST * (3 + (1 if setting.checkpoint_vae else 0))
    calls = forwards + 2 * setting.window  # denoiser calls per micro-batch, forward and backward
    offload = OFFLOAD_COST if setting.offload_reward else 0.0
    return images * per_image + setting.grad_accum * (calls * CALL_COST + offload)
