"""The bad-input catalogue: every refused input of the CLI and the nodes, as one table of plain rows.

Each row names a surface (``cli`` or a node id), the input (a flag or a node input), the bad value in
words, how to give it (extra CLI arguments, or the inputs of that node in an otherwise good graph)
and fragments of the error text. Two tests run the rows (tests/test_cli.py for the CLI,
tests/comfyui/test_failure_catalogue.py on a real ComfyUI server for the nodes); `render_markdown`
writes the same rows as docs/failure_behaviour.md, and tests/test_failure_catalogue_doc.py keeps
the document equal to it.

In CLI arguments, ``{files}`` stands for the folder of prepared bad files (see test_cli.py's `files`
fixture). A node row's inputs replace those of its node in the test's graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "failure_behaviour.md"
NAN = math.nan


@dataclass(frozen=True)
class BadInput:
    """One refused input and what the refusal says."""

    id: str  # unique, used as the test id
    surface: str  # "cli", or the node id (e.g. "AlignProp_Trainer")
    input: str  # the flag or node input that is wrong
    bad: str  # the bad value, in words, for the document
    given: Any  # CLI: extra arguments (tuple of str); node: {input: value} for that node
    expect: tuple[str, ...]  # substrings of the error text
    names: str = ""  # how the message names the input when not by its name (e.g. the file given)
    # refused by ComfyUI's own range check when the prompt is queued, before the node runs
    comfy_validation: bool = False

    @property
    def named_by(self) -> str:
        return self.names or self.input


def _cli(id_: str, flag: str, bad: str, args: tuple[str, ...], *expect: str, names: str = "") -> BadInput:
    return BadInput(id_, "cli", flag, bad, tuple(args), tuple(expect), names)


def _node(surface: str, id_: str, name: str, bad: str, inputs: dict[str, Any], *expect: str,
          names: str = "", comfy_validation: bool = False) -> BadInput:
    return BadInput(id_, surface, name, bad, dict(inputs), tuple(expect), names, comfy_validation)


def _resume(id_: str, file: str, bad: str, *expect: str) -> BadInput:
    return _cli(id_, "--resume", bad, ("--resume", f"{{files}}/{file}"), file, *expect, names=file)


CLI_ROWS: list[BadInput] = [
    # training state to resume from: read with weights_only=True, named by its path
    _resume("resume-hostile-pickle", "hostile.pt", "a pickle that would run code", "cannot be read safely",
            "GLOBAL"),
    _resume("resume-hostile-raw-pickle", "hostile_raw.pt", "a raw pickle (no zip container)",
            "cannot be read safely"),
    _resume("resume-legacy-format", "legacy.pt", "a legacy-format torch file holding code",
            "cannot be read safely"),
    _resume("resume-empty", "empty.pt", "an empty file", "is empty"),
    _resume("resume-truncated", "truncated.pt", "a truncated file", "cannot be read safely"),
    _resume("resume-random-bytes", "random.pt", "random bytes", "cannot be read safely"),
    _resume("resume-not-a-state", "tensor.pt", "a torch file holding a tensor", "not an AlignProp training state"),
    _resume("resume-missing", "missing.pt", "a file that does not exist", "does not exist"),
    _resume("resume-folder", "a_folder", "a folder", "is a folder"),
    # rewards and their arguments
    _cli("reward-arg-unknown-keyword", "--reward-arg", "colour=[1,0,0] (not an argument)",
         ("--reward-arg", "colour=[1,0,0]"), "--reward-arg colour", "color_target", "takes target"),
    _cli("reward-arg-not-key-value", "--reward-arg", "target (no =)", ("--reward-arg", "target"),
         "--reward-arg 'target'", "KEY=VALUE"),
    _cli("reward-arg-wrong-value", "--reward-arg", "target=[1,2] (two numbers)", ("--reward-arg", "target=[1,2]"),
         "--reward color_target", "three numbers", names="--reward color_target"),
    _cli("reward-arg-wrong-type", "--reward-arg", "temperature=[1] for toy_count",
         ("--reward", "toy_count", "--reward-arg", "temperature=[1]"), "--reward toy_count", "--reward-arg", "type"),
    _cli("aesthetic-without-weights", "--reward", "aesthetic without head_path", ("--reward", "aesthetic"),
         "--reward aesthetic", "head_path"),
    _cli("aesthetic-missing-head", "--reward-arg", "head_path of a missing file",
         ("--reward", "aesthetic", "--reward-arg", "head_path={files}/head.pth", "--reward-arg",
          "clip_checkpoint={files}/clip.bin"), "head.pth", "sac+logos+ava1-l14-linearMSE.pth", names="head.pth"),
    _cli("aesthetic-hostile-head", "--reward-arg", "head_path of a pickle that would run code",
         ("--reward", "aesthetic", "--reward-arg", "head_path={files}/hostile.pt", "--reward-arg",
          "clip_checkpoint={files}/whole.pt"), "hostile.pt", "can be read safely", names="hostile.pt"),
    _cli("reward-unknown", "--reward", "aesthetics_v9", ("--reward", "aesthetics_v9"),
         "--reward", "invalid choice", "aesthetics_v9"),
    _cli("mixture-unknown-part", "--reward-arg", "spec=bogus:1 for mixture",
         ("--reward", "mixture", "--reward-arg", "spec=bogus:1"), "--reward mixture", "bogus",
         names="--reward mixture"),
    # guards against reward hacking
    _cli("reward-not-differentiable", "--reward", "toy_blobs (weight-free, a judge only)", ("--reward", "toy_blobs"),
         "toy_blobs is not differentiable", "--judges", names="toy_blobs"),
    _cli("best-by-unknown", "--best-by", "a name that is no judge", ("--best-by", "nonsense"),
         "--best-by='nonsense' is not a held-out number of this run", "reward, diversity"),
    _cli("best-by-diversity-one-latent", "--best-by", "diversity with --eval-latents 1",
         ("--best-by", "diversity", "--eval-latents", "1"), "--best-by='diversity' needs at least two images",
         "--eval-latents >= 2"),
    _cli("kl-weight-negative", "--kl-weight", "-1", ("--kl-weight", "-1"), "--kl-weight must be >= 0"),
    _cli("memory-budget-negative", "--memory-budget", "-3", ("--memory-budget", "-3"),
         "argument --memory-budget: the value must be >= 0"),
    _cli("memory-budget-word", "--memory-budget", "a word", ("--memory-budget", "lots"),
         "argument --memory-budget: the value 'lots' is not a number", "auto or off"),
    _cli("dist-backend-unknown", "--dist-backend", "mpi", ("--dist-backend", "mpi"),
         "--dist-backend='mpi' is not known", "auto, gloo, nccl"),
    _cli("dist-timeout-zero", "--dist-timeout-s", "0", ("--dist-timeout-s", "0"),
         "--dist-timeout-s must be a positive number of seconds"),
    # device
    _cli("device-bogus", "--device", "bogus", ("--device", "bogus"), "--device 'bogus'", "cpu, cuda"),
    _cli("device-meta", "--device", "meta", ("--device", "meta"), "--device 'meta'"),
    _cli("device-cuda-index", "--device", "cuda:99", ("--device", "cuda:99"), "--device cuda:99"),
    _cli("fp16-on-cpu", "--mixed-precision", "fp16 with --device cpu", ("--device", "cpu", "--mixed-precision", "fp16"),
         "--mixed-precision fp16", "bf16"),
    # model and prompt files
    _cli("model-is-a-file", "--model", "a .safetensors file", ("--model", "{files}/model.safetensors"),
         "--model", "model.safetensors", "is a file, not a folder", "diffusers-format"),
    _cli("model-missing", "--model", "a folder that does not exist", ("--model", "{files}/nope"),
         "--model", "nope does not exist"),
    _cli("model-not-diffusers", "--model", "a folder without model_index.json", ("--model", "{files}/not_a_model"),
         "--model", "not_a_model", "model_index.json"),
    _cli("model-unsupported-pipeline", "--model", "a folder of another diffusers pipeline (KandinskyPipeline)",
         ("--model", "{files}/kandinsky"), "--model", "kandinsky", "is a KandinskyPipeline folder",
         "StableDiffusion3Pipeline (SD3/SD3.5)"),
    _cli("prompts-is-a-folder", "--prompts", "a folder", ("--prompts", "{files}/a_folder"),
         "--prompts file", "a_folder is a folder"),
    _cli("prompts-not-utf8", "--prompts", "a Latin-1 text file", ("--prompts", "{files}/latin1.txt"),
         "--prompts file", "latin1.txt is not UTF-8 text", "save it as UTF-8"),
    _cli("prompts-empty", "--prompts", "a file of comments only", ("--prompts", "{files}/no_prompts.txt"),
         "--prompts file", "no_prompts.txt", "holds no prompts"),
    _cli("prompts-missing", "--prompts", "a file that does not exist", ("--prompts", "{files}/nope.txt"),
         "--prompts file", "nope.txt", "does not exist"),
    _cli("eval-prompts-not-utf8", "--eval-prompts", "a Latin-1 text file", ("--eval-prompts", "{files}/latin1.txt"),
         "--eval-prompts file", "latin1.txt"),
    # output names
    _cli("lora-name-bin", "--lora-name", "x.bin", ("--lora-name", "x.bin"), "--lora-name", "x.bin", "x.safetensors"),
    _cli("lora-name-with-folder", "--lora-name", "sub/x", ("--lora-name", "sub/x"), "--lora-name 'sub/x'",
         "path separator"),
    _cli("lora-name-parent", "--lora-name", "../x", ("--lora-name", "../x"), "--lora-name '../x'", "path separator"),
    _cli("lora-name-empty", "--lora-name", "a blank", ("--lora-name", " "), "--lora-name", "empty"),
    _cli("lora-name-tab", "--lora-name", "a name with a tab", ("--lora-name", "a\tb"), "--lora-name 'a\\tb'",
         "control character"),
    _cli("lora-name-too-long", "--lora-name", "300 characters", ("--lora-name", "x" * 300), "--lora-name",
         "300 bytes long", "shorten it"),
    _cli("out-is-a-file", "--out", "a file", ("--out", "{files}/out_is_a_file"), "--out", "out_is_a_file",
         "is a file"),
    _cli("out-holds-the-lora", "--out", "a folder holding the LoRA already", ("--out", "{files}/existing"),
         "(--out/--lora-name)", "alignprop_lora.safetensors already exists", "--overwrite"),
    _cli("resume-into-existing-lora", "--out", "a finished LoRA's folder, with --resume",
         ("--out", "{files}/existing", "--resume", "{files}/train_state.pt"),
         "(--out/--lora-name)", "alignprop_lora.safetensors already exists", "--overwrite"),
    # numbers: finite, in range, of the right kind
    _cli("max-grad-norm-nan", "--max-grad-norm", "nan", ("--max-grad-norm", "nan"), "--max-grad-norm", "finite", "nan"),
    _cli("lr-inf", "--lr", "inf", ("--lr", "inf"), "--lr", "finite"),
    _cli("sampler-eta-nan", "--sampler-eta", "nan", ("--sampler-eta", "nan"), "--sampler-eta", "finite"),
    _cli("sampler-k-std-nan", "--sampler-k-std", "nan", ("--sampler-k-std", "nan"), "--sampler-k-std", "finite"),
    _cli("lora-alpha-nan", "--lora-alpha", "nan", ("--lora-alpha", "nan"), "--lora-alpha", "finite"),
    _cli("reward-target-minus-inf", "--reward-target", "-inf", ("--reward-target=-inf",), "--reward-target",
         "finite"),
    _cli("lr-zero", "--lr", "0", ("--lr", "0"), "--lr must be > 0"),
    _cli("lora-rank-zero", "--lora-rank", "0", ("--lora-rank", "0"), "--lora-rank must be > 0"),
    _cli("lora-alpha-zero", "--lora-alpha", "0", ("--lora-alpha", "0"), "--lora-alpha must be > 0"),
    _cli("batch-size-zero", "--batch-size", "0", ("--batch-size", "0"), "--batch-size must be > 0"),
    _cli("grad-accum-zero", "--grad-accum", "0", ("--grad-accum", "0"), "--grad-accum must be > 0"),
    _cli("eval-batch-size-zero", "--eval-batch-size", "0", ("--eval-batch-size", "0"),
         "--eval-batch-size must be > 0"),
    _cli("eval-latents-zero", "--eval-latents", "0", ("--eval-latents", "0"), "--eval-latents must be > 0"),
    _cli("sampler-steps-zero", "--sampler-steps", "0", ("--sampler-steps", "0"), "--sampler-steps must be > 0"),
    _cli("weight-decay-negative", "--weight-decay", "-1", ("--weight-decay", "-1"), "--weight-decay must be >= 0"),
    _cli("eval-every-negative", "--eval-every", "-1", ("--eval-every", "-1"), "--eval-every must be >= 0"),
    _cli("save-every-negative", "--save-every", "-2", ("--save-every", "-2"), "--save-every must be >= 0"),
    _cli("lr-warmup-negative", "--lr-warmup-steps", "-1", ("--lr-warmup-steps", "-1"),
         "--lr-warmup-steps must be >= 0"),
    _cli("adam-beta1-one", "--adam-beta1", "1.0", ("--adam-beta1", "1.0"), "--adam-beta1", "must lie in [0, 1)"),
    _cli("threads-negative", "--threads", "-1", ("--threads", "-1"), "--threads must be >= 0"),
    _cli("threads-not-int", "--threads", "1.5", ("--threads", "1.5"), "--threads", "invalid int value: '1.5'"),
    _cli("steps-not-int", "--steps", "ten", ("--steps", "ten"), "--steps", "'ten'"),
    _cli("seed-not-int", "--seed", "x", ("--seed", "x"), "--seed", "invalid int value: 'x'"),
    # sampler window
    _cli("sampler-k-outside", "--sampler-k", "9 with 3 steps", ("--sampler-k", "9"),
         "--sampler-k=9 is outside [1, steps=3]"),
    _cli("sampler-k-min-above-max", "--sampler-k-min", "3 above --sampler-k-max 2",
         ("--sampler-truncation", "uniform", "--sampler-k-min", "3", "--sampler-k-max", "2"),
         "--sampler-k-min=3, k_max=2", "k_min <= k_max"),
    _cli("sampler-k-mean-outside", "--sampler-k-mean", "9 with 3 steps",
         ("--sampler-truncation", "gaussian", "--sampler-k-mean", "9"), "--sampler-k-mean=9.0 is outside"),
    _cli("guidance-below-one", "--sampler-guidance-scale", "0.5", ("--sampler-guidance-scale", "0.5"),
         "--sampler-guidance-scale=0.5 is below 1"),
    # choices
    _cli("truncation-unknown", "--sampler-truncation", "random", ("--sampler-truncation", "random"),
         "--sampler-truncation='random' is not known"),
    _cli("loss-unknown", "--loss", "bogus", ("--loss", "bogus"), "--loss='bogus' is not known", "maximize, target"),
    _cli("mixed-precision-unknown", "--mixed-precision", "fp8", ("--mixed-precision", "fp8"),
         "--mixed-precision='fp8' is not known"),
    _cli("lr-schedule-unknown", "--lr-schedule", "bogus", ("--lr-schedule", "bogus"),
         "--lr-schedule='bogus' is not known"),
    _cli("reward-augment-unknown", "--reward-augment", "bogus", ("--reward-augment", "bogus"),
         "--reward-augment='bogus' is not known"),
    _cli("dihedral-not-square", "--reward-augment", "dihedral on 32x16 images",
         ("--reward-augment", "dihedral", "--width", "32"), "--reward-augment='dihedral'", "square images"),
    # image size against the model's VAE
    _cli("width-odd-on-vae2", "--width", "15", ("--width", "15"), "--width 15", "multiples of the VAE factor 2"),
    _cli("height-odd-on-vae2", "--height", "15", ("--height", "15"), "--height 15", "multiples of the VAE factor 2"),
    _cli("width-30-on-vae8", "--width", "30 on a model whose VAE factor is 8",
         ("--model", "{files}/vae8", "--width", "30"), "--width 30", "VAE factor 8", "vae8"),
    _cli("width-18-on-flux", "--width", "18 on a FLUX.1 model (VAE factor 2, 2x2 patches)",
         ("--model", "{files}/flux_configs", "--width", "18"), "--width 18",
         "multiples of 4 (the VAE factor 2 times the patch size 2)", "flux_configs"),
    # sampler settings against the model
    _cli("distilled-guidance-without-input", "--sampler-distilled-guidance",
         "3.5 on a model without a guidance input (SD1.x)", ("--sampler-distilled-guidance", "3.5"),
         "distilled_guidance=3.5", "has no guidance input", "guidance_scale with use_cfg",
         names="distilled_guidance=3.5"),
    _cli("eta-on-flux", "--sampler-eta", "0.5 on a FLUX.1 (rectified-flow) model",
         ("--model", "{files}/flux_configs", "--sampler-eta", "0.5"), "eta=0.5", "rectified-flow model", "set eta to 0",
         names="eta=0.5"),
    _cli("lv-samples-0", "--sampler-lv-samples", "0", ("--sampler-estimator", "draft_lv", "--sampler-lv-samples", "0"),
         "--sampler-lv-samples=0", "must be >= 1"),
    _cli("draft-lv-with-k-3", "--sampler-estimator", "draft_lv with --sampler-k 3",
         ("--sampler-estimator", "draft_lv", "--sampler-k", "3"), "--sampler-estimator='draft_lv'",
         "--sampler-k=3 asks for more", "set --sampler-truncation='fixed' and --sampler-k=1"),
    _cli("vae-tile-overlap-half", "--sampler-vae-tile-overlap", "32 with --sampler-vae-tile 64",
         ("--sampler-vae-tile", "64", "--sampler-vae-tile-overlap", "32"), "--sampler-vae-tile-overlap=32",
         "below half of --sampler-vae-tile=64"),
    _cli("vae-tile-odd-on-vae2", "--sampler-vae-tile", "9 on a model whose VAE factor is 2",
         ("--sampler-vae-tile", "9", "--sampler-vae-tile-overlap", "2"), "vae_tile=9",
         "multiples of the VAE factor 2", names="vae_tile=9"),
]

TRAINER = "AlignProp_Trainer"
OPTIMIZER, EVALUATION = "AlignProp_OptimizerSettings", "AlignProp_EvaluationSettings"
OBJECTIVE, LORA_SETTINGS = "AlignProp_ObjectiveSettings", "AlignProp_LoraSettings"
SAMPLER = "AlignProp_SamplerSettings"
PREVIEW = "AlignProp_PreviewSampler"
SAVE, MIX, APPLY, LOAD = "AlignProp_SaveLora", "AlignProp_MixLoras", "AlignProp_ApplyLora", "AlignProp_LoadLora"
COMPRESSIBILITY, SIMPLE, MIXER = ("AlignProp_CompressibilityReward", "AlignProp_SimpleReward",
                                  "AlignProp_RewardMixer")


def _trainer(id_: str, name: str, bad: str, inputs: dict[str, Any], *expect: str, **kw: Any) -> BadInput:
    return _node(TRAINER, id_, name, bad, inputs, *expect, **kw)


def _lora_name(id_: str, value: str, bad: str, *expect: str, names: str = "lora_name") -> BadInput:
    return _trainer(id_, "lora_name", bad, {"lora_name": value}, *expect, names=names)


NODE_ROWS: list[BadInput] = [
    # the AlignProp Trainer: names, prompts, numbers and dropdowns, before the model is touched
    _lora_name("trainer-lora-name-parent", "../x", "../x",
               "lora_name '../x.safetensors' must be relative to the loras folder"),
    _lora_name("trainer-lora-name-absolute", "/abs", "/abs",
               "lora_name '/abs.safetensors' must be relative to the loras folder"),
    _lora_name("trainer-lora-name-folder", "dir/", "dir/ (a folder)", "lora_name 'dir/' names a folder"),
    _lora_name("trainer-lora-name-newline", "a\nb", "a name with a newline",
               "lora_name 'a\\nb' contains the control character(s) '\\n'"),
    _lora_name("trainer-lora-name-tab", "a\tb", "a name with a tab",
               "lora_name 'a\\tb' contains the control character(s) '\\t'"),
    _lora_name("trainer-lora-name-too-long", "x" * 300, "300 characters", "lora_name: the part",
               "is 300 bytes long"),
    _lora_name("trainer-lora-name-bin", "x.bin", "x.bin", "lora_name 'x.bin' ends in .bin", "x.safetensors"),
    _trainer("trainer-prompts-empty", "prompts", "empty", {"prompts": ""}, "the prompts input holds no prompts"),
    _trainer("trainer-memory-budget-word", "memory_budget", "a word", {"memory_budget": "lots"},
             "memory_budget 'lots' is not a number", "auto or off"),
    _trainer("trainer-memory-budget-negative", "memory_budget", "-2", {"memory_budget": "-2"},
             "memory_budget must be >= 0"),
    _trainer("trainer-prompts-comments", "prompts", "comments only", {"prompts": "# a comment\n\n"},
             "the prompts input holds no prompts"),
    _trainer("trainer-eval-prompts-comments", "eval_prompts", "comments only", {"eval_prompts": "# none\n"},
             "eval_prompts holds no prompts"),
    _trainer("trainer-width-60", "width", "60 (not a multiple of 8)", {"width": 60},
             "width=60 and height=64 must be multiples of the VAE factor 8"),
    _trainer("trainer-lr-nan", "lr", "NaN", {"lr": NAN}, "lr must be a finite number, got nan"),
    _trainer("trainer-prompt-file-missing", "prompt_file", "missing.txt (not a listed file)",
             {"prompt_file": "missing.txt"}, "prompt_file='missing.txt' is not one of its options"),
    _trainer("trainer-resume-nothing-stopped", "resume", "on, with no stopped run of that name",
             {"resume": True, "lora_name": "catalogue_never_trained"},
             "resume is on but no run of lora_name 'catalogue_never_trained' was stopped early"),
    # the trainer's settings nodes
    _node(OPTIMIZER, "optimizer-max-grad-norm-nan", "max_grad_norm", "NaN", {"max_grad_norm": NAN},
          "max_grad_norm must be a finite number"),
    _node(OPTIMIZER, "optimizer-mixed-precision-bogus", "mixed_precision", "fp8", {"mixed_precision": "fp8"},
          "mixed_precision='fp8' is not one of its options"),
    _node(OPTIMIZER, "optimizer-lr-schedule-bogus", "lr_schedule", "bogus", {"lr_schedule": "bogus"},
          "lr_schedule='bogus' is not one of its options"),
    _node(EVALUATION, "evaluation-eval-latents-zero", "eval_latents", "0", {"eval_latents": 0},
          "Value 0 smaller than min of 1: eval_latents", comfy_validation=True),
    _node(OBJECTIVE, "objective-kl-weight-negative", "kl_weight", "-1", {"kl_weight": -1.0},
          "Value -1.0 smaller than min of 0.0: kl_weight", comfy_validation=True),
    _node(OBJECTIVE, "objective-reward-target-nan", "reward_target", "NaN", {"reward_target": NAN},
          "reward_target must be a finite number"),
    _node(OBJECTIVE, "objective-loss-bogus", "loss", "bogus", {"loss": "bogus"},
          "loss='bogus' is not one of its options"),
    _node(OBJECTIVE, "objective-reward-augment-bogus", "reward_augment", "bogus", {"reward_augment": "bogus"},
          "reward_augment='bogus' is not one of its options"),
    _node(LORA_SETTINGS, "lora-settings-alpha-nan", "alpha", "NaN", {"alpha": NAN}, "alpha must be a finite number"),
    _node(LORA_SETTINGS, "lora-settings-rank-zero", "rank", "0", {"rank": 0}, "Value 0 smaller than min of 1: rank",
          comfy_validation=True),
    # sampler nodes
    _node(SAMPLER, "settings-eta-nan", "eta", "NaN", {"eta": NAN}, "eta must be a finite number"),
    _node(SAMPLER, "settings-truncation-bogus", "truncation", "bogus", {"truncation": "bogus"},
          "truncation='bogus' is not known"),
    _node(SAMPLER, "settings-k-above-steps", "k", "5 with 3 steps", {"k": 5, "steps": 3},
          "k=5 is outside [1, steps=3]"),
    _node(SAMPLER, "settings-guidance-below-one", "guidance_scale", "0.5 with CFG on", {"guidance_scale": 0.5},
          "guidance_scale=0.5 is below 1"),
    _node(SAMPLER, "settings-lv-samples-zero", "lv_samples", "0 with estimator draft_lv",
          {"estimator": "draft_lv", "lv_samples": 0}, "Value 0 smaller than min of 1: lv_samples", comfy_validation=True),
    _node(SAMPLER, "settings-draft-lv-k-2", "estimator", "draft_lv with k=2", {"estimator": "draft_lv", "k": 2},
          "estimator='draft_lv' backpropagates through the last step"),
    _node(PREVIEW, "preview-prompt-empty", "prompt", "empty", {"prompt": ""}, "the prompt is empty"),
    _node(PREVIEW, "preview-width-60", "width", "60 (not a multiple of 8)", {"width": 60},
          "width=60 and height=64 must be multiples of the VAE factor 8"),
    # reward nodes
    _node(COMPRESSIBILITY, "compressibility-direction-typo", "direction", "compressable",
          {"direction": "compressable"}, "direction='compressable' is not one of its options"),
    _node(SIMPLE, "simple-kind-bogus", "kind", "bogus", {"kind": "bogus"}, "kind='bogus' is not one of its options"),
    _node(SIMPLE, "simple-red-nan", "red", "NaN", {"red": NAN}, "red must be a finite number"),
    _node(MIXER, "mixer-weight-nan", "weight_2", "NaN", {"weight_2": NAN}, "weight_2 must be a finite number"),
    # LoRA nodes
    _node(SAVE, "save-dtype-fp64", "dtype", "fp64", {"dtype": "fp64"}, "dtype='fp64' is not one of its options"),
    _node(SAVE, "save-lora-name-ckpt", "lora_name", "x.ckpt", {"lora_name": "x.ckpt"},
          "lora_name 'x.ckpt' ends in .ckpt"),
    _node(SAVE, "save-lora-name-parent", "lora_name", "../x", {"lora_name": "../x"},
          "lora_name '../x.safetensors' must be relative to the loras folder"),
    _node(SAVE, "save-key-format-diffusers-sd15", "key_format", "diffusers for an SD1.5 LoRA",
          {"key_format": "diffusers"}, "the diffusers key format applies to SD3 and FLUX.1 LoRAs",
          names="diffusers key format"),
    _node(MIX, "mix-mode-blend", "mode", "blend", {"mode": "blend"}, "mode='blend' is not one of its options"),
    _node(MIX, "mix-t-nan", "t", "NaN", {"t": NAN}, "t must be a finite number"),
    _node(APPLY, "apply-strength-nan", "strength", "NaN", {"strength": NAN}, "strength must be a finite number"),
    _node(LOAD, "load-lora-name-missing", "lora_name", "missing.safetensors (not in models/loras)",
          {"lora_name": "missing.safetensors"}, "lora_name='missing.safetensors' is not one of its options"),
    _node(LOAD, "load-lora-name-none", "lora_name", "(none), and nothing on lora_model", {"lora_name": "(none)"},
          "lora_name is (none) and nothing is connected to lora_model", "choose a file in lora_name"),
]

ROWS: list[BadInput] = CLI_ROWS + NODE_ROWS

INTRO = """\
# Failure behaviour

