"""PickScore reward (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences").

Reproduces the model card of ``yuvalkirstain/PickScore_v1``: a transformers ``CLIPModel`` (CLIP-H
fine-tuned on Pick-a-Pic) with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; text is
tokenised with ``padding=True, truncation=True, max_length=77`` and
score = logit_scale.exp() * cos(image_embeds, text_embeds), about 20-23 for typical images.
The processor's image pipeline is replaced by its differentiable twin, `clip_preprocess`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .base import FunctionReward, check_images, check_prompts
from .clip_loading import freeze, quiet_pickle_protocol_warning, weights_error
from .preprocess import clip_preprocess
from .spec import RewardSpec

MAX_TEXT_TOKENS = 77  # CLIP's context length, as the reference passes it
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_SOURCE = ("huggingface.co/yuvalkirstain/PickScore_v1 (config.json, model.safetensors, about 3.9 GB) "
           "plus the processor files of huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


def _require_dir(path: Path, needed: list[tuple[str, ...]], what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} folder {str(path)!r} not found; download {_SOURCE} into one folder "
                                "and pass its path.")
    missing = [" or ".join(names) for names in needed if not any((path / n).is_file() for n in names)]
    if missing:
        raise FileNotFoundError(f"{what} folder {str(path)!r} lacks {', '.join(missing)}; it needs "
                                f"{_SOURCE}. Pass processor_dir if the processor files live elsewhere.")


def _field(size, key: str):
    # transformers >= 5 keeps sizes in a SizeDict dataclass, older versions in a plain dict.
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _image_settings(processor_dir: Path) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(size, mean, std) of the local CLIPImageProcessor, checked to be resize-then-centre-crop."""
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    short = _field(proc.size, "shortest_edge")
    crop = (_field(proc.crop_size, "height"), _field(proc.crop_size, "width"))
    pipeline_ok = proc.do_resize and proc.do_center_crop and proc.do_normalize
    if not pipeline_ok or short is None or crop != (short, short):
        raise ValueError(f"the image processor in {processor_dir} is not 'resize shortest side to N, centre "
                         f"crop N x N, normalise' (size={proc.size}, crop_size={proc.crop_size}); use the "
                         "processor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K.")
    return int(short), tuple(proc.image_mean), tuple(proc.image_std)


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, >= 5 a model output holding it as pooler_output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def make_pickscore(model_dir: str | Path, processor_dir: str | Path | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> FunctionReward:
    """PickScore of each image for its prompt (higher is more preferred by people).

    Args:
        model_dir: local folder of ``yuvalkirstain/PickScore_v1`` (config.json + weights).
        processor_dir: local folder with the CLIP-H processor files (preprocessor_config.json and
            tokenizer files); None looks for them in `model_dir`.
        device: where the frozen model lives.
        dtype: dtype of its weights.

    Returns:
        A reward ``(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` float32 scores on the images'
        device, whose `modules()` is the frozen model.
    """
    from transformers import AutoTokenizer, CLIPModel

    model_dir = Path(model_dir).expanduser()
    processor_dir = Path(processor_dir).expanduser() if processor_dir is not None else model_dir
    _require_dir(model_dir, [("config.json",), _WEIGHT_FILES], "PickScore model")
    _require_dir(processor_dir, [("preprocessor_config.json", "processor_config.json"),
                                 ("tokenizer.json", "vocab.json")], "PickScore processor")
    size, mean, std = _image_settings(processor_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(processor_dir), local_files_only=True)
    try:
        with quiet_pickle_protocol_warning():
            model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - torch, safetensors and transformers each raise their own
        raise weights_error(model_dir, _WEIGHT_FILES, err, f"download {_SOURCE} again") from err
    model = freeze(model, device, dtype)
    scale = model.logit_scale.detach().exp().float()

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        prompts = check_prompts(prompts, "pickscore")
        # transformers' processor floors the centre-crop offset.
        pixels = clip_preprocess(images.to(device=device, dtype=torch.float32), size, mean, std,
                                 crop_offset="floor").to(dtype)
        image_emb = _features(model.get_image_features(pixel_values=pixels))  # (B, D)
        with torch.no_grad():  # no gradient reaches the text: skip storing its activations
            tokens = tokenizer(prompts, padding=True, truncation=True, max_length=MAX_TEXT_TOKENS,
                               return_tensors="pt").to(device)
            text_emb = _features(model.get_text_features(input_ids=tokens["input_ids"],
                                                         attention_mask=tokens["attention_mask"]))
            text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        return (scale * (image_emb * text_emb).sum(dim=-1).float()).to(images.device)

    return FunctionReward(RewardSpec("pickscore"), reward, modules=[model])
