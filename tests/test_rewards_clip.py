"""CLIP-based rewards: preprocessing matches the PIL references, loaders read the real key layouts,
and each reward equals its reference formula, is differentiable and rejects bad input.

Every model is tiny, random and of the real family (open_clip CLIP, transformers CLIPModel and
CLIPVisionModelWithProjection), written to tmp files and read back through the loaders users hit.
Nothing is downloaded: open_clip configs are registered from a tmp folder and tokenizers are local.
"""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from alignprop_core.rewards.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

pytestmark = pytest.mark.usefixtures("one_thread")

open_clip = pytest.importorskip("open_clip")
PIL = pytest.importorskip("PIL.Image")
tvF = pytest.importorskip("torchvision.transforms.functional")

# Tiny open_clip ViTs: 224 px input, 7x7 patches of 32, width 64, 2 layers; text width 32.
_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
_VISION = {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32}
TINY = "alignprop-test-tiny-ViT"  # embed dim 32
TINY_768 = "alignprop-test-tiny-ViT-768"  # embed dim 768, so the real aesthetic head fits
TINY_P16 = "alignprop-test-tiny-ViT-p16"  # same widths, patch 16: a "wrong architecture"
CONFIGS = {
    TINY: {"embed_dim": 32, "vision_cfg": _VISION, "text_cfg": _TEXT},
    TINY_768: {"embed_dim": 768, "vision_cfg": _VISION, "text_cfg": _TEXT},
    TINY_P16: {"embed_dim": 32, "vision_cfg": {**_VISION, "patch_size": 16}, "text_cfg": _TEXT},
}
PROMPTS = ["a photo of a cat", "a red dog on grass"]

# PIL resizes in two uint8 passes: at most about one 8-bit step per pixel after both (measured
# max 1.1/255 on noise, 1.0/255 on smooth images; mean 0.37/255), in [0, 1] units.
PIL_MAX_ABS = 1.5 / 255
PIL_MEAN_ABS = 0.5 / 255


# ---------------------------------------------------------------------------------------------
# helpers and fixtures

def _test_image(h: int, w: int, kind: str, seed: int = 0) -> torch.Tensor:
    """(3, H, W) image on the uint8 grid (k / 255), so making a PIL image of it is exact."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    if kind == "smooth":
        img = torch.stack([0.5 + 0.4 * torch.sin(6 * xx + 1), 0.5 + 0.4 * torch.cos(5 * yy), xx * yy])
    elif kind == "edges":
        img = torch.stack([(xx > 0.5).float(), 0.8 * (yy > 0.3).float(), 0.5 + 0.5 * torch.sin(20 * xx * yy)])
    elif kind == "noise":
        img = torch.rand(3, h, w, generator=g)
    else:
        raise ValueError(kind)
    return (img.clamp(0, 1) * 255).round() / 255


def _batch(h: int = 224, w: int = 224) -> torch.Tensor:
    return torch.stack([_test_image(h, w, "smooth"), _test_image(h, w, "edges")])


def _pil(x: torch.Tensor):
    return PIL.fromarray((x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())


def _assert_reward_ok(reward, images: torch.Tensor, prompts) -> torch.Tensor:
    images = images.clone().requires_grad_(True)
    scores = reward(images, prompts)
    assert scores.shape == (images.shape[0],) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    return scores.detach()




@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return folder


def _save_open_clip(arch: str, path, seed: int, wrap: bool = False):
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(path))
    elif wrap:  # HPSv2 training layout: DDP "module." prefixes inside {"state_dict": ...}
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        torch.save({"state_dict": sd}, path)
    return path


@pytest.fixture(scope="module")
def clip_files(tiny_archs, tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_files")
    return {
        "tiny": _save_open_clip(TINY, d / "tiny.safetensors", seed=0),
        "hps": _save_open_clip(TINY, d / "HPS_v2.1_compressed.pt", seed=1),
        "hps_ddp": _save_open_clip(TINY, d / "hps_ddp.pt", seed=1, wrap=True),
        "tiny768": _save_open_clip(TINY_768, d / "tiny768.pt", seed=2),
    }


@pytest.fixture(scope="module")
def aesthetic_head(tmp_path_factory):
    from alignprop_core.rewards.aesthetic import AestheticHead

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticHead(768).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def comfy_clip_vision(tmp_path_factory):
    """A tiny ViT in ComfyUI's clip_vision layout (transformers keys), with a 768-d projection."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(4)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, projection_dim=768, num_hidden_layers=2,
                              num_attention_heads=1, image_size=224, patch_size=32, hidden_act="gelu")
    model = CLIPVisionModelWithProjection(config).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 8)  # as in a full CLIP file
    sd["logit_scale"] = torch.tensor(4.6)
    path = tmp_path_factory.mktemp("clip_vision") / "clip-vit-large-patch14.safetensors"
    save_file(sd, str(path))
    return path, model


