"""Typed, validated configuration: one dataclass per concept (sampler, LoRA, training).

The CLI (`alignprop_core.cli`) and the ComfyUI nodes map their inputs one to one onto these
fields, so a setting means the same thing everywhere. Every field carries its meaning and unit in
``metadata["help"]``; ``__post_init__`` rejects bad values with a sentence naming the field and the fix.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, fields, asdict
from typing import Any

TRUNCATION_STRATEGIES = ("fixed", "uniform", "gaussian")
ESTIMATORS = ("truncated", "draft_lv")
LOSS_SHAPES = ("maximize", "target")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
MAX_SEED = 2 ** 63 - 1  # seeds go to torch.Generator.manual_seed
REWARD_AUGMENTS = ("none", "hflip", "dihedral")  # alignprop_core.training.augment holds what each one does


def _help(text: str, **kw: Any) -> Any:
    """A dataclass field whose help text is kept for the CLI and the node tooltips."""
    return field(metadata={"help": text}, **kw)


def check_finite(value: Any, name: str) -> Any:
    """`value` unchanged if it is a finite real number, else a ValueError naming `name`.

    Range checks alone let NaN through (every comparison with NaN is False), so numeric inputs
    pass here first; node code reuses it for inputs that are not config fields.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__}); "
                         "give a plain number.")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}; give a finite number.")
    return value


def _check_types(obj: Any) -> None:
    """Every field holds a value of its declared kind; numbers are finite, integers whole."""
    for f in fields(obj):
        name, value = f"{type(obj).__name__}.{f.name}", getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind == "float":
            check_finite(value, name)
        elif kind == "int":
            check_finite(value, name)
            if not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); "
                                 "give a whole number.")
            if f.name.endswith("seed") and not 0 <= value <= MAX_SEED:
                raise ValueError(f"{name} must lie in [0, 2**63 - 1] (what torch's generators take), "
                                 f"got {value}.")
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r} ({type(value).__name__}).")
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{name} must be text, got {value!r} ({type(value).__name__}).")


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be > 0, got {value!r}; "
                             f"give a positive {name}.")


