"""Command line: `alignprop train ...` on a local diffusers model, and `alignprop demo`.

Every field of SamplerConfig, LoraConfig and TrainConfig is a flag (`--sampler-steps`, `--lora-rank`,
`--lr`, ...), generated from the dataclasses so the CLI, the nodes and the docs cannot drift apart.
A run writes the LoRA (.safetensors), the LoRA of its best evaluation (<name>-best.safetensors, by
--best-by; --no-keep-best skips it), metrics.csv / metrics.json, reward_curve.png and before_after.png
into --out. --judges adds rewards that only score the held-out images (e.g. toy_blobs, the toy world's
weight-free blob count), so a hacked training reward shows against them. `demo` trains on the shipped
toy world (a shapes model pretrained by `alignprop_core.toy.pretrain`) toward the toy_count reward:
draw as many shapes as the prompt asks.

Every error is one line, ``alignprop: error: ...`` on stderr, exit code 2 (``--debug`` adds the
traceback). Files, the device, the reward and its arguments and the output names are checked before
any model is loaded, so a typo fails in a second, not after loading or training.

Started by `torchrun --nproc-per-node N` or `accelerate launch --num_processes N`, every rank runs
the same command and trains on its share of each batch (`parallel`): --batch-size is per rank, so the
global batch is N x --batch-size x --grad-accum; rank 0 alone writes and reports.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import traceback
import dataclasses
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import LoraConfig, MemoryConfig, SamplerConfig, TrainConfig, to_dict, with_input_names
from .files.outputs import check_writable, claim, lora_file_name
from .files.prompts import read_prompts, shipped_prompts
from .models.loading import model_folder_info
from .parallel.world import DistConfig, init_world, launched_ranks, rank_device, single_process
from .sampling.chain import check_flow_eta
from .sampling.sampler import check_model_takes, check_vae_tiles
from .rewards import REWARDS, build_reward
from .rewards.spec import RewardSpec, parse_value
from .training.best import best_lora_name
from .training.train_state import check_resumable, load_train_state

# (flag prefix, dataclass): TrainConfig fields have no prefix
CONFIGS: tuple[tuple[str, type], ...] = (("sampler-", SamplerConfig), ("lora-", LoraConfig), ("", TrainConfig))
MODEL_HINT = ("give a local diffusers-format model folder: SD1.x (model_index.json, unet/, vae/, text_encoder/, "
              "tokenizer/, scheduler/), SD3/SD3.5 or FLUX.1 (model_index.json, transformer/, vae/, "
              "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/, and the T5 in "
              "text_encoder_3/ for SD3 or text_encoder_2/ for FLUX); single-file checkpoints (.safetensors, "
              ".ckpt) are not supported")
# errors whose message is written for users; any other exception also shows its type
USER_ERRORS = (ValueError, OSError, ImportError)


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error format (argparse prints the usage block otherwise)."""

    def error(self, message: str):
        self.exit(2, f"alignprop: error: {message} (see {self.prog} --help)\n")


