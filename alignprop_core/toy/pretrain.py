"""Pretrain the toy world from nothing: the VAE, the count/colour/shape classifier, then the
text encoder + UNet, all on images drawn by `shapes.py`, seeded and reproducible on a CPU.

    python -m alignprop_core.toy.pretrain --out alignprop_core/data/toy_world

writes a diffusers StableDiffusionPipeline folder (model_index.json, tokenizer/, text_encoder/,
unet/, vae/, scheduler/), classifier.safetensors and pretrain_info.json (command, seed, config,
seconds per stage, machine, and measured quality) into --out. Every field of `PretrainConfig` is a
flag. With the same seed, thread count and torch build the weights are the same.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from alignprop_core.models.t2i_model import T2IModel, load_t2i_model, save_t2i_model

from .classifier import HEADS, ShapeClassifier, WEIGHTS_FILE, accuracy, load_classifier, save_classifier
from .networks import (SCHEDULER_CONFIG, ToyArchitecture, build_text_encoder, build_tokenizer,
                       build_unet, build_vae)
from .counting import count_shapes
from .shapes import MAX_COUNT, generate, random_scene, render

STAGES = ("vae", "classifier", "unet", "evaluate")
INFO_FILE = "pretrain_info.json"


@dataclass
class PretrainConfig:
    """Everything that decides the pretrained weights (plus where they go)."""

    out: str = field(default="alignprop_core/data/toy_world", metadata={"help": "output folder"})
    seed: int = field(default=0, metadata={"help": "seed of every random draw (data, init, noise)"})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads (results depend on it)"})
    stages: tuple[str, ...] = field(default=STAGES, metadata={"help": "stages to run, in order; a "
                                    "later stage loads what earlier ones wrote into --out"})
    dataset_size: int = field(default=16000, metadata={"help": "captioned images drawn for training"})
    vae_steps: int = field(default=1000, metadata={"help": "VAE optimiser steps"})
    vae_batch_size: int = field(default=32, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=2e-3, metadata={"help": "VAE AdamW learning rate"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the VAE's KL term"})
    classifier_steps: int = field(default=900, metadata={"help": "classifier optimiser steps"})
    classifier_batch_size: int = field(default=64, metadata={"help": "classifier batch size"})
    classifier_lr: float = field(default=2e-3, metadata={"help": "classifier AdamW learning rate"})
    classifier_crowded: float = field(default=0.5, metadata={"help": "share of each classifier batch "
                                      "drawn with shapes that may touch or overlap, labelled with the "
                                      "number of separate blobs (as a person would count them)"})
    unet_steps: int = field(default=1600, metadata={"help": "UNet + text encoder optimiser steps"})
    unet_batch_size: int = field(default=32, metadata={"help": "UNet batch size"})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet + text encoder peak learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up, then cosine decay to 10%"})
    cond_dropout: float = field(default=0.1, metadata={"help": "share of empty captions (for CFG)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the saved UNet/text weights"})
    check_images: int = field(default=2000, metadata={"help": "fresh drawings that measure the VAE "
                              "and the classifier"})
    eval_samples: int = field(default=96, metadata={"help": "images sampled to measure count accuracy"})
    eval_sampler_steps: int = field(default=20, metadata={"help": "DDIM steps of the evaluation"})
    eval_guidance: float = field(default=4.0, metadata={"help": "CFG scale of the evaluation"})
    log_every: int = field(default=50, metadata={"help": "print the loss every N steps"})
    save_every: int = field(default=500, metadata={"help": "write the EMA model every N UNet steps"})

    def __post_init__(self) -> None:
        self.stages = tuple(self.stages)
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; use some of {', '.join(STAGES)}.")


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _dataset(cfg: PretrainConfig, arch: ToyArchitecture) -> tuple[torch.Tensor, list]:
    """The training images as uint8 (N, 3, H, W) and their scenes (seed = cfg.seed)."""
    images, scenes = generate(cfg.dataset_size, cfg.seed, arch.image_size)
    return (images * 255).round().to(torch.uint8), scenes


def crowded_dataset(n: int, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose shapes may touch or overlap (gap drawn in [-4, 2] px), uint8, with labels
    (count - 1, colour, shape, background) where count is the number of separate blobs
    (`counting.count_shapes`): merged shapes count as one, as they look. The diffusion model's
    mistakes are mostly such merges; a classifier that never saw one reads a merged pair by its
    area and rewards it as two."""
    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scene(gen, size, gap=_gap(gen)) for _ in range(n)]
    images = torch.stack([render(s, size) for s in scenes])
    blobs = count_shapes(images).clamp(1, MAX_COUNT)
    labels = torch.tensor([s.labels for s in scenes], dtype=torch.long)
    labels[:, 0] = blobs - 1
    return (images * 255).round().to(torch.uint8), labels


def _gap(gen: torch.Generator) -> float:
    return -4.0 + 6.0 * float(torch.rand((), generator=gen, dtype=torch.float64))