def _non_negative(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 0:
            raise ValueError(f"{type(obj).__name__}.{name} must be >= 0, got {value!r}.")


def _one_of(obj: Any, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ValueError(f"{type(obj).__name__}.{name}={value!r} is not known; "
                         f"use one of {', '.join(allowed)}.")


@dataclass
class SamplerConfig:
    """How images are sampled during training (the differentiable DDIM chain)."""

    steps: int = _help("number of DDIM denoising steps T", default=20)
    eta: float = _help("DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like ancestral noise", default=0.0)
    guidance_scale: float = _help("classifier-free guidance scale w (1 = conditional only)", default=7.5)
    use_cfg: bool = _help("run the unconditional branch and apply classifier-free guidance", default=True)
    truncation: str = _help("truncated backprop: fixed | uniform | gaussian (K drawn once per batch)",
                            default="fixed")
    k: int = _help("fixed: the last K steps carry gradient", default=1)
    k_min: int = _help("uniform: smallest K drawn", default=1)
    k_max: int = _help("uniform: largest K drawn (inclusive)", default=1)
    k_mean: float = _help("gaussian: mean of K", default=1.0)
    k_std: float = _help("gaussian: standard deviation of K (K is rounded and clipped to [1, steps])",
                         default=0.0)
    checkpoint_unet: bool = _help("gradient-checkpoint every denoising step in the gradient window",
                                  default=True)
    checkpoint_vae: bool = _help("gradient-checkpoint the VAE decode (each tile's with vae_tile)", default=True)
    estimator: str = _help("gradient estimator: truncated (AlignProp: backprop through the last K "
                           "steps) | draft_lv (DRaFT-LV: K = 1 plus lv_samples re-noised copies of the "
                           "last step, rewards averaged)", default="truncated")
    lv_samples: int = _help("draft_lv: re-noised copies n of the last step (n + 1 reward queries "
                            "per image)", default=2)
    distilled_guidance: float = _help("guidance fed to a guidance-distilled model as an input "
                                      "(FLUX.1-dev; 0 = the model's default, 3.5); models without "
                                      "that input refuse any other value", default=0.0)
    # after the fields above: a settings node shows its later (optional) inputs in this order
    vae_tile: int = _help("decode in square tiles of this many image pixels a side, blended where they "
                          "overlap, so the VAE decoder's activations fit one tile (a multiple of the VAE "
                          "factor, e.g. 512; images differ slightly near the seams); 0 = decode whole",
                          default=0)
    vae_tile_overlap: int = _help("least overlap of neighbouring VAE tiles in image pixels (a multiple of "
                                  "the VAE factor, below half of vae_tile)", default=64)

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "steps")
        _non_negative(self, "eta", "k_std", "distilled_guidance", "vae_tile", "vae_tile_overlap")
        if self.vae_tile and not 2 * self.vae_tile_overlap < self.vae_tile:
            raise ValueError(f"SamplerConfig.vae_tile_overlap={self.vae_tile_overlap} must be below half of "
                             f"SamplerConfig.vae_tile={self.vae_tile}: every tile keeps a middle part of its "
                             "own; lower the overlap or raise the tile size.")
        _one_of(self, "truncation", TRUNCATION_STRATEGIES)
        _one_of(self, "estimator", ESTIMATORS)
        if self.lv_samples < 1:
            raise ValueError(f"SamplerConfig.lv_samples={self.lv_samples} must be >= 1: DRaFT-LV "
                             "re-noises the last step n >= 1 times (2 is the paper's choice).")
        if self.estimator == "draft_lv" and (self.truncation != "fixed" or self.k != 1):
            raise ValueError(f"SamplerConfig.estimator='draft_lv' backpropagates through the last step "
                             f"only, but SamplerConfig.truncation={self.truncation!r} with "
                             f"SamplerConfig.k={self.k} asks for more; set SamplerConfig.truncation='fixed' "
                             "and SamplerConfig.k=1, or SamplerConfig.estimator='truncated'.")
        if self.use_cfg and self.guidance_scale < 1:
            raise ValueError(f"SamplerConfig.guidance_scale={self.guidance_scale} is below 1 with "
                             "classifier-free guidance on; use guidance_scale >= 1 or set use_cfg=False.")
        if self.truncation == "fixed" and not 1 <= self.k <= self.steps:
            raise ValueError(f"SamplerConfig.k={self.k} is outside [1, steps={self.steps}]; "
                             "K counts the last denoising steps that carry gradient.")
        if self.truncation == "uniform":
            if not 1 <= self.k_min <= self.k_max <= self.steps:
                raise ValueError(f"SamplerConfig.k_min={self.k_min}, k_max={self.k_max} must satisfy "
                                 f"1 <= k_min <= k_max <= steps={self.steps}.")
        if self.truncation == "gaussian" and not 1 <= self.k_mean <= self.steps:
            raise ValueError(f"SamplerConfig.k_mean={self.k_mean} is outside [1, steps={self.steps}].")


@dataclass
class LoraConfig:
    """The LoRA adapter trained on the denoiser (peft under the hood)."""

    rank: int = _help("LoRA rank r (inner dimension of the low-rank update)", default=4)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / rank", default=4.0)
    target_modules: tuple[str, ...] = _help(
        "module-name suffixes (diffusers names) that receive LoRA: the attention projections by "
        "default; also ff.net.0.proj, ff.net.2, proj_in, proj_out, and the res blocks' conv1, conv2, "
        "time_emb_proj, conv_shortcut",
        default=("to_q", "to_k", "to_v", "to_out.0"))
    init_seed: int = _help("seed for the LoRA initialisation (same seed, same initial LoRA)", default=0)

    def __post_init__(self) -> None:
        _check_types(self)
        modules = self.target_modules
        if isinstance(modules, str) or not isinstance(modules, (list, tuple)) or not all(
                isinstance(m, str) for m in modules):
            raise ValueError(f"LoraConfig.target_modules must be a sequence of module names, got "
                             f"{self.target_modules!r}; give e.g. ('to_q', 'to_k', 'to_v', 'to_out.0').")
        self.target_modules = tuple(self.target_modules)
        if any(not m.strip() for m in self.target_modules):
            raise ValueError(f"LoraConfig.target_modules {list(self.target_modules)!r} holds a blank name; "
                             "give module names such as to_q, to_k, to_v, to_out.0.")
        _positive(self, "rank", "alpha")
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty; name at least one module, "
                             "e.g. to_q, to_k, to_v, to_out.0.")


