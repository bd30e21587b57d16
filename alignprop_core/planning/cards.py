"""The planner's choices for well-known models on common cards, BY CALCULATION (no GPU involved).

`python -m alignprop_core.planning.cards` prints a Markdown table. The terms of the memory model
(`estimate.StepCosts`) come from published parameter counts and architectures instead of a probe:

* weights in bf16 (2 bytes per parameter): SD1.5 UNet 0.86 B, SDXL UNet 2.57 B, FLUX.1-dev
  transformer 11.9 B; VAE 0.084 B; text encoders CLIP-L 0.123 B, OpenCLIP-bigG 0.695 B (SDXL),
  T5-XXL encoder 4.76 B (FLUX.1); the reward an aesthetic head on CLIP ViT-L/14 (0.304 B vision tower).
* activations in bf16: a transformer layer keeps 34 bytes per token per hidden unit (Korthikanti et
  al. 2022, "Reducing Activation Recomputation in Large Transformer Models", with memory-efficient
  attention so no score matrix is kept); a ResNet block keeps 16 bytes per element (8 half-precision
  tensors of its feature map). Classifier-free guidance doubles the denoiser's batch (SD1.5, SDXL);
  FLUX.1-dev takes guidance as an input and runs one branch.
* the VAE decoder per image: its ResNet blocks at 1/8, 1/4, 1/2 and full resolution (512, 512, 256,
  128 channels; 3 blocks each, 2 more at 1/8); the reward's ViT-L/14 at 224 px.
* with both checkpointed, decode-and-score and the denoiser's recomputation never run together, so
  an image costs the larger of the two; `per_sample` is what the decode and reward add beyond u.
* 1 GB of each card is left to the CUDA context and other processes.

These are estimates by calculation; the measured probe replaces every term on a real run.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import SamplerConfig, TrainConfig
from .estimate import GB, StepCosts
from .plan import choose_plan

BF16 = 2
TRANSFORMER_BYTES = 34  # per token per hidden unit per layer
RESNET_BYTES = 16  # per feature-map element per block
CARDS_GB = (12, 16, 24, 80)
CONTEXT_GB = 1.0


@dataclass
class Family:
    """What the calculation needs of one model family."""

    name: str
    weights: float  # parameters of denoiser, VAE and text encoders, billions
    latent_channels: int
    cfg_branches: int  # denoiser batch per image: 2 with classifier-free guidance
    unet_levels: tuple[tuple[int, int, int, int], ...] = ()  # (downsample, channels, transformer layers, resnets)
    transformer: tuple[int, int, int] = (0, 0, 0)  # (layers, hidden, text tokens) of a DiT
    lora_params: float = 3e6  # rank-4 attention LoRA, order of magnitude


SD15 = Family("SD1.5", 0.86 + 0.084 + 0.123, 4, 2,
              unet_levels=((8, 320, 5, 5), (16, 640, 5, 5), (32, 1280, 5, 5), (64, 1280, 1, 7)))
SDXL = Family("SDXL", 2.57 + 0.084 + 0.123 + 0.695, 4, 2,
              unet_levels=((8, 320, 0, 5), (16, 640, 10, 5), (32, 1280, 60, 7)))
FLUX = Family("FLUX.1-dev", 11.9 + 0.084 + 0.123 + 4.76, 16, 1, transformer=(57, 3072, 512))
REWARD_WEIGHTS = 0.304  # billions: CLIP ViT-L/14 vision tower


def denoiser_step_bytes(family: Family, px: int) -> int:
    """u: one window step's activations per image."""
    latent_side = px // 8
    total = 0
    for down, channels, layers, resnets in family.unet_levels:
        tokens = (px // down) ** 2
        total += tokens * channels * (layers * TRANSFORMER_BYTES + resnets * RESNET_BYTES)
    layers, hidden, text = family.transformer
    if layers:
        tokens = (latent_side // 2) ** 2 + text  # 2x2 latent patches per token
        total += layers * tokens * hidden * TRANSFORMER_BYTES
    return total * family.cfg_branches


def decode_bytes(px: int) -> int:
    """v: the VAE decoder's activations per image."""
    levels = ((8, 512, 5), (4, 512, 3), (2, 256, 3), (1, 128, 3))
    return sum((px // f) ** 2 * c * n * RESNET_BYTES for f, c, n in levels)


def reward_bytes() -> int:
    """r: the ViT-L/14 reward's activations per image (257 tokens, 24 layers, width 1024)."""
    return 24 * 257 * 1024 * TRANSFORMER_BYTES


def card_costs(family: Family, px: int) -> StepCosts:
    """The memory model's terms for `family` at `px` x `px`, by calculation."""
    u, v = denoiser_step_bytes(family, px), decode_bytes(px)
    images = 3 * px * px * 4 * 2  # the decoded batch in fp32 and its gradient
    return StepCosts(baseline=int((family.weights + REWARD_WEIGHTS) * 1e9 * BF16),
                     fixed=int(16 * family.lora_params),  # fp32 weight, gradient, two AdamW moments
                     per_sample=max(v + reward_bytes() + images - u, 0),
                     latent=family.latent_channels * (px // 8) ** 2 * 4, denoiser_step=u, decode=v,
                     reward_weights=int(REWARD_WEIGHTS * 1e9 * BF16))


def card_table(k: int = 1, images: int = 4, steps: int = 20) -> str:
    """Markdown: the plan for each family and size on each card, K and images per step given."""
    rows = [f"| model | px | u per image-step | {' | '.join(f'{c} GB card' for c in CARDS_GB)} |",
            "|---|---|---|" + "---|" * len(CARDS_GB)]
    for family, px in ((SD15, 512), (SDXL, 1024), (FLUX, 512), (FLUX, 1024)):
        costs = card_costs(family, px)
        sampler = SamplerConfig(steps=steps, k=k, use_cfg=family.cfg_branches == 2,
                                guidance_scale=7.5 if family.cfg_branches == 2 else 1.0)
        cfg = TrainConfig(batch_size=images, width=px, height=px)
        cells = []
        for card in CARDS_GB:
            try:
                plan = choose_plan(costs, sampler, cfg, int((card - CONTEXT_GB) * GB))
                cells.append(f"{plan.chosen.setting.label()} ({plan.chosen.peak / GB:.1f} GB)")
            except ValueError:
                smallest = min(estimate.peak for estimate in choose_plan(costs, sampler, cfg, 10 ** 15).candidates)
                cells.append(f"does not fit (min {smallest / GB:.1f} GB)")
        rows.append(f"| {family.name} | {px} | {costs.denoiser_step / GB:.2f} GB | {' | '.join(cells)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for k in (1, 10):
        print(f"\nK = {k}, 4 images per optimiser step, 20 sampling steps (estimates by calculation)\n")
        print(card_table(k=k))
