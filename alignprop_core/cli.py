"""Command line: `alignprop train ...` on a local diffusers model, and `alignprop demo`.

Every field of SamplerConfig, LoraConfig and TrainConfig is a flag (`--sampler-steps`, `--lora-rank`,
`--lr`, ...), generated from the dataclasses so the CLI, the nodes and the docs cannot drift apart.
A run writes the LoRA (.safetensors), metrics.csv / metrics.json, reward_curve.png and
before_after.png into --out.
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
DEMO_MODEL_DIR = Path(".cache") / "alignprop" / "tiny-model"


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


def _reward_kwargs(pairs: Sequence[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--reward-arg {pair!r} is not key=value; write e.g. target=[1,0,0].")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def demo_preset() -> tuple[SamplerConfig, LoraConfig, TrainConfig]:
    """Settings of the embedded demo: the tiny model, a weight-free reward, CPU-friendly sizes."""
    return (SamplerConfig(steps=10, guidance_scale=4.0, truncation="uniform", k_min=1, k_max=3),
            LoraConfig(rank=8, alpha=8.0),
            TrainConfig(reward="smoothness", steps=40, batch_size=4, lr=1e-2, width=32, height=32,
                        eval_every=5, eval_batch_size=8))


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
            p.add_argument("--model", type=Path, default=DEMO_MODEL_DIR,
                           help="where the embedded tiny model is built (once) and loaded from")
            p.add_argument("--prompts", type=Path, default=None, help="default: shipped animal list")
        p.add_argument("--eval-prompts", type=Path, default=None,
                       help="held-out prompts (default: the shipped held-out animal list)")
        p.add_argument("--reward-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument of the reward factory (JSON value), repeatable")
        p.add_argument("--out", type=Path, default=Path("outputs") / name, help="output folder")
        p.add_argument("--lora-name", default="alignprop_lora.safetensors", help="LoRA file name in --out")
        p.add_argument("--resume", type=Path, default=None, help="train_state.pt to resume from")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        for prefix, cls in CONFIGS:
            _add_config_flags(p, prefix, cls, defaults[[c for _, c in CONFIGS].index(cls)])
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Execute a parsed `train` or `demo` command; returns a summary dict (also printed)."""
    from .reporting import run_and_report  # torch-heavy imports only once the arguments are valid

    sampler, lora, train = _configs_from_args(args)
    prompts = read_prompts(args.prompts) if args.prompts else shipped_prompts("animals")
    eval_prompts = read_prompts(args.eval_prompts) if args.eval_prompts else shipped_prompts("animals_eval")
    reward_fn = make_reward(train.reward, **_reward_kwargs(args.reward_arg))
    if args.command == "demo":
        from .tiny_model import ensure_tiny_model_dir

        ensure_tiny_model_dir(args.model, vocab_words=sorted({w for p in prompts + eval_prompts
                                                             for w in p.split()}))
    elif not args.model.is_dir():
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
