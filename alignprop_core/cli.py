"""Command line: `alignprop train ...` on a local diffusers model, and `alignprop demo`.

Every field of SamplerConfig, LoraConfig and TrainConfig is a flag (`--sampler-steps`, `--lora-rank`,
`--lr`, ...), generated from the dataclasses so the CLI, the nodes and the docs cannot drift apart.
A run writes the LoRA (.safetensors), metrics.csv / metrics.json, reward_curve.png and
before_after.png into --out. `demo` trains on the shipped toy world (a shapes model pretrained by
`alignprop_core.toy.pretrain`) toward the toy_count reward: draw as many shapes as the prompt asks.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import LoraConfig, SamplerConfig, TrainConfig
from .prompts import read_prompts, shipped_prompts
from .rewards import REWARDS, make_reward

# (flag prefix, dataclass): TrainConfig fields have no prefix
CONFIGS: tuple[tuple[str, type], ...] = (("sampler-", SamplerConfig), ("lora-", LoraConfig), ("", TrainConfig))


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
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=dest, nargs="+", default=list(default), help=help_text)
        else:
            kw = {"choices": sorted(REWARDS)} if f.name == "reward" else {}
            group.add_argument(flag, dest=dest, type=type(default), default=default, help=help_text, **kw)


def _configs_from_args(args: argparse.Namespace) -> tuple[SamplerConfig, LoraConfig, TrainConfig]:
    built = []
    for prefix, cls in CONFIGS:
        p = prefix.replace("-", "_")
        built.append(cls(**{f.name: getattr(args, p + f.name) for f in fields(cls)}))
    return tuple(built)  # type: ignore[return-value]


def parse_reward_args(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs of the reward factory -> kwargs (a value that is not JSON stays a string)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"reward argument {pair!r} is not key=value; write e.g. target=[1,0,0].")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


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
                        eval_every=25, eval_latents=4, eval_batch_size=18))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignprop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, defaults in (("train", (SamplerConfig(), LoraConfig(), TrainConfig())),
                           ("demo", demo_preset())):
        p = sub.add_parser(name, help="fine-tune a LoRA with AlignProp" if name == "train" else
                           "run AlignProp on the embedded tiny model (no download)")
        if name == "train":
            p.add_argument("--model", required=True, type=Path,
                           help="local diffusers-format model folder (model_index.json, unet/, vae/, ...)")
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
        p.add_argument("--lora-name", default="alignprop_lora.safetensors", help="LoRA file name in --out")
        p.add_argument("--resume", type=Path, default=None, help="train_state.pt to resume from")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--threads", type=int, default=1 if name == "demo" else 0,
                       help="torch CPU threads (0 = torch's default); small models run fastest on one "
                            f"(default: {1 if name == 'demo' else 0})")
        for prefix, cls in CONFIGS:
            _add_config_flags(p, prefix, cls, defaults[[c for _, c in CONFIGS].index(cls)])
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Execute a parsed `train` or `demo` command; returns a summary dict (also printed)."""
    from .reporting import run_and_report  # torch-heavy imports only once the arguments are valid

    sampler, lora, train = _configs_from_args(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    demo = args.command == "demo"
    prompts = read_prompts(args.prompts) if args.prompts else shipped_prompts("toy_train")
    eval_prompts = (read_prompts(args.eval_prompts) if args.eval_prompts
                    else shipped_prompts("toy_eval" if demo else "animals_eval"))
    reward_fn = make_reward(train.reward, **parse_reward_args(args.reward_arg))
    if args.model is None:
        from .toy import toy_model_dir

        args.model = toy_model_dir()
    if not args.model.is_dir():
        raise FileNotFoundError(f"--model {args.model} does not exist; give a local diffusers-format "
                                "model folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                                "scheduler/).")
    return run_and_report(args.model, reward_fn, prompts, eval_prompts, sampler, lora, train,
                          out_dir=args.out, lora_name=args.lora_name, resume_from=args.resume,
                          device=torch.device(args.device))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"alignprop: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({**summary, "seconds": round(time.perf_counter() - started, 1)}, indent=1))
    print(_headline(args.reward, summary), file=sys.stderr)
    return 0


def _headline(reward: str, summary: dict[str, Any]) -> str:
    """One human line: the held-out reward (and the reward's own report) before -> after."""
    start, end = summary.get("held_out_reward_start"), summary.get("held_out_reward_end")
    if start is None or end is None:
        return "alignprop: no held-out evaluation was run."
    line = f"held-out {reward}: {start:.3f} -> {end:.3f}"
    before, after = summary.get("held_out_report_start", {}), summary.get("held_out_report_end", {})
    for key in before:
        line += f"; {key.replace('_', ' ')} {before[key]:.2f} -> {after[key]:.2f}"
    return line


if __name__ == "__main__":
    sys.exit(main())