def _finite_float(text: str) -> float:
    """argparse type of the float flags: NaN and infinity would poison a run silently."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_config_flags(parser: argparse.ArgumentParser, prefix: str, cls: type,
                      defaults: Any) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        dest = prefix.replace("-", "_") + f.name
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
        elif f.name == "judges":  # reward specs, as --reward takes them; a bare --judges means none
            group.add_argument(flag, dest=dest, nargs="*", type=_reward_text, default=list(default),
                               metavar="SPEC", help=help_text)
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=dest, nargs="+", default=list(default), help=help_text)
        else:
            kind = _finite_float if isinstance(default, float) else type(default)
            if f.name == "reward":
                kind, help_text = _reward_text, (f"reward name ({', '.join(sorted(REWARDS))}) or a whole "
                                                 f"reward spec 'name[key=value; ...]' as a LoRA's "
                                                 f"alignprop.reward names it (default: {default})")
            group.add_argument(flag, dest=dest, type=kind, default=default, help=help_text)


def _configs_from_args(args: argparse.Namespace) -> tuple[SamplerConfig, LoraConfig, TrainConfig]:
    built = []
    for prefix, cls in CONFIGS:
        p = prefix.replace("-", "_")
        try:
            built.append(cls(**{f.name: getattr(args, p + f.name) for f in fields(cls)}))
        except ValueError as err:
            # the configs name their fields ("TrainConfig.lr"); here the user typed a flag ("--lr")
            flag = {f"{c.__name__}.{f.name}": "--" + pre + f.name.replace("_", "-")
                    for pre, c in CONFIGS for f in fields(c)}
            raise with_input_names(err, flag) from err
    return tuple(built)  # type: ignore[return-value]


def _reward_text(text: str) -> str:
    """argparse type of --reward: a registry name or a one-line reward spec, read as a RewardSpec."""
    try:
        spec = RewardSpec.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if spec.name not in REWARDS:
        raise argparse.ArgumentTypeError(f"invalid choice: {spec.name!r} (choose from "
                                         f"{', '.join(sorted(REWARDS))})")
    return spec.text()


def _memory_budget(text: str) -> MemoryConfig:
    """argparse type of --memory-budget: a number of GB, auto or off."""
    try:
        return MemoryConfig.parse(text, "the value")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def parse_reward_args(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs of the reward factory -> kwargs, each value read by the reward spec's reader
    (JSON: 3, 0.5, [1,0,0], true; anything else stays a string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--reward-arg {pair!r} is not KEY=VALUE; write e.g. --reward-arg "
                             "target=[1,0,0].")
        out[key.strip()] = parse_value(value)
    return out


def reward_spec(reward: str, pairs: Sequence[str]) -> RewardSpec:
    """The run's reward as data: --reward (a name or a whole spec) with the --reward-args added."""
    spec = RewardSpec.parse(reward)
    args = {**spec.args, **parse_reward_args(pairs)}
    check_reward_args(spec.name, args)
    try:
        return RewardSpec(spec.name, args)
    except ValueError as err:
        raise ValueError(f"--reward {spec.name}: {err}") from err


def demo_preset() -> tuple[SamplerConfig, LoraConfig, TrainConfig]:
    """Settings of the embedded demo: the toy world model, its count reward, CPU-friendly sizes."""
    # K from 3 to 6 of 10 steps: the last one or two steps barely move the shapes (the count's
    # gradient is ~100x smaller with K = 1). The held-out reward is the mean over 4 latents per
    # prompt (144 images): on 36 images it moves by a few tenths with the exact draw of latents,
    # as much as training moves it, so single runs ended "below the start" that were above it
    # on a larger held-out set
    return (SamplerConfig(steps=10, guidance_scale=4.0, truncation="uniform", k_min=3, k_max=6),
            LoraConfig(rank=8, alpha=8.0),
            TrainConfig(reward="toy_count", steps=50, batch_size=4, lr=1.5e-3, width=32, height=32,
                        eval_every=25, eval_latents=4, eval_batch_size=18, judges=("toy_blobs",)))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="alignprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, defaults in (("train", (SamplerConfig(), LoraConfig(), TrainConfig())),
                           ("demo", demo_preset())):
        p = sub.add_parser(name, help="fine-tune a LoRA with AlignProp" if name == "train" else
                           "run AlignProp on the embedded tiny model (no download)")
        if name == "train":
            p.add_argument("--model", required=True, type=Path,
                           help="local diffusers-format model folder of SD1.x, SD3/SD3.5 or FLUX.1 "
                                "(model_index.json, unet/ or transformer/, vae/, ...)")
            p.add_argument("--prompts", required=True, type=Path, help="text file, one prompt per line")
        else:
            p.add_argument("--model", type=Path, default=None,
                           help="diffusers-format model folder (default: the shipped toy world model)")
            p.add_argument("--prompts", type=Path, default=None,
                           help="default: the shipped toy-world training prompts (toy_train)")
        p.add_argument("--eval-prompts", type=Path, default=None,
                       help="held-out prompts (default: the shipped held-out list, animals_eval for "
                            "train, toy_eval for demo)")
        p.add_argument("--reward-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of the reward factory (JSON value), repeatable")
        p.add_argument("--out", type=Path, default=Path("outputs") / name, help="output folder")
        p.add_argument("--lora-name", default="alignprop_lora.safetensors",
                       help="LoRA file name in --out (.safetensors is added when missing)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the LoRA file in --out if it exists (otherwise the run is refused)")
        p.add_argument("--resume", type=Path, default=None, help="train_state.pt to resume from")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cpu, cuda, cuda:N, mps or xpu (default: cuda when available, else cpu)")
        p.add_argument("--threads", type=int, default=1 if name == "demo" else 0,
                       help="torch CPU threads (0 = torch's default); small models run fastest on one "
                            f"(default: {1 if name == 'demo' else 0})")
        p.add_argument("--debug", action="store_true", help="print the Python traceback of an error")
        p.add_argument("--memory-budget", type=_memory_budget, default=MemoryConfig(), metavar="GB|auto",
                       help="plan for a peak memory budget: probe one small step, print the plan and train "
                            "with the fastest batch split and checkpointing that fit (GB of 2^30 bytes; "
                            "auto = the device's free memory; default: no planning)")
        for prefix, cls in CONFIGS:
            _add_config_flags(p, prefix, cls, defaults[[c for _, c in CONFIGS].index(cls)])
        _add_config_flags(p, "dist-", DistConfig, DistConfig())  # used when a launcher starts ranks
    return parser


