"""Settings nodes for the AlignProp Trainer: the inputs users rarely change, grouped by concept.

ComfyUI 0.3.75 cannot mark an input as advanced, so the trainer shows only what users change and
takes the rest from these nodes through optional sockets; an unconnected socket keeps the config
defaults. Optimizer, Evaluation and Objective Settings each hold some fields of the core's
`TrainConfig` and output them as a dict of field values, which the trainer merges into its
TrainConfig (`config_inputs.merge`); LoRA Settings outputs a whole `LoraConfig`. Defaults, help
texts and checks all come from the config dataclasses.
"""
from __future__ import annotations

from comfy_api.latest import io

from alignprop_core.config import LoraConfig, TrainConfig

from .choices import check_combos
from .config_inputs import build, config_inputs, pick

CATEGORY = "AlignProp/training"
TRAIN_LIMITS = {"steps": (1, 100000, 1), "batch_size": (1, 64, 1), "grad_accum": (1, 1024, 1),
                "lr": (1e-7, 1.0, 1e-7), "width": (8, 4096, 8), "height": (8, 4096, 8),
                "eval_batch_size": (1, 64, 1), "eval_latents": (1, 64, 1), "max_grad_norm": (0.0, 1000.0, 0.01),
                "weight_decay": (0.0, 1.0, 1e-5), "adam_eps": (1e-12, 1e-3, 1e-12),
                "adam_beta1": (0.0, 0.9999, 0.001), "adam_beta2": (0.0, 0.9999, 0.0001),
                "reward_target": (-1e6, 1e6, 0.01), "seed": (0, 2 ** 63 - 1, 1),
                "eval_seed": (0, 2 ** 63 - 1, 1), "eval_every": (0, 100000, 1), "save_every": (0, 100000, 1),
                "lr_warmup_steps": (0, 100000, 1), "kl_weight": (0.0, 1e6, 0.001),
                "lora_l2_weight": (0.0, 1e6, 0.001), "early_stop_evals": (0, 100000, 1)}
LORA_LIMITS = {"rank": (1, 256, 1), "alpha": (0.01, 1024.0, 0.01)}

Optimizer = io.Custom("ALIGNPROP_OPTIMIZER")
Evaluation = io.Custom("ALIGNPROP_EVALUATION")
Objective = io.Custom("ALIGNPROP_OBJECTIVE")
LoraSettingsSocket = io.Custom("ALIGNPROP_LORA_SETTINGS")

OPTIMIZER_FIELDS = ("grad_accum", "lr_schedule", "lr_warmup_steps", "weight_decay", "adam_beta1", "adam_beta2",
                    "adam_eps", "max_grad_norm", "mixed_precision", "offload_reward")
EVALUATION_FIELDS = ("eval_every", "eval_seed", "eval_latents", "eval_batch_size", "save_every", "best_by",
                     "keep_best", "early_stop_evals")
OBJECTIVE_FIELDS = ("loss", "reward_target", "reward_augment", "negative_prompt", "kl_weight", "lora_l2_weight")
# fields added after workflows were saved: optional inputs, so those workflows still validate
LATER_FIELDS = ("best_by", "keep_best", "early_stop_evals", "kl_weight", "lora_l2_weight", "offload_reward")
# every TrainConfig field a settings node holds; the trainer shows the others (but reward, its socket)
SETTINGS_FIELDS = OPTIMIZER_FIELDS + EVALUATION_FIELDS + OBJECTIVE_FIELDS


def _schema(node_id: str, display_name: str, description: str, fields_: tuple[str, ...], socket, output: str):
    return io.Schema(node_id=node_id, display_name=display_name, category=CATEGORY, description=description,
                     inputs=config_inputs(TrainConfig, only=fields_, limits=TRAIN_LIMITS, optional=LATER_FIELDS),
                     outputs=[socket.Output(display_name=output)])


def _train_settings(node: type[io.ComfyNode], kwargs: dict, fields_: tuple[str, ...]) -> io.NodeOutput:
    check_combos(node.define_schema(), kwargs)
    # best_by may name a judge, which only the trainer knows (its judges socket): checked there
    chosen = {k: v for k, v in kwargs.items() if k != "best_by"}
    values = pick(TrainConfig, chosen, fields_)
    if "best_by" in fields_:
        values["best_by"] = str(kwargs.get("best_by", values["best_by"])).strip()
    return io.NodeOutput(values)


class OptimizerSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("AlignProp_OptimizerSettings", "AlignProp Optimizer Settings",
                       "AdamW, gradient accumulation and clipping, learning-rate schedule, mixed precision "
                       "and reward offloading for the AlignProp Trainer's optimizer socket", OPTIMIZER_FIELDS, Optimizer, "optimizer")

    @classmethod
    def execute(cls, **kwargs):
        return _train_settings(cls, kwargs, OPTIMIZER_FIELDS)


class EvaluationSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("AlignProp_EvaluationSettings", "AlignProp Evaluation Settings",
                       "how often and on how many fixed latents the held-out prompts are scored, and how "
                       "often the LoRA and training state are saved, for the AlignProp Trainer's evaluation "
                       "socket", EVALUATION_FIELDS, Evaluation, "evaluation")

    @classmethod
    def execute(cls, **kwargs):
        return _train_settings(cls, kwargs, EVALUATION_FIELDS)


class ObjectiveSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return _schema("AlignProp_ObjectiveSettings", "AlignProp Objective Settings",
                       "what the loss makes of the reward (maximise it or pull it to a target), reward "
                       "augmentation and the negative prompt, for the AlignProp Trainer's objective socket",
                       OBJECTIVE_FIELDS, Objective, "objective")

    @classmethod
    def execute(cls, **kwargs):
        return _train_settings(cls, kwargs, OBJECTIVE_FIELDS)


class LoraSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_LoraSettings", display_name="AlignProp LoRA Settings", category=CATEGORY,
            description="rank, alpha, target layers and initialisation seed of the LoRA the AlignProp Trainer "
                        "trains (not with init_lora, whose file fixes them)",
            inputs=config_inputs(LoraConfig, limits=LORA_LIMITS),
            outputs=[LoraSettingsSocket.Output(display_name="lora_settings")])

    @classmethod
    def execute(cls, **kwargs):
        return io.NodeOutput(build(LoraConfig, kwargs))


NODES = [OptimizerSettings, EvaluationSettings, ObjectiveSettings, LoraSettings]