AlignProp checks what you give it before it loads a model or writes a file. A bad input fails in
about a second with one message that names the input (or the file) and says what to do; nothing is
written, and a ComfyUI server that ran the node keeps serving the next prompt. On the command line
the message is one line, `alignprop: error: ...`, with exit code 2 (`--debug` adds the traceback).

Every row below is a test case (tests/failure_catalogue.py): the CLI rows run in tests/test_cli.py,
the node rows on a real ComfyUI server in tests/comfyui/test_failure_catalogue.py. The message
column quotes parts of the real message ("…" marks a gap). In CLI rows, `{files}` is a folder of
prepared bad files. This page is generated by `render_markdown()` in tests/failure_catalogue.py;
a test fails if it differs.

During training, a step whose reward is NaN/Inf is skipped with a warning and the LoRA is left as it
was; five such steps in a row end the run with an error that says so (the LoRA so far is kept as
`<name>-partial`, as after any failure). Out of device memory names what ran out and what to lower; a
lost rank of a data-parallel run stops the others ([scaling.md](scaling.md#a-rank-that-fails)).
"""

TITLES = {"cli": "Command line (`alignprop train`)", TRAINER: "AlignProp Trainer",
          OPTIMIZER: "AlignProp Optimizer Settings", EVALUATION: "AlignProp Evaluation Settings",
          OBJECTIVE: "AlignProp Objective Settings", LORA_SETTINGS: "AlignProp LoRA Settings",
          SAMPLER: "AlignProp Sampler Settings", PREVIEW: "AlignProp Preview Sampler",
          COMPRESSIBILITY: "AlignProp JPEG Compressibility Reward", SIMPLE: "AlignProp Weight-free Reward",
          MIXER: "AlignProp Reward Mixer", SAVE: "AlignProp Save LoRA", MIX: "AlignProp Mix LoRAs",
          APPLY: "AlignProp Apply LoRA", LOAD: "Load AlignProp LoRA"}


def _cell(text: str) -> str:
    """Text for a markdown table cell: visible control characters, escaped pipes, no line breaks."""
    return text.replace("\n", "\\n").replace("\t", "\\t").replace("|", "\\|")


def _short(text: str) -> str:
    """A long value shows as its start (a 300-character name)."""
    return text if len(text) <= 60 else text[:24] + "…"


def _code(text: str) -> str:
    text = _cell(text)
    fence = "``" if "`" in text else "`"
    return f"{fence}{text}{fence}"


def _arg(arg: str) -> str:
    """A CLI argument as typed in a shell: quoted when blank or holding spaces."""
    arg = _short(arg)
    return f"'{arg}'" if not arg.strip() or " " in arg else arg


def _given(row: BadInput) -> str:
    if row.surface == "cli":
        return _code(" ".join(_arg(a) for a in row.given))
    return ", ".join(_code(f"{k}={_short(_value(v))}") for k, v in row.given.items())


def _value(value: Any) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return repr(value) if isinstance(value, str) else str(value)


def _message(row: BadInput) -> str:
    shown = " … ".join(_cell(e) for e in row.expect)
    if row.comfy_validation:
        shown += " (ComfyUI's own range check, when the prompt is queued)"
    return shown


def surfaces() -> list[str]:
    """The surfaces in the order of the table."""
    return list(dict.fromkeys(row.surface for row in ROWS))


def render_markdown() -> str:
    """docs/failure_behaviour.md: the intro, then one table per surface (input | bad value | message)."""
    parts = [INTRO]
    for surface in surfaces():
        rows = [row for row in ROWS if row.surface == surface]
        parts.append(f"\n## {TITLES.get(surface, surface)}\n\n")
        parts.append("| input | bad value | given as | message |\n|---|---|---|---|\n")
        for row in rows:
            parts.append(f"| {_code(row.input)} | {_cell(row.bad)} | {_given(row)} | {_message(row)} |\n")
    parts.append(f"\n{len(ROWS)} cases: {len(CLI_ROWS)} on the command line, {len(NODE_ROWS)} on the nodes.\n")
    return "".join(parts)


if __name__ == "__main__":  # python tests/failure_catalogue.py: rewrite the document
    DOC_PATH.write_text(render_markdown(), encoding="utf-8")
    print(f"wrote {DOC_PATH} ({len(ROWS)} cases)")