def dist_config(args: argparse.Namespace) -> DistConfig:
    """The --dist-* flags as a DistConfig; errors name the flags."""
    try:
        return DistConfig(**{f.name: getattr(args, "dist_" + f.name) for f in fields(DistConfig)})
    except ValueError as err:
        raise ValueError(str(err).replace("DistConfig.backend", "--dist-backend")
                         .replace("DistConfig.timeout_s", "--dist-timeout-s")) from err


def check_device(name: str, train: TrainConfig) -> torch.device:
    """The torch device `--device name` means, if this machine has it; ValueError otherwise."""
    hint = "use cpu, cuda, cuda:N, mps or xpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name torch knows; {hint}.") from None
    if device.type == "cpu":
        if train.mixed_precision == "fp16":
            raise ValueError("--mixed-precision fp16 needs a CUDA device; use bf16 or no with --device cpu.")
        return device
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}.get(device.type)
    if backend is None:
        raise ValueError(f"--device {name!r} cannot run training; {hint}.")
    if not backend.is_available():
        raise ValueError(f"--device {name}: no {device.type} device is usable on this machine "
                         f"(torch.{device.type}.is_available() is False); use --device cpu.")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: this machine has {count} {device.type} device(s), numbered "
                         f"from 0; use {device.type}:0 to {device.type}:{count - 1}.")
    return device


def check_model_dir(path: Path, train: TrainConfig, sampler: SamplerConfig | None = None) -> None:
    """`path` is a diffusers folder of a supported pipeline (SD1.x, SD3/SD3.5, FLUX.1) and --width and
    --height are multiples of its VAE factor times its patch size; reads JSON configs only."""
    if path.is_file():
        raise NotADirectoryError(f"--model {path} is a file, not a folder; {MODEL_HINT}.")
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path} does not exist; {MODEL_HINT}.")
    for needed in ("model_index.json", "vae/config.json"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"--model {path} has no {needed}; {MODEL_HINT}.")
    try:
        info = model_folder_info(path)
    except (OSError, ValueError) as err:
        raise type(err)(f"--model {path}: {err}") from err
    multiple = info.size_multiple
    if train.width % multiple or train.height % multiple:
        what = (f"the VAE factor {multiple}" if info.patch_size == 1 else
                f"{multiple} (the VAE factor {info.vae_scale_factor} times the patch size {info.patch_size})")
        raise ValueError(f"--width {train.width} and --height {train.height} must be multiples of {what} of "
                         f"--model {path}; round them to a multiple of {multiple}.")
    if sampler is not None:
        check_model_takes(sampler, f"--model {path} ({info.pipeline_class})", info.guidance_input)
        check_vae_tiles(sampler, info.vae_scale_factor)
        if info.family != "sd15":  # the rectified-flow families
            check_flow_eta(sampler.eta)


