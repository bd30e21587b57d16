"""GPU checks the CPU cannot make, in one run (python -m bench.gpu_check --out DIR; needs CUDA).

1. gradients on CUDA: the LoRA gradient of one AlignProp step with checkpointing equals the one
   without (fp32 and bf16 autocast), and bf16's gradient is close to fp32's;
2. training on CUDA with mixed_precision no / bf16 / fp16 (weights in that dtype, LoRA in fp32):
   finite rewards, the LoRA moves and stays fp32, and the same seed gives the same LoRA; a run
   stopped after 3 steps and resumed from its saved state equals 6 straight steps (`TrainRun`);
3. the full SD1.5 UNet (860M, random weights, 512 px, T=20) and the full SDXL UNet (2.6B, 1024 px):
   seconds per optimiser step and peak CUDA memory against K, with and without checkpointing;
4. the memory planner on CUDA (`planner`): the probe on the full SD1.5 model in bf16 with a reward
   network of CLIP ViT-L/14's size (random open_clip tower, 0.6 GB), then for settings the probe did
   not run (K, batch, checkpointing, reward offload, VAE tiles) its estimate against the measured
   peak CUDA memory of two optimiser steps, and the seconds per step.
Every section is independent: an error is recorded and the next section runs. Results go to
DIR/gpu_check.json; a table is printed last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from alignprop_core.config import LoraConfig, SamplerConfig, TrainConfig
from alignprop_core.models.backend import DiffusionBackend, unet_denoiser
from alignprop_core.lora import add_lora, lora_parameters, lora_state_dict, remove_lora
from alignprop_core.rewards import make_reward
from alignprop_core.sampling.sampler import sample_images
from alignprop_core.sampling.schedule import NoiseSchedule
from alignprop_core.training.step import autocast_context
from alignprop_core.training.run import TrainRun
from alignprop_core.training.train_state import load_train_state
from alignprop_core.training.trainer import train

from bench.rig import RigSpec, build_rig

CUDA = torch.device("cuda")
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading"}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def tiny_backend(dtype: torch.dtype) -> DiffusionBackend:
    from alignprop_core.models.backend import diffusers_backend
    from alignprop_core.models.tiny_model import build_tiny_model

    model = build_tiny_model(0).to(CUDA, dtype)
    return diffusers_backend(model, name="tiny")


def lora_grads(backend: DiffusionBackend, checkpoint: bool, mixed: str) -> torch.Tensor:
    """Flattened LoRA gradient of -reward for one fixed batch, K=3 of T=4."""
    remove_lora(backend.lora_target)
    params = add_lora(backend.lora_target, LoraConfig(rank=4, alpha=4.0, init_seed=0))
    with torch.no_grad():  # B starts at zero: give it values so every factor gets a gradient
        gen = torch.Generator().manual_seed(1)
        for p in params:
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    sampler = SamplerConfig(steps=4, k=3, guidance_scale=3.0, checkpoint_unet=checkpoint,
                            checkpoint_vae=checkpoint)
    x_T = torch.randn((2, backend.latent_channels, 16, 16), generator=torch.Generator().manual_seed(2))
    with autocast_context(CUDA, mixed):
        images = sample_images(backend, ["a red cat", "a blue dog"], sampler, x_T.to(CUDA), grad_steps=3)
        loss = -make_reward("smoothness")(images.float(), ["a", "b"]).mean()
    loss.backward()
    return torch.cat([p.grad.flatten().float().cpu() for p in params])


def check_gradients() -> dict:
    backend = tiny_backend(torch.float32)
    g32_ck, g32 = lora_grads(backend, True, "no"), lora_grads(backend, False, "no")
    gbf_ck, gbf = lora_grads(backend, True, "bf16"), lora_grads(backend, False, "bf16")
    return {"fp32_ckpt_vs_plain": rel(g32_ck, g32), "bf16_ckpt_vs_plain": rel(gbf_ck, gbf),
            "bf16_vs_fp32": rel(gbf, g32), "grad_norm_fp32": float(g32.norm())}


def check_training() -> dict:
    out = {}
    for mixed, dtype in DTYPES.items():
        loras = []
        for _ in range(2):
            backend = tiny_backend(dtype)
            sampler = SamplerConfig(steps=6, truncation="uniform", k_min=1, k_max=4, guidance_scale=4.0)
            cfg = TrainConfig(reward="color_target", steps=8, batch_size=4, lr=1e-2, width=32, height=32,
                              eval_every=4, mixed_precision=mixed, seed=0)
            started = time.perf_counter()
            result = train(backend, make_reward("color_target"), ["a cat", "a dog", "a red horse"],
                           ["a fox", "a lion"], sampler, LoraConfig(rank=4, alpha=4.0), cfg)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - started
            loras.append({k: v.detach().float().cpu() for k, v in lora_state_dict(backend.lora_target).items()})
            dtypes = sorted({str(p.dtype) for _, p in lora_parameters(backend.lora_target)})
        moved = sum(float(v.abs().sum()) for k, v in loras[0].items() if "lora_B" in k)
        repeat = max(float((loras[0][k] - loras[1][k]).abs().max()) for k in loras[0])
        rewards = [h["reward"] for h in result.history]
        out[mixed] = {"finite": all(r == r for r in rewards), "skipped": sum(h["skipped"] for h in result.history),
                      "eval": [round(e["eval_reward"], 4) for e in result.evals], "lora_B_abs_sum": moved,
                      "lora_dtypes": dtypes, "same_seed_max_diff": repeat, "seconds": round(seconds, 2)}
    return out


def check_resume() -> dict:
    """TrainRun on CUDA: 3 steps, save the state, resume in a fresh run for 3 more; against 6 straight
    steps (a standardised mixture, so the reward's running statistics travel with the state too)."""
    import tempfile

    out = {}
    sampler = SamplerConfig(steps=6, truncation="uniform", k_min=1, k_max=4, guidance_scale=4.0)
    prompts, held_out = ["a cat", "a dog", "a red horse"], ["a fox", "a lion"]
    for mixed in ("bf16", "fp16"):
        cfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, width=32, height=32, eval_every=0,
                          mixed_precision=mixed, seed=0)

        def new_run(state=None) -> TrainRun:
            reward = make_reward("mixture", spec="smoothness:1, color_target:0.5", standardize=True)
            return TrainRun(tiny_backend(DTYPES[mixed]), reward, prompts, held_out, sampler,
                            LoraConfig(rank=4, alpha=4.0), cfg, state=state)

        full = new_run()
        full.evaluate()
        while not full.done:
            full.step()
        half = new_run()
        half.evaluate()
        for _ in range(3):
            half.step()
        with tempfile.TemporaryDirectory() as tmp:
            path = half.save_state(Path(tmp) / "train_state.pt")
            resumed = new_run(load_train_state(path))
        while not resumed.done:
            resumed.step()
        a, b = lora_state_dict(full.backend.lora_target), lora_state_dict(resumed.backend.lora_target)
        out[mixed] = {"max_diff_resumed_vs_straight": max(float((a[k] - b[k]).abs().max()) for k in a),
                      "reward_spec": resumed.cfg.reward, "reward_state_equal":
                      full.reward.state_dict() == resumed.reward.state_dict(),
                      "rewards": [round(h["reward"], 4) for h in resumed.history]}
    return out


