"""Toy-world rewards from the project's shape classifier: the analogue of the paper's object count.

`toy_count` scores an image by the classifier's log-probability (or probability) that it shows the
number of shapes the prompt asks for ("three red circles ..." -> 3); `attributes` can add the
colour and the shape the prompt names. A known shortcut of the log-probability: confidently wrong
images dominate its mean, so turning every image into an ambiguous one (p = 1/4 per count) also
raises it; watch the reported accuracies (the demo prints them), and prefer kind="prob" with a
temperature for long runs; `report` also counts separate blobs with no learned weights
(`toy.counting`), which a fooled classifier cannot move. The classifier is trained by
`alignprop_core.toy.pretrain` on the same shape generator as the toy diffusion model (including
shapes that touch, labelled by the blobs a person would count) and ships with the package, so the
reward needs no download. It is differentiable with respect to the pixels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .base import FunctionReward, check_images, check_prompts
from .clip_loading import load_error_reason
from .spec import RewardSpec

ATTRIBUTES = ("count", "colour", "shape", "background")
KINDS = ("log_prob", "prob")


def toy_targets(prompts: Sequence[str], attributes: Sequence[str], reward: str = "toy_count") -> torch.Tensor:
    """(B, len(attributes)) class indices the prompts ask for (a count n is index n - 1); errors name
    the `reward` and the prompts that lack one."""
    from alignprop_core.toy.shapes import BACKGROUND_NAMES, COLOUR_NAMES, SHAPES, parse_caption

    index = {"count": lambda v: v - 1, "colour": COLOUR_NAMES.index, "shape": SHAPES.index,
             "background": BACKGROUND_NAMES.index}
    rows = []
    for prompt in prompts:
        parsed = parse_caption(prompt)
        missing = [a for a in attributes if parsed[a] is None]
        if missing:
            raise ValueError(f"the {reward} reward needs prompts of the toy world that name the "
                             f"{' and '.join(missing)} (e.g. 'three red circles on a black "
                             f"background'); {prompt!r} does not.")
        rows.append([index[a](parsed[a]) for a in attributes])
    return torch.tensor(rows, dtype=torch.long)


def make_toy_count(attributes: Sequence[str] = ("count",), kind: str = "log_prob",
                   temperature: float = 1.0, weights_path: str | None = None) -> FunctionReward:
    """Reward = the sum over `attributes` of log p(requested value | image) (kind="log_prob", <= 0)
    or the mean of the probabilities (kind="prob", in [0, 1]), p = softmax(logits / temperature).

    Args:
        attributes: which requested attributes count: any of count, colour, shape, background.
        kind: log_prob or prob.
        temperature: divides the classifier's logits. The classifier is near-certain on most images
            (p ~ 0 or 1, where the gradient vanishes); a temperature above 1 keeps a useful gradient.
            It never changes which count is predicted (the reported accuracies).
        weights_path: classifier .safetensors (default: the committed toy classifier).
    """
    if not temperature > 0:
        raise ValueError(f"toy_count temperature must be > 0, got {temperature}.")
    attributes = (attributes,) if isinstance(attributes, str) else tuple(attributes)
    if not attributes or any(a not in ATTRIBUTES for a in attributes):
        raise ValueError(f"toy_count attributes {attributes} must be some of {', '.join(ATTRIBUTES)}.")
    if kind not in KINDS:
        raise ValueError(f"toy_count kind={kind!r} is not known; use one of {', '.join(KINDS)}.")
    from alignprop_core.toy.classifier import load_classifier
    from .toy_blobs import make_toy_blobs  # here: toy_blobs imports this module's toy_targets

    try:
        classifier = load_classifier(Path(weights_path) if weights_path else None)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors, JSON metadata and load_state_dict each raise their own
        raise ValueError(f"toy classifier weights {weights_path} cannot be read ({load_error_reason(err)}); "
                         "give a file written by `python -m alignprop_core.toy.pretrain`, or leave "
                         "weights_path unset for the shipped classifier.") from err

    blob_referee = make_toy_blobs()

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        targets = toy_targets(check_prompts(prompts, "toy_count"), attributes).to(images.device)
        classifier.to(images.device)
        logits = classifier(images.float())
        logp = torch.stack([(logits[a] / temperature).log_softmax(1).gather(1, targets[:, j:j + 1]).squeeze(1)
                            for j, a in enumerate(attributes)], dim=1)  # (B, A)
        return logp.sum(1) if kind == "log_prob" else logp.exp().mean(1)

    @torch.no_grad()
    def report(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
        """Share of images whose predicted count / colour / shape is the one the prompt asks for, and
        share whose separate blobs number as requested (the `toy_blobs` judge's mean)."""
        targets = toy_targets(check_prompts(prompts, "toy_count"), ("count", "colour", "shape"))
        classifier.to(images.device)
        logits = classifier(images.float())
        out = {f"{a}_accuracy": float((logits[a].argmax(1).cpu() == targets[:, j]).float().mean())
               for j, a in enumerate(("count", "colour", "shape"))}
        out["count_probability"] = float(logits["count"].softmax(1).cpu().gather(1, targets[:, :1]).mean())  # T = 1
        # the weight-free referee, toy_blobs: separate blobs counted in the pixels (cannot be fooled like the CNN)
        out["counted_blobs_accuracy"] = float(blob_referee(images, prompts).mean())
        return out

    # the report is what the demo prints before and after training
    return FunctionReward(RewardSpec("toy_count"), reward, report, modules=[classifier])