def check_reward_args(name: str, kwargs: dict[str, Any]) -> None:
    """The `--reward-arg`s fit the reward factory's signature (checked without building it)."""
    signature = inspect.signature(REWARDS[name]).parameters.values()
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = {p.name: p.default is inspect.Parameter.empty for p in signature if p.kind not in variadic}
    takes = ", ".join(p + (" (required)" if required else "") for p, required in params.items())
    open_ended = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature)
    unknown = [] if open_ended else [key for key in kwargs if key not in params]
    missing = [p for p, required in params.items() if required and p not in kwargs]
    if unknown:
        raise ValueError(f"--reward-arg {unknown[0]} is not an argument of the {name} reward; it takes "
                         f"{takes}.")
    if missing:
        raise ValueError(f"--reward {name} needs --reward-arg {missing[0]}=... (for a weight file, its "
                         f"local path); it takes {takes}.")


def _build_reward(spec: RewardSpec):
    """build_reward, with argument errors told as errors of the command line's reward flags."""
    try:
        return build_reward(spec)
    except TypeError as err:  # e.g. a list where the factory wants a number
        raise ValueError(f"--reward {spec.name} cannot be built from --reward-arg {spec.args}: {err}; check "
                         "each value's type (JSON: 3, 0.5, [1,0,0], true; anything else is a string).") \
            from err
    except ValueError as err:
        raise ValueError(f"--reward {spec.name}: {err}") from err


def check_outputs(args: argparse.Namespace, keep_best: bool = False) -> str:
    """The LoRA file name, checked; --out made writable; an existing LoRA (and with `keep_best` an
    existing <name>-best, unless resuming the run that wrote it) refused without --overwrite."""
    name = lora_file_name(args.lora_name, "--lora-name")
    if "/" in name or "\\" in name or os.sep in name:
        raise ValueError(f"--lora-name {args.lora_name!r} contains a path separator; it is a file name "
                         "inside --out: give the folder with --out and only the name with --lora-name.")
    claim(check_writable(args.out, "--out") / name, args.overwrite, "the LoRA file (--out/--lora-name)")
    if keep_best and args.resume is None:
        claim(args.out / best_lora_name(name), args.overwrite,
              "the best LoRA file (--out/<--lora-name>-best; --no-keep-best skips it)")
    return name