def sdxl_backend(px: int) -> DiffusionBackend:
    """Full-size SDXL UNet and SD VAE with random weights in bf16; fixed random text conditioning."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(CUDA):
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
            layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, upcast_attention=False)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=1024,
                            scaling_factor=0.13025)
    unet = unet.to(torch.bfloat16).eval().requires_grad_(False)
    vae = vae.to(torch.bfloat16).eval().requires_grad_(False)

    def encode(prompts):
        g = torch.Generator().manual_seed(len(prompts))
        b = len(prompts)
        time_ids = torch.tensor([px, px, 0, 0, px, px], dtype=torch.float32).repeat(b, 1)
        return {"context": torch.randn(b, 77, 2048, generator=g).to(CUDA),
                "text_embeds": torch.randn(b, 1280, generator=g).to(CUDA), "time_ids": time_ids.to(CUDA)}

    def decode(latents):
        img = vae.decode(latents.to(vae.dtype) / 0.13025).sample
        return (img.float() / 2 + 0.5).clamp(0, 1)

    return DiffusionBackend(denoiser=unet_denoiser(unet), schedule=NoiseSchedule.from_diffusers_config(SD_SCHEDULER),
                            encode_prompts=encode, decode=decode, latent_channels=4, vae_scale_factor=8,
                            lora_target=unet, device=CUDA, name="sdxl-random", arch="sdxl")


def time_steps(rig, repeats: int) -> tuple[float, float]:
    """Median seconds per optimiser step (after one warm-up) and peak CUDA GiB over the timed steps."""
    rig.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        rig.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2 ** 30


def check_full_size(name: str, ks: tuple[int, ...], px: int, repeats: int) -> list[dict]:
    rows = []
    if name == "sd15":
        from bench.models import build_sd15_model

        with torch.device(CUDA):
            model = build_sd15_model(0)
        model = model.to(CUDA, torch.bfloat16)
        rig = build_rig(RigSpec(model="sd15", reward="smoothness", steps=20, k=1, batch=1, px=px), model=model)
    else:
        from bench.rig import Rig

        backend = sdxl_backend(px)
        params = add_lora(backend.lora_target, LoraConfig())
        rig = Rig(backend, make_reward("smoothness"), SamplerConfig(steps=20), TrainConfig(
            reward="smoothness", batch_size=1, width=px, height=px, eval_every=0), params,
            torch.optim.AdamW(params, lr=1e-4), torch.amp.GradScaler("cuda", enabled=False),
            torch.Generator().manual_seed(0), ["a photo"])
    rig.train = replace(rig.train, mixed_precision="bf16")
    weights_gib = torch.cuda.memory_allocated() / 2 ** 30
    for ckpt in (True, False):
        for k in ks:
            rig.sampler = replace(rig.sampler, k=k, checkpoint_unet=ckpt, checkpoint_vae=ckpt)
            row = {"model": name, "px": px, "T": 20, "K": k, "checkpoint": ckpt, "weights_gib": round(weights_gib, 2)}
            try:
                step_s, peak = time_steps(rig, repeats)
                row.update(step_s=round(step_s, 3), peak_gib=round(peak, 2))
            except torch.OutOfMemoryError as err:
                row["error"] = f"OOM: {str(err).splitlines()[0]}"
            torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
    started = time.perf_counter()
    rig.sample()
    torch.cuda.synchronize()
    rows.append({"model": name, "px": px, "sample_only_s": round(time.perf_counter() - started, 3)})
    del rig
    torch.cuda.empty_cache()
    return rows


def vit_reward(device: torch.device, dtype: torch.dtype, arch: str = "ViT-L-14"):
    """A reward with a network of a real reward's size: a random open_clip vision tower (ViT-L/14 is
    the aesthetic predictor's), scoring the mean of each image's embedding."""
    import open_clip

    from alignprop_core.rewards.base import FunctionReward
    from alignprop_core.rewards.spec import RewardSpec

    tower = open_clip.create_model(arch, pretrained=None).visual.to(device, dtype).eval().requires_grad_(False)
    side = tower.image_size[0] if isinstance(tower.image_size, tuple) else tower.image_size

    def score(images, prompts):
        x = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
        return tower(x.to(dtype)).float().mean(dim=1)

    return FunctionReward(RewardSpec.parse("smoothness"), score, modules=[tower])


def check_planner(device: torch.device = CUDA, model: str = "sd15", px: int = 512, arch: str = "ViT-L-14",
                  repeats: int = 2) -> dict:
    """The planner's estimate against the measured peak for settings the probe did not run."""
    from alignprop_core.models.backend import diffusers_backend
    from alignprop_core.planning import Setting, estimate_peak
    from alignprop_core.planning.probe import probe_costs
    from alignprop_core.rewards.offload import offloaded
    from alignprop_core.training.step import make_optimizer, make_scaler, optimizer_step
    from bench.models import build_model

    on_cuda = device.type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    backend = diffusers_backend(build_model(model, 0).to(device, dtype), name=model)
    reward = vit_reward(device, dtype, arch)
    prompts, lora = ["a photo of a cat", "a red car"], LoraConfig()
    mixed = "bf16" if on_cuda else "no"
    base_sampler = SamplerConfig(steps=20 if on_cuda else 6)
    base_cfg = TrainConfig(reward="smoothness", batch_size=1, width=px, height=px, mixed_precision=mixed)
    if on_cuda:
        torch.cuda.synchronize()
    costs = probe_costs(backend, reward, prompts, base_sampler, lora, base_cfg)
    out: dict = {"model": model, "px": px, "reward_network": arch, "costs_gib": {
        k: (round(v / 2 ** 30, 4) if isinstance(v, int) else v) for k, v in vars(costs).items()}, "rows": []}
    # (K, batch, checkpoint, offload the reward, VAE tile in pixels)
    for k, batch, ckpt, offload, tile in ((1, 2, True, False, 0), (5, 2, True, False, 0), (5, 2, True, True, 0),
                                          (1, 1, False, False, 0), (5, 1, False, False, 0), (1, 2, True, False, px // 2)):
        sampler = replace(base_sampler, k=k, checkpoint_unet=ckpt, checkpoint_vae=ckpt, vae_tile=tile,
                          vae_tile_overlap=min(64, tile // 4 // 8 * 8) if tile else 64)
        cfg = replace(base_cfg, batch_size=batch, offload_reward=offload)
        setting = Setting(k, batch, 1, ckpt, ckpt, offload and costs.reward_weights > 0)
        row = {"K": k, "batch": batch, "checkpoint": ckpt, "offload_reward": offload, "vae_tile": tile,
               "estimate_gib": round(estimate_peak(costs, setting) / 2 ** 30, 3)}
        scorer = offloaded(reward) if offload else reward
        if offload:
            scorer.park()
        params = add_lora(backend.lora_target, lora, device=device)
        try:
            optimizer, gen = make_optimizer(params, cfg), torch.Generator().manual_seed(0)
            scaler = make_scaler(device, cfg)
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = []
            for step in range(repeats):
                started = time.perf_counter()
                optimizer_step(backend, scorer, prompts, sampler, cfg, params, optimizer, scaler, gen, step)
                if on_cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            row["step_s"] = round(statistics.median(times), 3)
            if on_cuda:
                row["measured_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
                row["estimate_over_measured"] = round(row["estimate_gib"] / row["measured_gib"], 3)
        except torch.OutOfMemoryError as err:
            row["error"] = f"OOM: {str(err).splitlines()[0]}"
        finally:
            remove_lora(backend.lora_target)
            if offload:
                scorer.restore()
            if on_cuda:
                torch.cuda.empty_cache()
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--sections", nargs="+", default=None,
                        help="run only these sections (gradients training resume sd15 sdxl planner)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
               "capability": list(torch.cuda.get_device_capability(0))}
    sections = [("gradients", check_gradients), ("training", check_training), ("resume", check_resume),
                ("sd15", lambda: check_full_size("sd15", (1, 5, 10, 20), 256 if args.quick else 512, 3)),
                ("sdxl", lambda: check_full_size("sdxl", (1, 10), 512 if args.quick else 1024, 2)),
                ("planner", lambda: check_planner(px=256 if args.quick else 512))]
    chosen = set(args.sections or [name for name, _ in sections])
    for name, fn in [(n, f) for n, f in sections if n in chosen]:
        started = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - one broken section must not lose the others
            results[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        results[name + "_seconds"] = round(time.perf_counter() - started, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1))
        print(f"== {name} ({results[name + '_seconds']} s): "
              f"{json.dumps(results[name])[:1500]}", flush=True)


if __name__ == "__main__":
    main()