def _to_float(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 255


def train_vae(cfg: PretrainConfig, arch: ToyArchitecture, images: torch.Tensor):
    """AutoencoderKL on the shapes: L1 + MSE reconstruction plus a small KL; sets scaling_factor."""
    torch.manual_seed(cfg.seed + 1)
    vae = build_vae(arch)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, 50)
        idx = torch.randint(len(images), (cfg.vae_batch_size,), generator=gen)
        x = _to_float(images[idx]) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss_rec = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        loss = loss_rec + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            _log(f"vae step {step} rec {loss_rec.item():.4f} kl {post.kl().mean().item():.1f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(_to_float(images[i:i + 512]) * 2 - 1).latent_dist.mean
                           for i in range(0, min(len(images), 4096), 512)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return vae


def _reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)


def _labels(scenes: list) -> torch.Tensor:
    return torch.tensor([s.labels for s in scenes], dtype=torch.long)


def train_classifier(cfg: PretrainConfig, images: torch.Tensor, labels: torch.Tensor, vae,
                     crowded: tuple[torch.Tensor, torch.Tensor] | None = None) -> ShapeClassifier:
    """The four-head classifier; a `cfg.classifier_crowded` share of each batch comes from
    `crowded` (images, labels: see `crowded_dataset`), half of each batch is passed through the VAE
    and every image gets random pixel noise, so it reads decoded samples as well as clean drawings."""
    torch.manual_seed(cfg.seed + 3)
    model = ShapeClassifier()
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.classifier_lr, weight_decay=1e-4)
    for step in range(cfg.classifier_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.classifier_lr * _lr_factor(step, cfg.classifier_steps, 50)
        n_crowded = round(cfg.classifier_batch_size * cfg.classifier_crowded) if crowded else 0
        idx = torch.randint(len(images), (cfg.classifier_batch_size - n_crowded,), generator=gen)
        x, y = _to_float(images[idx]), labels[idx]
        if n_crowded:
            idx = torch.randint(len(crowded[0]), (n_crowded,), generator=gen)
            x, y = torch.cat([_to_float(crowded[0][idx]), x]), torch.cat([crowded[1][idx], y])
        half = cfg.classifier_batch_size // 2
        x = torch.cat([_reconstruct(vae, x[:half]), x[half:]])
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        sigma = 0.08 * torch.rand(len(x), 1, 1, 1, generator=gen)
        x = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[h], y[:, j]) for j, h in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.classifier_steps - 1:
            _log(f"classifier step {step} loss {loss.item():.4f}")
    model.requires_grad_(False)
    return model.eval()


class _Ema:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.n = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        for s, p in zip(self.shadow, [p for m in modules for p in m.parameters()]):
            p.copy_(s)