@pytest.fixture(scope="module")
def pickscore_dir(tmp_path_factory):
    """A tiny CLIPModel saved with save_pretrained, plus laion-style processor files."""
    from transformers import CLIPConfig, CLIPModel

    from alignprop_core.models.tiny_model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(5)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=32)
    d = tmp_path_factory.mktemp("PickScore_v1")
    CLIPModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    # The legacy file of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, which PickScore's reference uses.
    (d / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD), "resample": 3, "size": 224}))
    return d


# ---------------------------------------------------------------------------------------------
# preprocessing

@pytest.mark.parametrize("h,w", [(64, 64), (224, 224), (256, 256), (512, 512), (300, 200), (384, 512)])
def test_preprocess_matches_open_clip_and_transformers(h, w):
    from open_clip.transform import image_transform
    from transformers import CLIPImageProcessor

    reference_oc = image_transform(224, is_train=False)
    reference_hf = CLIPImageProcessor()  # defaults are the CLIP ones: shortest 224, crop 224, bicubic
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    for kind in ("smooth", "edges", "noise"):
        x = _test_image(h, w, kind)
        ours_round = clip_preprocess(x[None])[0]
        ours_floor = clip_preprocess(x[None], crop_offset="floor")[0]
        ref_oc = reference_oc(_pil(x))
        ref_hf = reference_hf(images=_pil(x), return_tensors="pt")["pixel_values"][0]
        for ours, ref in ((ours_round, ref_oc), (ours_floor, ref_hf)):
            diff = ((ours - ref) * std).abs()  # back in [0, 1] pixel units
            if (h, w) == (224, 224):
                assert diff.max() < 1e-6  # no resize: identical pixels
            assert diff.max() <= PIL_MAX_ABS, (kind, float(diff.max()) * 255)
            assert diff.mean() <= PIL_MEAN_ABS, (kind, float(diff.mean()) * 255)


