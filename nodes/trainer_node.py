"""The AlignProp Trainer node: trains LoRA directly on the ComfyUI MODEL with a reward.

ComfyUI objects in, one `alignprop_core.training.trainer.train` call, ComfyUI objects out: the MODEL with the
LoRA applied (as ordinary LoRA patches on a clone), the LoRA, a reward-curve IMAGE, the file path, and
the LoRA once more as ComfyUI's own LORA_MODEL (the file's tensors, for Load LoRA Model and Save LoRA
Weights), the held-out evaluations as a table (training reward, judges, diversity) and the path of the
best evaluation's LoRA (`<name>-best`); outputs are only ever appended, so the links of workflows saved
earlier keep their output indices. Judges (AlignProp Judges) score the held-out images beside the
training reward without being trained on.
Progress goes to the node's bar and text, with a preview image every `preview_every` steps (the first
held-out prompt from its fixed evaluation latent, sampled with the LoRA as it is).

The node shows only the inputs users change; the rest come from the settings nodes
(`settings_nodes.py`) on optional sockets, and an unconnected one keeps the config defaults.

Files: every input is checked before the model is loaded; an existing LoRA of the same name is never
replaced unless `overwrite` is on (the next free numbered name is used instead, as SaveImage does).
Cancel stops at the next step boundary; a cancelled or failed run keeps its LoRA as
`<name>-partial.safetensors` and its training state in the output folder's `alignprop_state/<name>/`,
from which `resume` continues exactly where it stopped.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

import numpy as np
import torch
from comfy_api.latest import io

from alignprop_core.config import LoraConfig, MemoryConfig, SamplerConfig, TrainConfig
from alignprop_core.eval_table import evaluation_table
from alignprop_core.lora import check_lora_fits, load_lora, lora_modules, remove_lora
from alignprop_core.files.outputs import check_writable, lora_file_name, numbered_path, partial_path
from alignprop_core.planning import plan_memory
from alignprop_core.plots import plot_reward_curve
from alignprop_core.rewards.offload import offloaded
from alignprop_core.files.prompts import parse_prompts
from alignprop_core.training.best import best_lora_name
from alignprop_core.training.evaluate import evaluate
from alignprop_core.training.trainer import train

from .choices import check_combos
from .comfy_families import check_clip, check_family_inputs, family_backend
from .comfy_model import training_session
from .config_inputs import build, config_inputs, merge
from . import live_view
from .lora_nodes import Lora, LoraModel, apply_to_model, to_lora_model
from .model_source import base_model_name
from .paths import NO_FILE, join_inside, output_path, prompt_files, read_prompt_file
from .reward_nodes import Judges, Reward
from .sampler_nodes import Sampler
from .settings_nodes import SETTINGS_FIELDS, TRAIN_LIMITS, Evaluation, LoraSettingsSocket, Objective, Optimizer

STATE_FOLDER = "alignprop_state"  # in ComfyUI's output folder: one training state per LoRA name


def _curve_image(history, evals, title: str) -> torch.Tensor:
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        path = plot_reward_curve(history, evals, os.path.join(tmp, "curve.png"), title=title)
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)[None]  # (1, H, W, 3)


def _out_of_memory_message(err: BaseException, trained: dict, cfg: TrainConfig, sampler: SamplerConfig,
                           path: str) -> str:
    """What ran out of memory, what to change, and what was kept."""
    k = {"fixed": f"K={sampler.k}", "uniform": f"K in [{sampler.k_min}, {sampler.k_max}]",
         "gaussian": f"K ~ {sampler.k_mean:g}"}.get(sampler.truncation, sampler.truncation)
    off = [name for name in ("checkpoint_unet", "checkpoint_vae") if not getattr(sampler, name)]
    steps = trained["steps"]
    phase = (f"training, after {steps} completed step{'s' * (steps != 1)}" if trained["started"] else
             "the step-0 evaluation of the held-out prompts, before any training")
    kept = (f"The LoRA after {steps} completed step{'s' * (steps != 1)} was saved to {partial_path(path)}; "
            "continue with resume on (same lora_name) after lowering the settings above." if steps else
            "No training step had finished, so no trained LoRA was kept.")
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"AlignProp Trainer ran out of memory during {phase} ({first}) at {cfg.width}x{cfg.height}, "
            f"batch_size={cfg.batch_size}, eval_batch_size={cfg.eval_batch_size}, {sampler.steps} sampler "
            f"steps with {k}. To fit: lower batch_size (raise grad_accum in AlignProp Optimizer Settings to "
            "keep the effective batch), eval_batch_size (AlignProp Evaluation Settings), width/height or the "
            "sampler's K"
            + (f", turn on {' and '.join(off)} in AlignProp Sampler Settings" if off else "")
            + ", or on a GPU set mixed_precision to bf16/fp16"
            + ("" if cfg.offload_reward else " and offload_reward to true")
            + " in AlignProp Optimizer Settings; close other programs using the memory. "
            + kept)


class AlignPropTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_Trainer", display_name="AlignProp Trainer", category="AlignProp/training",
            description="trains a LoRA on the loaded MODEL by backpropagating the reward through the sampling "
                        "chain; draws the run live on the node and writes the LoRA to models/loras",
            is_output_node=True, hidden=[io.Hidden.unique_id, io.Hidden.prompt],
            inputs=[
                io.Model.Input("model", tooltip="SD1.x, SDXL, SD3/SD3.5, FLUX.1 or Z-Image MODEL (Load Checkpoint "
                                                "or Load Diffusion Model; fp8 weights train too)"),
                io.Clip.Input("clip", tooltip="the model's text encoders (frozen): its checkpoint's CLIP, or "
                                              "DualCLIPLoader (FLUX.1) / CLIPLoader (Z-Image)"),
                io.Vae.Input("vae", tooltip="the checkpoint's VAE (frozen; the reward's gradient flows through it)"),
                Reward.Input("reward", tooltip="what to maximise (an AlignProp reward node)"),
                io.String.Input("prompts", multiline=True, default="cat\ndog\nhorse",
                                tooltip="training prompts, one per line (# starts a comment)"),
                io.String.Input("lora_name", default="alignprop/alignprop_lora",
                                tooltip="file name under models/loras (.safetensors is added)"),
                *config_inputs(TrainConfig, skip=("reward", "judges", *SETTINGS_FIELDS), limits=TRAIN_LIMITS),
                Sampler.Input("sampler", optional=True, tooltip="sampler settings (default: 20 DDIM steps, K=1)"),
                Optimizer.Input("optimizer", optional=True, tooltip="AlignProp Optimizer Settings: AdamW, "
                                "accumulation, clipping, lr schedule, mixed precision (unconnected: its defaults)"),
                Evaluation.Input("evaluation", optional=True, tooltip="AlignProp Evaluation Settings: held-out "
                                 "scoring and saving intervals (unconnected: its defaults)"),
                Objective.Input("objective", optional=True, tooltip="AlignProp Objective Settings: loss, "
                                "reward augmentation, negative prompt (unconnected: its defaults)"),
                LoraSettingsSocket.Input("lora_settings", optional=True, tooltip="AlignProp LoRA Settings: rank, "
                                         "alpha, layers, init seed (unconnected: its defaults); not with init_lora"),
                Lora.Input("init_lora", optional=True, tooltip="continue training this LoRA (Load AlignProp LoRA)"),
                Judges.Input("judges", optional=True, tooltip="AlignProp Judges: rewards that also score the "
                             "held-out images and are never trained on (their names can pick the best LoRA: "
                             "best_by in AlignProp Evaluation Settings)"),
                io.Combo.Input("prompt_file", options=prompt_files(), default=NO_FILE, optional=True,
                               tooltip="a prompt list (one per line) from ComfyUI's input folder or shipped "
                                       "with AlignProp; when chosen it replaces the prompts text"),
                io.String.Input("eval_prompts", multiline=True, default="", optional=True,
                                tooltip="held-out prompts for the reward curve (empty: the training prompts)"),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="show a preview image on the node every N training steps: the first "
                                     "held-out prompt from its fixed evaluation latent, sampled with the "
                                     "current LoRA (costs one sampling run each time); 0 turns it off"),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="replace an existing LoRA of this name; off: the next free numbered "
                                         "name is used (name_00001, ...), as Save Image does"),
                io.Boolean.Input("resume", default=False, optional=True,
                                 tooltip="continue the run of this lora_name that was cancelled or failed, "
                                         "from its saved training state (same LoRA settings; raise steps to "
                                         "train longer)"),
                io.String.Input("memory_budget", default="off", optional=True,
                                tooltip="off | auto | GB: probe one small step, then train with the fastest "
                                        "batch split (batch x grad_accum kept) and checkpointing whose "
                                        "estimated peak fits; auto = the device's free memory now; the plan "
                                        "is shown in the log and the node's progress text"),
            ],
            outputs=[io.Model.Output(display_name="model"), Lora.Output(display_name="lora"),
                     io.Image.Output(display_name="reward_curve"), io.String.Output(display_name="lora_path"),
                     LoraModel.Output(display_name="lora_model",
                                      tooltip="the trained LoRA as ComfyUI's LORA_MODEL: the tensors of the file "
                                              "written (kohya keys, alpha included), for ComfyUI's Load LoRA Model "
                                              "and Save LoRA Weights; no metadata (reward spec, steps, settings)"),
                     io.String.Output(display_name="evaluation",
                                      tooltip="the held-out evaluations as a table: training reward, each judge "
                                              "and the held-out images' diversity per evaluation step"),
                     io.String.Output(display_name="best_lora_path",
                                      tooltip="the LoRA of the best evaluation (best_by), saved beside the final "
                                              "one as <name>-best; empty with keep_best off")])

    @classmethod
    def execute(cls, model, clip, vae, reward, prompts, lora_name, sampler=None, optimizer=None, evaluation=None,
                objective=None, lora_settings=None, init_lora=None, judges=None, prompt_file=NO_FILE, eval_prompts="",
                preview_every=0, overwrite=False, resume=False, memory_budget="off", **kwargs):
        import comfy.model_management as mm
        import comfy.utils
        import folder_paths
        from server import PromptServer

        # 1. everything that can be wrong is checked before any model work
        check_combos(cls.define_schema(), {"prompt_file": prompt_file, **kwargs})
        if prompt_file and prompt_file != NO_FILE:
            train_prompts = parse_prompts(read_prompt_file(prompt_file), source=f"prompt file {prompt_file}")
        else:
            train_prompts = parse_prompts(prompts, source="the prompts input")
        held_out = parse_prompts(eval_prompts, "eval_prompts") if eval_prompts.strip() else train_prompts
        judges = list(judges or [])
        cfg = build(TrainConfig, kwargs, reward=reward.spec.text(), judges=tuple(j.spec.text() for j in judges))
        cfg = merge(cfg, optimizer, evaluation, objective)
        sampler = sampler or SamplerConfig()
        family = check_family_inputs(model, vae, sampler, cfg.width, cfg.height)
        if init_lora is not None and lora_settings is not None:
            raise ValueError("init_lora and lora_settings are both connected, but the LoRA file of init_lora "
                             "fixes its rank, alpha and layers; disconnect AlignProp LoRA Settings to continue "
                             "that LoRA, or init_lora to train a new one.")
        if init_lora is not None:
            check_lora_fits(init_lora, model.model.diffusion_model)
        # the file's own layers; one without a target list (a LORA_MODEL, another program's file): the
        # layers it holds, which the injected LoRA must match key for key
        lora_cfg = (LoraConfig(rank=init_lora.rank, alpha=init_lora.alpha,
                               target_modules=init_lora.target_modules
                               or lora_modules(init_lora, model.model.diffusion_model))
                    if init_lora is not None
                    else lora_settings or LoraConfig())
        requested = output_path("loras", lora_file_name(lora_name, "lora_name"), what="lora_name")
        state_dir = _state_dir(folder_paths.get_output_directory(), lora_name)
        state_file = os.path.join(state_dir, "train_state.pt")
        if resume and not os.path.isfile(state_file):
            raise FileNotFoundError(f"resume is on but no run of lora_name {lora_name!r} was stopped early "
                                    f"(no training state at {state_file}); turn resume off to start anew.")
        memory = MemoryConfig.parse(memory_budget)
        check_clip(model, clip)
        check_writable(os.path.dirname(requested), "the loras folder")  # the last check: it makes the folder
        # without overwrite, a name whose final or best LoRA exists gets the next free number; a resumed
        # run continues the run that wrote its best LoRA, so only the final name counts then
        companions = (best_lora_name,) if cfg.keep_best and not resume else ()
        path = requested if overwrite else str(numbered_path(requested, companions))

        node_id = cls.hidden.unique_id
        bar = comfy.utils.ProgressBar(cfg.steps, node_id=node_id)
        preview_cfg = dataclasses.replace(cfg, eval_batch_size=1, eval_latents=1, best_by="reward")

        def preview(step: int) -> tuple[tuple, float]:
            """ComfyUI's preview tuple for the first held-out prompt, and its reward; the live view
            gets the same image."""
            from comfy.cli_args import args
            from PIL import Image

            with torch.no_grad():
                scores, images = evaluate(backend, reward, held_out[:1], sampler, preview_cfg,
                                          return_images=True)
            pixels = (images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            image = Image.fromarray(pixels)
            live_view.save_preview(live, image, step, held_out[0], float(scores[0]))
            return ("JPEG", image, args.preview_size), scores[0]

        trained = {"steps": 0, "started": False, "cancelled": False}

        def show(step: int, image) -> None:
            """The progress bar; ComfyUI's progress hook raises there when Cancel was pressed."""
            try:
                bar.update_absolute(step, cfg.steps, image)
            except mm.InterruptProcessingException:
                trained["cancelled"] = True  # the hook has cleared ComfyUI's flag: remember it here

        def on_step(step, metrics):
            trained["started"] = True
            if "eval_reward" in metrics:
                text = f"step {step}: held-out reward {metrics['eval_reward']:.4f}"
                text += "".join(f", {name} {value:.4f}" for name, value in (metrics.get("judges") or {}).items())
                if metrics.get("diversity") is not None:
                    text += f", diversity {metrics['diversity']:.4f}"
                live.add_eval(step, metrics["eval_reward"])
            else:
                trained["steps"] = step
                text = f"step {step}/{cfg.steps}: reward {metrics['reward']:.4f}, K={metrics['k']}"
                live.add_step(step, metrics["reward"])
                image = None
                if preview_every and step % preview_every == 0:
                    image, score = preview(step)
                    text += f"; preview {held_out[0]!r}: reward {score:.4f}"
                show(step, image)
            live_view.publish(live, node_id)
            logging.info("AlignProp %s", text)
            if node_id:
                PromptServer.instance.send_progress_text(text, node_id)

        def show_saved(saved) -> None:
            if saved.name != best_lora_name(os.path.basename(path)):  # the live view names the run's own LoRA
                live.set_lora(str(saved))

        def should_stop() -> bool:
            return trained["cancelled"] or mm.processing_interrupted()

        # 2. train on the model itself; LoRA layers are removed again whatever happens
        live = live_view.start_run(node_id, cfg.steps)
        try:
            with training_session(model, vae):
                backend = family_backend(model, clip, vae, cfg.width, cfg.height,
                                         name=base_model_name(family, cls.hidden.prompt, node_id))
                if memory.enabled:  # the plan's batch split, checkpointing and offloading replace the inputs'
                    plan = plan_memory(backend, reward, train_prompts, sampler, lora_cfg, cfg, memory)
                    logging.info("AlignProp %s", plan.describe())
                    if node_id:
                        PromptServer.instance.send_progress_text(plan.describe(), node_id)
                    sampler, cfg = plan.apply(sampler, cfg)
                # the preview scores with the run's reward: with offloading, its networks wait on the CPU
                reward = offloaded(reward) if cfg.offload_reward else reward
                try:
                    result = train(backend, reward, train_prompts, held_out, sampler, lora_cfg, cfg,
                                   out_dir=os.path.dirname(path), lora_name=os.path.basename(path),
                                   on_step=on_step, should_stop=should_stop, init_lora=init_lora,
                                   state_dir=state_dir, resume_from=state_file if resume else None, judges=judges,
                                   overwrite=overwrite, on_save=show_saved)
                except torch.OutOfMemoryError as err:
                    raise RuntimeError(_out_of_memory_message(err, trained, cfg, sampler, path)) from err
                finally:
                    remove_lora(backend.lora_target)
        except BaseException as err:
            live.finish("cancelled" if isinstance(err, mm.InterruptProcessingException) else "failed",
                        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            live_view.publish(live, node_id, force=True)
            raise
        live.finish("cancelled" if result.stopped_early else "finished")
        live_view.publish(live, node_id, force=True)

        # 3. a cancelled run has kept <name>-partial and its state: report the cancel as ComfyUI does
        if result.stopped_early:
            logging.info("AlignProp: cancelled after step %d; the LoRA so far is %s; resume continues it",
                         len(result.history), result.lora_path)
            raise mm.InterruptProcessingException()
        if os.path.isfile(state_file):  # finished: the state of an earlier stopped run is spent
            os.remove(state_file)
        lora = load_lora(result.lora_path)
        curve = _curve_image(result.history, result.evals, f"AlignProp: {reward.spec.label}")
        best = str(result.best_path) if result.best_path else ""
        table = evaluation_table(result.evals, result.best_step if best else None, best, result.early_stopped)
        return io.NodeOutput(apply_to_model(model, lora), lora, curve, str(result.lora_path), to_lora_model(lora),
                             table, best)


def _state_dir(output_dir: str, lora_name: str) -> str:
    """Where the training state of runs named `lora_name` lives, inside the output folder."""
    stem = lora_name[: -len(".safetensors")] if lora_name.endswith(".safetensors") else lora_name
    return join_inside(os.path.join(output_dir, STATE_FOLDER), stem)


NODES = [AlignPropTrainer]