@dataclass
class TrainConfig:
    """The AlignProp optimisation loop."""

    reward: str = _help("the reward to maximise as a one-line spec: a name (see alignprop_core.rewards."
                        "REWARDS) or name[key=value; ...] with its arguments (rewards.spec.RewardSpec)",
                        default="color_target")
    loss: str = _help("maximize: loss = -reward; target: loss = |reward_target - reward|",
                      default="maximize")
    reward_target: float = _help("target value for loss=target (the paper uses 10 for aesthetics)",
                                 default=10.0)
    reward_augment: str = _help("none | hflip | dihedral: score each training image through a random "
                                "mirror (hflip) or mirror and quarter turn (dihedral, square images), so "
                                "the LoRA learns what the reward means, not the reward network's pixel "
                                "grid; only for rewards that ignore orientation (counts, compressibility; "
                                "hflip for aesthetics), never for layout or text. Evaluation is not "
                                "transformed", default="none")
    steps: int = _help("number of optimiser steps", default=20)
    batch_size: int = _help("images sampled per micro-batch", default=2)
    grad_accum: int = _help("micro-batches accumulated per optimiser step", default=1)
    lr: float = _help("AdamW learning rate", default=1e-3)
    lr_schedule: str = _help("after warm-up: constant | linear (to 0 at the last step) | cosine (to 0)",
                             default="constant")
    lr_warmup_steps: int = _help("optimiser steps over which the learning rate rises linearly from "
                                 "lr/warmup to lr (0 = no warm-up)", default=0)
    weight_decay: float = _help("AdamW weight decay", default=1e-4)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_eps: float = _help("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _help("clip the LoRA gradient to this global norm (0 = no clipping)",
                                 default=1.0)
    width: int = _help("image width in pixels (multiple of the VAE factor)", default=64)
    height: int = _help("image height in pixels (multiple of the VAE factor)", default=64)
    negative_prompt: str = _help("prompt of the unconditional CFG branch", default="")
    mixed_precision: str = _help("no | fp16 | bf16 autocast (CUDA); LoRA weights stay fp32",
                                 default="no")
    seed: int = _help("seed of every random draw in training (prompts, noise, K)", default=0)
    eval_every: int = _help("evaluate on held-out prompts every N steps (0 = only start and end)",
                            default=5)
    eval_seed: int = _help("seed of the fixed evaluation latents", default=1234)
    eval_latents: int = _help("images per held-out prompt, each from its own fixed latent: the held-out "
                              "reward is the mean over prompts x eval_latents images (more = a less noisy "
                              "curve, at more evaluation time)", default=1)
    eval_batch_size: int = _help("images per evaluation forward pass", default=4)
    save_every: int = _help("save the LoRA and the training state every N steps (0 = only at end)",
                            default=0)
    kl_weight: float = _help("pull toward the base model: weight of the mean squared difference between "
                             "the LoRA model's and the base model's denoiser outputs at the same x_t on "
                             "the gradient-window steps (adapters off for the base pass, one more "
                             "denoiser pass per window step; proportional to the per-step KL of the "
                             "two Gaussian transition kernels for eta > 0); 0 = off", default=0.0)
    lora_l2_weight: float = _help("weight of an L2 penalty on the LoRA's weight change: the sum over "
                                  "layers of ||(alpha / rank) B A||^2 (squared Frobenius norm); 0 = off",
                                  default=0.0)
    judges: tuple[str, ...] = _help("rewards that score the held-out images beside the training reward "
                                    "and are never trained on, as reward specs (e.g. toy_blobs, "
                                    "clip_score[...]); with eval_latents >= 2 the held-out images' "
                                    "diversity per prompt is measured too", default=())
    best_by: str = _help("the held-out number that picks the best LoRA and drives early stopping: "
                         "reward (the training reward), diversity, or a judge's name", default="reward")
    keep_best: bool = _help("save the LoRA of the best evaluation (by best_by) beside the final one as "
                            "<name>-best.safetensors", default=True)
    early_stop_evals: int = _help("stop training once best_by has stayed below its best for this many "
                                  "evaluations in a row (0 = never stop early)", default=0)
    offload_reward: bool = _help("keep the reward's and the judges' networks on the CPU except while they "
                                 "score: moved to the device for each scoring pass and back once its "
                                 "backward is done, freeing their memory for the denoiser's gradient window "
                                 "at the cost of copying their weights twice per pass (same scores)",
                                 default=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _one_of(self, "loss", LOSS_SHAPES)
        _one_of(self, "mixed_precision", MIXED_PRECISION)
        _one_of(self, "lr_schedule", LR_SCHEDULES)
        _one_of(self, "reward_augment", REWARD_AUGMENTS)
        if self.reward_augment == "dihedral" and self.width != self.height:
            raise ValueError(f"TrainConfig.reward_augment='dihedral' turns images by quarter turns, which "
                             f"needs square images, not {self.width}x{self.height}; use 'hflip' or "
                             "width == height.")
        _positive(self, "steps", "batch_size", "grad_accum", "lr", "width", "height",
                  "eval_latents", "eval_batch_size")
        _non_negative(self, "weight_decay", "max_grad_norm", "eval_every", "save_every",
                      "lr_warmup_steps")
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            raise ValueError("TrainConfig.adam_beta1 and adam_beta2 must lie in [0, 1).")
        _non_negative(self, "kl_weight", "lora_l2_weight", "early_stop_evals")
        judges = self.judges
        if isinstance(judges, str) or not isinstance(judges, (list, tuple)) or not all(
                isinstance(j, str) and j.strip() for j in judges):
            raise ValueError(f"TrainConfig.judges must be a sequence of reward specs, got {judges!r}; give "
                             "e.g. ('toy_blobs',) or () for none.")
        self.judges = tuple(judges)
        names = judge_names(self.judges)
        if self.best_by not in ("reward", "diversity", *names):
            raise ValueError(f"TrainConfig.best_by={self.best_by!r} is not a held-out number of this run; use "
                             f"one of {', '.join(('reward', 'diversity', *names))}.")
        if self.best_by == "diversity" and self.eval_latents < 2:
            raise ValueError("TrainConfig.best_by='diversity' needs at least two images per held-out prompt; "
                             "set TrainConfig.eval_latents >= 2.")


@dataclass
class MemoryConfig:
    """The memory planner (`alignprop_core.planning`): a budget for the run's peak memory, from which
    the batch split and checkpointing are chosen before training."""

    budget_gb: float = _help("peak memory the run may use on its device, in GB (2^30 bytes); the planner "
                             "probes one small step and picks the fastest settings that fit (0 = off)",
                             default=0.0)
    auto: bool = _help("budget = what the device can give now: its free memory plus what the run holds",
                       default=False)

    def __post_init__(self) -> None:
        _check_types(self)
        _non_negative(self, "budget_gb")
        if self.auto and self.budget_gb:
            raise ValueError(f"MemoryConfig.budget_gb={self.budget_gb} and MemoryConfig.auto=True were both "
                             "given; give a number of GB or auto, not both.")

    @property
    def enabled(self) -> bool:
        """The planner runs: a budget was given or auto asked for."""
        return self.auto or self.budget_gb > 0

    @classmethod
    def parse(cls, text: str, name: str = "memory_budget") -> "MemoryConfig":
        """`off` (or empty), `auto`, or a number of GB, as the CLI flag and the trainer node take it."""
        word = str(text).strip().lower()
        if word in ("", "off", "0"):
            return cls()
        if word == "auto":
            return cls(auto=True)
        try:
            gb = float(word)
        except ValueError:
            raise ValueError(f"{name} {text!r} is not a number; give a number of GB (e.g. 12), auto or "
                             "off.") from None
        try:
            return cls(budget_gb=gb)
        except ValueError as err:
            raise ValueError(str(err).replace("MemoryConfig.budget_gb", name)) from None


def judge_names(judges: tuple[str, ...] | list[str]) -> list[str]:
    """The name each judge's numbers go under: its reward name, with #2, #3 ... for repeats."""
    names: list[str] = []
    for text in judges:
        name = text.split("[", 1)[0].split(":", 1)[0].strip()
        names.append(name if name not in names else f"{name}#{sum(n.split('#')[0] == name for n in names) + 1}")
    return names


def with_input_names(err: ValueError, names: dict[str, str]) -> ValueError:
    """`err` with each ``Config.field`` it names replaced by the input a user typed (a CLI flag, a
    node input), from ``names``; unknown ones stay as they are."""
    message = re.sub(r"\b(?:SamplerConfig|LoraConfig|TrainConfig|MemoryConfig)\.\w+",
                     lambda m: names.get(m.group(0), m.group(0)), str(err))
    return ValueError(message)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    out = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