@pytest.mark.parametrize("h,w", [(256, 256), (300, 200), (384, 512)])
def test_preprocess_longest_matches_hpsv2_transform(h, w):
    """HPSv2's preprocess_val: ToTensor, float-tensor resize of the longest side, zero pad, Normalize."""
    x = _test_image(h, w, "edges")
    t = tvF.to_tensor(_pil(x))
    scale = 224 / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    t = tvF.resize(t, [new_h, new_w], tvF.InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = 224 - new_h, 224 - new_w
    t = tvF.pad(t, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    ref = tvF.normalize(t, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    ours = clip_preprocess(x[None], resize_mode="longest", clamp=False)[0]
    assert ours.shape == (3, 224, 224)
    assert (ours - ref).abs().max() < 1e-5


def test_preprocess_is_differentiable_and_checks_arguments():
    x = _batch(200, 300).requires_grad_(True)
    out = clip_preprocess(x)
    assert out.shape == (2, 3, 224, 224)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="resize_mode"):
        clip_preprocess(x, resize_mode="squash")
    with pytest.raises(ValueError, match="crop_offset"):
        clip_preprocess(x, crop_offset="ceil")


# ---------------------------------------------------------------------------------------------
# loaders

def test_load_open_clip_unwraps_hps_checkpoint_and_freezes(clip_files):
    from alignprop_core.rewards.clip_loading import load_open_clip

    plain, _ = load_open_clip(TINY, clip_files["hps"])
    ddp, tokenizer = load_open_clip(TINY, clip_files["hps_ddp"], dtype=torch.bfloat16)
    assert not ddp.training and not any(p.requires_grad for p in ddp.parameters())
    assert all(p.dtype == torch.bfloat16 for p in ddp.parameters())
    for (name, a), (_, b) in zip(plain.state_dict().items(), ddp.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    assert tokenizer(["a cat"]).shape == (1, 77)


def test_wrong_architecture_names_both(clip_files, tmp_path):
    from safetensors.torch import save_file

    from alignprop_core.rewards.clip_loading import load_open_clip

    with pytest.raises(ValueError, match=f"{TINY_P16}.*looks like {TINY}"):
        load_open_clip(TINY_P16, clip_files["tiny"])
    # The shapes of a ViT-B-32 file offered as ViT-L-14 (caught before ViT-L-14 is built).
    fake_b32 = {"visual.conv1.weight": torch.zeros(768, 3, 32, 32, dtype=torch.float16),
                "visual.proj": torch.zeros(768, 512, dtype=torch.float16)}
    fake_b32.update({f"visual.transformer.resblocks.{i}.ln_1.weight": torch.zeros(1) for i in range(12)})
    save_file(fake_b32, str(tmp_path / "vit_b_32.safetensors"))
    with pytest.raises(ValueError, match=r"ViT-L-14 .*width 1024.*width 768, patch 32, 12 layers.*ViT-B-32"):
        load_open_clip("ViT-L-14", tmp_path / "vit_b_32.safetensors")


def test_loaders_refuse_unsafe_and_foreign_files(clip_files, comfy_clip_vision, tmp_path):
    from alignprop_core.rewards.clip_loading import load_comfy_clip_vision, load_open_clip

    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # a whole object, not a state dict
    with pytest.raises(ValueError, match="weights_only"):
        load_open_clip(TINY, tmp_path / "pickled_module.pt")
    with pytest.raises(ValueError, match="clip_vision"):
        load_open_clip(TINY, comfy_clip_vision[0])
    with pytest.raises(ValueError, match="clip_checkpoint"):
        load_comfy_clip_vision(clip_files["tiny"])
    with pytest.raises(ValueError, match="unknown open_clip arch"):
        load_open_clip("hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K", clip_files["tiny"])


def test_comfy_clip_vision_matches_transformers(comfy_clip_vision):
    from alignprop_core.rewards.clip_loading import load_comfy_clip_vision

    path, reference = comfy_clip_vision
    encoder = load_comfy_clip_vision(path, hidden_act="gelu", num_attention_heads=1)
    assert (encoder.image_size, encoder.embed_dim) == (224, 768)
    pixels = clip_preprocess(_batch())
    with torch.no_grad():
        expected = reference(pixel_values=pixels).image_embeds
        assert torch.allclose(encoder.embed(pixels), expected, atol=1e-5)


@pytest.mark.parametrize("hidden,layers,mlp,proj,expected", [
    # ComfyUI's comfy/clip_vision_config_vitl.json (OpenAI ViT-L/14)
    (1024, 24, 4096, 768, {"num_attention_heads": 16, "hidden_act": "quick_gelu", "image_size": 224}),
    # LAION ViT-H/14 (IP-Adapter's CLIP-ViT-H-14-laion2B-s32B-b79K): 16 heads of 80, exact GELU
    (1280, 32, 5120, 1024, {"num_attention_heads": 16, "hidden_act": "gelu", "image_size": 224}),
])
def test_clip_vision_config_of_real_layouts(hidden, layers, mlp, proj, expected):
    from alignprop_core.rewards.clip_loading import _clip_vision_config

    def meta(*shape):  # shapes only: no memory for a real-size state dict
        return torch.empty(*shape, device="meta")

    sd = {"vision_model.embeddings.patch_embedding.weight": meta(hidden, 3, 14, 14),
          "vision_model.embeddings.position_embedding.weight": meta(257, hidden),
          "visual_projection.weight": meta(proj, hidden)}
    for i in range(layers):
        sd[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = meta(mlp, hidden)
    config = _clip_vision_config(sd, hidden_act=None)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (hidden, layers, mlp)
    assert (config.patch_size, config.projection_dim) == (14, proj)
    for key, value in expected.items():
        assert getattr(config, key) == value, key


def test_missing_files_name_the_expected_file(tmp_path, tiny_archs):
    from alignprop_core.rewards.aesthetic import make_aesthetic
    from alignprop_core.rewards.clip_loading import load_comfy_clip_vision, load_open_clip
    from alignprop_core.rewards.hps import make_hps
    from alignprop_core.rewards.pickscore import make_pickscore

    nowhere = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*3\.7 MB"):
        make_aesthetic(nowhere, clip_checkpoint=nowhere)
    with pytest.raises(FileNotFoundError, match="HPS_v2.1_compressed.pt.*xswu/HPSv2"):
        make_hps(nowhere)
    with pytest.raises(FileNotFoundError, match="clip-vit-large-patch14"):
        load_comfy_clip_vision(nowhere)
    with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model.bin"):
        load_open_clip(TINY, nowhere)
    with pytest.raises(FileNotFoundError, match="PickScore_v1"):
        make_pickscore(tmp_path / "PickScore_v1")
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        make_pickscore(tmp_path / "only_config")


# ---------------------------------------------------------------------------------------------
# rewards

def test_aesthetic_open_clip_matches_reference(clip_files, aesthetic_head):
    from open_clip.transform import image_transform

    from alignprop_core.rewards.aesthetic import AestheticHead, make_aesthetic

    with pytest.warns(UserWarning, match="md5"):
        reward = make_aesthetic(aesthetic_head, clip_checkpoint=clip_files["tiny768"], clip_arch=TINY_768)
    images = _batch()
    scores = _assert_reward_ok(reward, images, PROMPTS)
    _assert_reward_ok(reward, _batch(200, 300), None)  # prompts are not needed

    # Reference: simple_inference.py with the same weights, fed open_clip's own preprocessing.
    model = open_clip.create_model(TINY_768, pretrained=None).eval()
    model.load_state_dict(torch.load(clip_files["tiny768"], weights_only=True)["state_dict"])
    head = AestheticHead(768).eval()
    head.load_state_dict(torch.load(aesthetic_head, weights_only=True))
    pixels = torch.stack([image_transform(224, is_train=False)(_pil(x)) for x in images])
    with torch.no_grad():
        emb = model.encode_image(pixels)
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(scores, expected, atol=1e-4)


def test_aesthetic_clip_vision_matches_reference(comfy_clip_vision, aesthetic_head):
    from transformers import CLIPImageProcessor

    from alignprop_core.rewards.aesthetic import AestheticHead, make_aesthetic

    path, reference = comfy_clip_vision
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the md5 warning, tested above
        # The tiny tower has one 64-wide head, which the hidden/64 rule infers.
        reward = make_aesthetic(aesthetic_head, clip_vision_path=path)
    images = _batch()
    scores = _assert_reward_ok(reward, images, PROMPTS)

    head = AestheticHead(768).eval()
    head.load_state_dict(torch.load(aesthetic_head, weights_only=True))
    pixels = CLIPImageProcessor()(images=[_pil(x) for x in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        emb = reference(pixel_values=pixels).image_embeds
        expected = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(scores, expected, atol=1e-4)


def test_aesthetic_needs_exactly_one_clip_source(aesthetic_head, clip_files):
    from alignprop_core.rewards.aesthetic import make_aesthetic

    with pytest.raises(ValueError, match="exactly one"):
        make_aesthetic(aesthetic_head)
    with pytest.raises(ValueError, match="exactly one"):
        make_aesthetic(aesthetic_head, clip_checkpoint=clip_files["tiny768"], clip_vision_path="x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match="32-d embeddings but the aesthetic head takes 768"):
            make_aesthetic(aesthetic_head, clip_checkpoint=clip_files["tiny"], clip_arch=TINY)


def test_hps_matches_reference(clip_files):
    from alignprop_core.rewards.hps import make_hps

    reward = make_hps(clip_files["hps"], arch=TINY)
    images = _batch(256, 256)  # HPSv2 resizes 256 -> 224 on the float tensor, as we do
    scores = _assert_reward_ok(reward, images, PROMPTS)
    _assert_reward_ok(reward, _batch(200, 300), PROMPTS)  # non-square: longest side + padding

    # Reference: hpsv2/img_score.py — checkpoint['state_dict'] loaded strictly, model(image, text).
    model = open_clip.create_model(TINY, pretrained=None, output_dict=True).eval()
    model.load_state_dict(torch.load(clip_files["hps"], weights_only=True)["state_dict"])
    tokenizer = open_clip.get_tokenizer(TINY)
    pixels = torch.stack([tvF.normalize(tvF.resize(tvF.to_tensor(_pil(x)), [224, 224],
                                                   tvF.InterpolationMode.BICUBIC, antialias=True),
                                        OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) for x in images])
    with torch.no_grad():
        out = model(pixels, tokenizer(PROMPTS))
        expected = torch.diagonal(out["image_features"] @ out["text_features"].T)
    assert torch.allclose(scores, expected, atol=1e-4)


def test_clip_score_matches_cosine_and_keeps_output_float32(clip_files):
    from alignprop_core.rewards.clip_score import make_clip_score

    reward = make_clip_score(TINY, clip_files["tiny"])
    images = _batch()
    scores = _assert_reward_ok(reward, images, PROMPTS)
    model = open_clip.create_model(TINY, pretrained=None).eval()
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(clip_files["tiny"])))
    pixels = clip_preprocess(images)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(TINY)(PROMPTS), normalize=True)
    assert torch.allclose(scores, (img * txt).sum(-1), atol=1e-5)
    assert scores.abs().max() <= 1 + 1e-5

    low = make_clip_score(TINY, clip_files["tiny"], dtype=torch.bfloat16)
    out = low(images.double(), PROMPTS)
    assert out.dtype == torch.float32 and torch.allclose(out, scores, atol=0.05)


def test_pickscore_matches_reference(pickscore_dir):
    from transformers import AutoProcessor, CLIPModel

    from alignprop_core.rewards.pickscore import make_pickscore

    reward = make_pickscore(pickscore_dir)
    images = _batch()
    scores = _assert_reward_ok(reward, images, PROMPTS)
    _assert_reward_ok(reward, _batch(200, 300), PROMPTS)

    # Reference: the PickScore_v1 model card, one prompt at a time.
    processor = AutoProcessor.from_pretrained(str(pickscore_dir), local_files_only=True)
    model = CLIPModel.from_pretrained(str(pickscore_dir), local_files_only=True).eval()

    def features(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            image_inputs = processor(images=[_pil(image)], padding=True, truncation=True, max_length=77,
                                     return_tensors="pt")
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77,
                                    return_tensors="pt")
            image_embs = features(model.get_image_features(pixel_values=image_inputs["pixel_values"]))
            image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
            text_embs = features(model.get_text_features(**text_inputs))
            text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
            expected.append(model.logit_scale.exp() * (text_embs @ image_embs.T)[0, 0])
    assert torch.allclose(scores, torch.stack(expected), atol=1e-4)
    # CLIP's initial logit scale, so the factor really is applied (not 1).
    assert math.isclose(float(model.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-4)


@pytest.mark.parametrize("name", ["clip_score", "hps", "pickscore", "aesthetic"])
def test_rewards_reject_bad_images_and_empty_prompts(name, clip_files, pickscore_dir, aesthetic_head):
    from alignprop_core.rewards.aesthetic import make_aesthetic
    from alignprop_core.rewards.clip_score import make_clip_score
    from alignprop_core.rewards.hps import make_hps
    from alignprop_core.rewards.pickscore import make_pickscore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reward = {
            "clip_score": lambda: make_clip_score(TINY, clip_files["tiny"]),
            "hps": lambda: make_hps(clip_files["hps"], arch=TINY),
            "pickscore": lambda: make_pickscore(pickscore_dir),
            "aesthetic": lambda: make_aesthetic(aesthetic_head, clip_checkpoint=clip_files["tiny768"],
                                                clip_arch=TINY_768),
        }[name]()
    images = _batch(64, 64)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(images * 2 - 1, PROMPTS)
    with pytest.raises(ValueError, match="prompts"):
        reward(images, PROMPTS[:1])
    if name != "aesthetic":
        with pytest.raises(ValueError, match="non-empty"):
            reward(images, ["a cat", "  "])
