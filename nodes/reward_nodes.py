"""Reward nodes: one loader per reward of the core, a mixer, the judges list, and Score Images.

Each loader resolves file names in models/reward_models (or models/clip_vision), or takes a model
that a standard ComfyUI loader loaded (the aesthetic reward's CLIP_VISION), calls one core factory
and outputs an ALIGNPROP_REWARD: the core `Reward`, which maps images (B,3,H,W) in [0,1] and prompts
to scores (B,) and carries its `RewardSpec` (name and arguments), recorded with every LoRA it trains.

ComfyUI 0.3.75 does not hold an API prompt's dropdown values to their options, nor refuse NaN or
infinity in a FLOAT input, so each node checks its own before calling the core (a file dropdown
through `existing_path`: the name must exist inside its model folder).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from alignprop_core.config import check_finite
from alignprop_core.rewards import make_reward
from alignprop_core.rewards.mixture import make_mixture, mixture_spec

from .choices import check_choice
from .paths import NO_FILE, REWARD_FOLDER, existing_path, model_dirs, weight_files

Reward = io.Custom("ALIGNPROP_REWARD")
Judges = io.Custom("ALIGNPROP_JUDGES")
CATEGORY = "AlignProp/rewards"
# Compressibility direction -> core reward name
JPEG_DIRECTIONS = {"compressible": "jpeg_compressibility", "incompressible": "jpeg_incompressibility"}
SIMPLE_KINDS = ("smoothness", "color_target", "colourfulness")


def _device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def _make(name: str, **kwargs):
    """The core reward, built outside ComfyUI's inference mode: weights created inside it are
    inference tensors, which the trainer cannot backpropagate through."""
    with torch.inference_mode(False):
        return make_reward(name, **kwargs)


def _file_input(name: str, folder: str, tooltip: str) -> io.Combo.Input:
    return io.Combo.Input(name, options=weight_files(folder), tooltip=tooltip)


class AestheticReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_AestheticReward", display_name="AlignProp Aesthetic Reward (LAION)",
            category=CATEGORY,
            description="reward: the LAION aesthetic predictor (linear head on CLIP ViT-L/14 image embeddings); "
                        "higher is prettier",
            inputs=[
                _file_input("head", REWARD_FOLDER, "LAION aesthetic MLP head, sac+logos+ava1-l14-linearMSE.pth "
                            "(3.7 MB), in models/reward_models"),
                io.Combo.Input("clip_vision_file", options=[NO_FILE, *weight_files("clip_vision")], default=NO_FILE,
                               tooltip="CLIP ViT-L/14 image tower in models/clip_vision (e.g. "
                                       "clip-vit-large-patch14 .safetensors); leave at (none) when a Load "
                                       "CLIP Vision node is connected to clip_vision"),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP ViT-L/14 from the standard Load CLIP Vision node, instead of "
                                            "clip_vision_file"),
            ],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, head, clip_vision_file, clip_vision=None):
        chosen = bool(clip_vision_file) and clip_vision_file != NO_FILE
        if chosen == (clip_vision is not None):
            raise ValueError("the aesthetic reward needs one CLIP ViT-L/14 image tower: connect a Load CLIP "
                             "Vision node to clip_vision, or choose a file in clip_vision_file (models/"
                             "clip_vision), not both." if chosen else
                             "the aesthetic reward needs a CLIP ViT-L/14 image tower: connect a Load CLIP "
                             "Vision node to clip_vision, or choose a file in clip_vision_file (put "
                             "clip-vit-large-patch14.safetensors into models/clip_vision and refresh the page).")
        head_path = existing_path(REWARD_FOLDER, head)
        if chosen:
            reward = _make("aesthetic", head_path=head_path, device=_device(),
                           clip_vision_path=existing_path("clip_vision", clip_vision_file))
        else:
            # the weights of the model CLIPVisionLoader loaded; the core copies them into its own tower
            reward = _make("aesthetic", head_path=head_path, device=_device(),
                           clip_vision_state_dict=clip_vision.get_sd())
        return io.NodeOutput(reward)


class HPSReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_HPSReward", display_name="AlignProp HPSv2 Reward", category=CATEGORY,
            description="reward: Human Preference Score v2 of each image for its prompt",
            inputs=[_file_input("checkpoint", REWARD_FOLDER, "HPS_v2_compressed.pt or HPS_v2.1_compressed.pt "
                                "(open_clip ViT-H-14 with HPS weights) in models/reward_models")],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, checkpoint):
        return io.NodeOutput(_make("hps", checkpoint=existing_path(REWARD_FOLDER, checkpoint), device=_device()))


class PickScoreReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_PickScoreReward", display_name="AlignProp PickScore Reward", category=CATEGORY,
            description="reward: PickScore of each image for its prompt (a CLIP model trained on human picks)",
            inputs=[io.Combo.Input("model_dir", options=model_dirs(),
                                   tooltip="folder in models/reward_models holding PickScore_v1 "
                                           "(transformers CLIPModel with its tokenizer and processor)")],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, model_dir):
        return io.NodeOutput(_make("pickscore", model_dir=existing_path(REWARD_FOLDER, model_dir), device=_device()))


class CLIPScoreReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_CLIPScoreReward", display_name="AlignProp CLIP Score Reward", category=CATEGORY,
            description="reward: CLIP cosine similarity between each image and its prompt (image-text alignment)",
            inputs=[io.String.Input("arch", default="ViT-L-14", tooltip="open_clip architecture name"),
                    _file_input("checkpoint", REWARD_FOLDER, "open_clip checkpoint of that architecture")],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, arch, checkpoint):
        return io.NodeOutput(_make("clip_score", arch=arch, checkpoint=existing_path(REWARD_FOLDER, checkpoint),
                                   device=_device()))


class CompressibilityReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_CompressibilityReward", display_name="AlignProp JPEG Compressibility Reward",
            category=CATEGORY,
            description="reward: how small the image's JPEG would be (a differentiable size model); negative for "
                        "incompressibility",
            inputs=[io.Int.Input("quality", default=95, min=1, max=100, tooltip="JPEG quality of the size model"),
                    io.Combo.Input("direction", options=list(JPEG_DIRECTIONS),
                                   tooltip="reward small files (compressible) or large ones")],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, quality, direction):
        name = JPEG_DIRECTIONS[check_choice(direction, list(JPEG_DIRECTIONS), "direction")]
        return io.NodeOutput(_make(name, quality=check_finite(quality, "quality")))


class ObjectCountReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_ObjectCountReward", display_name="AlignProp Object Count Reward",
            category=CATEGORY,
            description="reward: how close a differentiable object counter's count is to the target count",
            inputs=[io.Combo.Input("model_dir", options=model_dirs(),
                                   tooltip="OWL-ViT or OWLv2 folder (transformers layout) in models/reward_models"),
                    io.String.Input("object_name", default="", tooltip="object to count; empty: each prompt's last word"),
                    io.Float.Input("target", default=3.0, min=0.0, max=100.0, tooltip="wanted count")],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, model_dir, object_name, target):
        target = check_finite(target, "target")
        return io.NodeOutput(_make("object_count", model_dir=existing_path(REWARD_FOLDER, model_dir),
                                   object_name=object_name.strip() or None, target=target, device=_device()))


class SimpleReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_SimpleReward", display_name="AlignProp Weight-free Reward", category=CATEGORY,
            description="rewards that need no weights (smoothness, colour target, colourfulness): for trying "
                        "the pack, for tests, and as judges (colourfulness shows over-saturation)",
            inputs=[io.Combo.Input("kind", options=list(SIMPLE_KINDS),
                                   tooltip="smoothness: negative total variation; color_target: mean colour "
                                           "close to (red, green, blue); colourfulness: Hasler-Suesstrunk "
                                           "colourfulness"),
                    io.Float.Input("red", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="color_target red"),
                    io.Float.Input("green", default=0.55, min=0.0, max=1.0, step=0.01, tooltip="color_target green"),
                    io.Float.Input("blue", default=0.1, min=0.0, max=1.0, step=0.01, tooltip="color_target blue")],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, kind, red, green, blue):
        check_choice(kind, SIMPLE_KINDS, "kind")
        target = tuple(check_finite(v, name) for v, name in ((red, "red"), (green, "green"), (blue, "blue")))
        kwargs = {"target": target} if kind == "color_target" else {}
        return io.NodeOutput(_make(kind, **kwargs))


class RewardMixer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_RewardMixer", display_name="AlignProp Reward Mixer", category=CATEGORY,
            description="a weighted mixture of two rewards (optionally standardised), trained as one reward",
            inputs=[Reward.Input("reward_1", tooltip="first reward"),
                    io.Float.Input("weight_1", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip="its weight"),
                    Reward.Input("reward_2", tooltip="second reward"),
                    io.Float.Input("weight_2", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip="its weight"),
                    Reward.Input("reward_3", optional=True, tooltip="optional third reward"),
                    io.Float.Input("weight_3", default=1.0, min=-100.0, max=100.0, step=0.01, tooltip="its weight"),
                    io.Boolean.Input("standardize", default=True,
                                     tooltip="standardise each reward by its running mean/std before weighting")],
            outputs=[Reward.Output(display_name="reward")])

    @classmethod
    def execute(cls, reward_1, weight_1, reward_2, weight_2, standardize, reward_3=None, weight_3=1.0):
        weights = [check_finite(w, f"weight_{i}") for i, w in enumerate((weight_1, weight_2, weight_3), 1)]
        parts = [(reward_1, weights[0]), (reward_2, weights[1])] + ([(reward_3, weights[2])] if reward_3 else [])
        spec = mixture_spec([(r.spec, w) for r, w in parts], standardize=standardize)
        return io.NodeOutput(make_mixture(parts, standardize=standardize, spec=spec))


class RewardJudges(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_Judges", display_name="AlignProp Judges", category=CATEGORY,
            description="rewards that score the trainer's held-out images beside its training reward and are "
                        "never trained on: they show when the training reward is being fooled",
            inputs=[Reward.Input("judge_1", tooltip="a reward to judge the held-out images with (e.g. CLIP "
                                                    "score or HPS while training on aesthetics)"),
                    Reward.Input("judge_2", optional=True, tooltip="optional second judge"),
                    Reward.Input("judge_3", optional=True, tooltip="optional third judge"),
                    Judges.Input("judges", optional=True, tooltip="judges of another AlignProp Judges node, "
                                 "listed first: chain nodes for more than three")],
            outputs=[Judges.Output(display_name="judges")])

    @classmethod
    def execute(cls, judge_1, judge_2=None, judge_3=None, judges=None):
        return io.NodeOutput([*(judges or []), *(j for j in (judge_1, judge_2, judge_3) if j is not None)])


class ScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AlignProp_ScoreImages", display_name="AlignProp Score Images", category=CATEGORY,
            description="scores an IMAGE batch with a reward and shows the scores (and their prompt) as text",
            is_output_node=True,
            inputs=[io.Image.Input("images", tooltip="images from any sampler (IMAGE batch)"),
                    Reward.Input("reward", tooltip="the reward to score with"),
                    io.String.Input("prompts", multiline=True, default="",
                                    tooltip="one prompt for all images, or one per line for each image")],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True)])

    @classmethod
    def execute(cls, images, reward, prompts):
        lines = [p.strip() for p in prompts.splitlines() if p.strip()]
        n = images.shape[0]
        if len(lines) not in (0, 1, n):
            raise ValueError(f"got {n} images but {len(lines)} prompt lines; give one prompt or one per image.")
        texts = lines if len(lines) == n else [(lines or [""])[0]] * n
        with torch.inference_mode(False), torch.no_grad():
            pixels = images.clone().permute(0, 3, 1, 2).float()  # IMAGE is (B, H, W, 3)
            scores = reward(pixels, texts).float().cpu().tolist()
        text = "\n".join(f"{i}: {s:.4f}" for i, s in enumerate(scores))
        return io.NodeOutput(scores, ui=ui.PreviewText(f"{reward.spec.label}\n{text}"))


NODES = [AestheticReward, HPSReward, PickScoreReward, CLIPScoreReward, CompressibilityReward,
         ObjectCountReward, SimpleReward, RewardMixer, RewardJudges, ScoreImages]