def _missing_parent(folder: Path) -> Path | None:
    """The outermost folder of `folder` that does not exist yet (None if `folder` exists)."""
    missing = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_if_empty(folder: Path, outermost: Path) -> None:
    """Undo `check_writable`'s mkdir after a failed run: remove the folders it made, if still empty."""
    for candidate in (folder, *folder.parents):
        try:
            candidate.rmdir()  # fails, harmlessly, on a folder that holds anything
        except OSError:
            return
        if candidate == outermost:
            return


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    """Execute a parsed `train` or `demo` command; returns a summary dict (also printed), or None on
    a rank other than 0 of a data-parallel run (rank 0 reports)."""
    # 1. cheap checks, in the order a user reads the command line; no model is loaded yet
    sampler, lora, train = _configs_from_args(args)
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}.")
    device = rank_device(check_device(args.device, train))
    if args.memory_budget.enabled and device.type not in ("cpu", "cuda"):
        raise ValueError(f"--memory-budget measures memory on cpu and cuda devices, not {device.type}; "
                         "leave it out on this device.")
    dist = dist_config(args)
    ranks = launched_ranks()
    demo = args.command == "demo"
    prompts = read_prompts(args.prompts, "--prompts file") if args.prompts else shipped_prompts("toy_train")
    eval_prompts = (read_prompts(args.eval_prompts, "--eval-prompts file") if args.eval_prompts
                    else shipped_prompts("toy_eval" if demo else "animals_eval"))
    if args.model is None:
        from .toy import toy_model_dir

        args.model = toy_model_dir()
    check_model_dir(args.model, train, sampler)
    spec = reward_spec(train.reward, args.reward_arg)
    train = dataclasses.replace(train, reward=spec.text())
    if args.resume is not None:  # read again by the trainer; here only to fail early
        check_resumable(load_train_state(args.resume), {"sampler": to_dict(sampler), "lora": to_dict(lora),
                                                        "train": to_dict(train)}, args.resume)
    created = _missing_parent(args.out)
    try:
        lora_name = check_outputs(args, train.keep_best)
        # 2. the reward (may load a reward model), then the diffusion model and the run itself
        reward = _build_reward(spec)
        from .training.run import check_trainable

        check_trainable(reward)  # a judge-only reward (toy_blobs) is refused before the model loads
        from .reporting import run_and_report  # torch-heavy imports only once the arguments are valid

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        # every rank has passed the same checks; now they meet (a launcher started more than one)
        world = init_world(device, dist) if ranks > 1 else single_process()
        try:
            return run_and_report(args.model, reward, prompts, eval_prompts, sampler, lora, train,
                                  out_dir=args.out, lora_name=lora_name, resume_from=args.resume,
                                  device=device, overwrite=args.overwrite, memory=args.memory_budget,
                                  world=world)
        finally:
            world.close()
    except BaseException:
        if created is not None:
            _remove_if_empty(args.out, created)
        raise


def error_line(err: BaseException) -> str:
    """One line for stderr: the message of an error meant for users, else its type and message."""
    text = " ".join(str(err).split())
    if isinstance(err, USER_ERRORS) and text:
        return f"alignprop: error: {text}"
    return f"alignprop: error: {type(err).__name__}: {text or 'no message'} (run with --debug for details)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        summary = run(args)
    except KeyboardInterrupt:  # during training the trainer catches it and saves; this is before/after
        print("alignprop: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the command line never shows a traceback unasked
        if args.debug:
            traceback.print_exc()
        print(error_line(err), file=sys.stderr)
        return 2
    if summary is None:  # a rank other than 0: rank 0 reports the run
        return 0
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    print(_headline(RewardSpec.parse(summary.get("reward", args.reward)).label, summary), file=sys.stderr)
    return 0


def _headline(reward: str, summary: dict[str, Any]) -> str:
    """One human line: the held-out reward, each judge, the diversity and the reward's own report
    before -> after, and the best LoRA's step where it is not the last."""
    start, end = summary.get("held_out_reward_start"), summary.get("held_out_reward_end")
    if start is None or end is None:
        return "alignprop: no held-out evaluation was run."
    line = f"held-out {reward}: {start:.3f} -> {end:.3f}"
    judges_end = summary.get("held_out_judges_end") or {}
    for name, value in (summary.get("held_out_judges_start") or {}).items():
        if name in judges_end:
            line += f"; judge {name} {value:.2f} -> {judges_end[name]:.2f}"
    div_start, div_end = summary.get("diversity_start"), summary.get("diversity_end")
    if div_start is not None and div_end is not None:
        line += f"; diversity {div_start:.3f} -> {div_end:.3f}"
    before, after = summary.get("held_out_report_start", {}), summary.get("held_out_report_end", {})
    for key in before:
        line += f"; {key.replace('_', ' ')} {before[key]:.2f} -> {after[key]:.2f}"
    best, last = summary.get("best_step"), summary.get("steps")
    if best is not None and best != last:
        line += f"; best LoRA: step {best}" + (" (kept as -best)" if summary.get("best_lora") else "")
    if summary.get("early_stopped"):
        line += f"; stopped early at step {last}"
    return line


if __name__ == "__main__":
    sys.exit(main())