def train_unet(cfg: PretrainConfig, arch: ToyArchitecture, images: torch.Tensor, captions: list[str],
               vae, on_save: Callable[[T2IModel], None]) -> T2IModel:
    """Text encoder + UNet with the SD objective (epsilon prediction, DDPM noise) on VAE latents."""
    tokenizer = build_tokenizer()
    torch.manual_seed(cfg.seed + 5)
    text_encoder, unet = build_text_encoder(arch, tokenizer), build_unet(arch)
    gen = torch.Generator().manual_seed(cfg.seed + 6)
    with torch.no_grad():
        posts = [vae.encode(_to_float(images[i:i + 512]) * 2 - 1).latent_dist
                 for i in range(0, len(images), 512)]
        mean = torch.cat([p.mean for p in posts])
        std = torch.cat([p.std for p in posts])
    scale = float(vae.config.scaling_factor)
    tok = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    ids, empty = tok(captions), tok([""])[0]
    from diffusers import DDPMScheduler

    alpha_bar = DDPMScheduler.from_config(SCHEDULER_CONFIG).alphas_cumprod.float()
    nets = [text_encoder, unet]
    params = [p for m in nets for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    ema = _Ema(nets, cfg.ema_decay)

    def ema_model() -> T2IModel:
        te, un = build_text_encoder(arch, tokenizer), build_unet(arch)
        ema.copy_to([te, un])
        for net in (te, un):
            net.eval().requires_grad_(False)
        return T2IModel(tokenizer, te, un, vae, dict(SCHEDULER_CONFIG))

    for net in nets:
        net.train()
    started = time.perf_counter()
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _lr_factor(step, cfg.unet_steps, cfg.warmup_steps)
        idx = torch.randint(len(images), (cfg.unet_batch_size,), generator=gen)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        drop = torch.rand(len(idx), generator=gen) < cfg.cond_dropout
        batch_ids = torch.where(drop.view(-1, 1), empty.view(1, -1), ids[idx])
        t = torch.randint(len(alpha_bar), (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        x_t = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        pred = unet(x_t, t, encoder_hidden_states=text_encoder(batch_ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            rate = (step + 1) / (time.perf_counter() - started)
            _log(f"unet step {step} loss {loss.item():.4f} ({rate:.2f} steps/s)")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.unet_steps:
            on_save(ema_model())
    return ema_model()


@torch.no_grad()
def sample_count_accuracy(model: T2IModel, classifier: ShapeClassifier, n: int, steps: int,
                          guidance: float, seed: int, batch_size: int = 16) -> dict[str, float]:
    """Classifier accuracy (count, colour, shape, background) on images the model draws for random
    captions of the grammar, with the project's own DDIM sampler."""
    from alignprop_core.config import SamplerConfig
    from alignprop_core.models.backend import diffusers_backend
    from alignprop_core.sampling.sampler import sample_images

    from .shapes import random_scene

    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scene(gen, count=1 + i % MAX_COUNT) for i in range(n)]
    backend = diffusers_backend(model)
    sampler = SamplerConfig(steps=steps, guidance_scale=guidance)
    labels = _labels(scenes)
    images = []
    for i in range(0, n, batch_size):
        chunk = [s.caption for s in scenes[i:i + batch_size]]
        x_T = torch.randn(backend.latent_shape(len(chunk), 32, 32), generator=gen)
        images.append(sample_images(backend, chunk, sampler, x_T))
    return accuracy(classifier, torch.cat(images), labels)


def run(cfg: PretrainConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the configured stages; returns (and writes) the info dict."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = ToyArchitecture()
    info_path = out / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    command = " ".join(["python -m alignprop_core.toy.pretrain", *(argv or [])])
    info.setdefault("commands", []).append(command)  # every invocation that wrote into this folder
    info.update({"command": command,
                 "seed": cfg.seed, "config": asdict(cfg), "architecture": asdict(arch),
                 "machine": {"platform": platform.platform(), "processor": platform.processor(),
                             "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
                             "threads": cfg.threads, "python": sys.version.split()[0]}})
    seconds = info.setdefault("seconds", {})
    metrics = info.setdefault("metrics", {})

    def stage_done(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        info_path.write_text(json.dumps(info, indent=1))
        _log(f"stage {name} done in {seconds[name]} s")

    t0 = time.perf_counter()
    images, scenes = _dataset(cfg, arch)
    labels, captions = _labels(scenes), [s.caption for s in scenes]
    seconds["data"] = round(time.perf_counter() - t0, 1)
    _log(f"{len(images)} images drawn in {seconds['data']} s")
    vae = classifier = model = None
    if "vae" in cfg.stages:
        t0 = time.perf_counter()
        vae = train_vae(cfg, arch, images)
        vae.save_pretrained(out / "vae", safe_serialization=True)
        with torch.no_grad():
            held, _ = generate(cfg.check_images, cfg.seed + 100, arch.image_size)
            metrics["vae_reconstruction_mae"] = round(float((_reconstruct(vae, held) - held).abs().mean()), 5)
        stage_done("vae", t0)
    if vae is None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False)
    if "classifier" in cfg.stages:
        t0 = time.perf_counter()
        crowded = (crowded_dataset(cfg.dataset_size // 2, cfg.seed + 5, arch.image_size)
                   if cfg.classifier_crowded > 0 else None)
        classifier = train_classifier(cfg, images, labels, vae, crowded)
        fresh, fresh_scenes = generate(cfg.check_images, cfg.seed + 101, arch.image_size)
        fresh_labels = _labels(fresh_scenes)
        metrics["classifier_accuracy_fresh"] = accuracy(classifier, fresh, fresh_labels)
        touching, touching_labels = crowded_dataset(cfg.check_images, cfg.seed + 102, arch.image_size)
        metrics["classifier_accuracy_touching"] = accuracy(classifier, _to_float(touching), touching_labels)
        metrics["classifier_accuracy_vae"] = accuracy(classifier, _reconstruct(vae, fresh), fresh_labels)
        save_classifier(classifier, out / WEIGHTS_FILE, {"seed": cfg.seed, **metrics})
        _log(f"classifier accuracy {metrics['classifier_accuracy_fresh']}")
        stage_done("classifier", t0)
    if "unet" in cfg.stages:
        t0 = time.perf_counter()
        model = train_unet(cfg, arch, images, captions, vae, lambda m: save_t2i_model(m, out))
        save_t2i_model(model, out)
        stage_done("unet", t0)
    if "evaluate" in cfg.stages:
        t0 = time.perf_counter()
        model = model or load_t2i_model(out)
        classifier = classifier or load_classifier(out / WEIGHTS_FILE)
        acc = sample_count_accuracy(model, classifier, cfg.eval_samples, cfg.eval_sampler_steps,
                                    cfg.eval_guidance, cfg.seed + 200)
        metrics["sample_accuracy"] = {**acc, "samples": cfg.eval_samples,
                                      "ddim_steps": cfg.eval_sampler_steps, "cfg": cfg.eval_guidance}
        _log(f"samples: classifier accuracy {acc}")
        stage_done("evaluate", t0)
    info["total_seconds"] = round(sum(v for k, v in seconds.items()), 1)
    info_path.write_text(json.dumps(info, indent=1))
    return info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m alignprop_core.toy.pretrain",
                                     description=__doc__.splitlines()[0])
    defaults = PretrainConfig()
    for f in fields(PretrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, tuple):
            parser.add_argument(flag, dest=f.name, nargs="+", default=list(default), help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=default,
                                help=f"{f.metadata['help']} (default: {default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = PretrainConfig(**vars(args))
    info = run(cfg, argv)
    print(json.dumps(info["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
