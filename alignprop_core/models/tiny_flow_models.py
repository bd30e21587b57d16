"""Tiny, randomly initialised SD3/SD3.5 and FLUX.1 model folders, built locally, never downloaded.

Each is written by the real diffusers pipeline (`StableDiffusion3Pipeline` / `FluxPipeline`
.save_pretrained) from the real classes at very small widths, so the loaders, the backends and the
tests exercise exactly the code paths of the full models in well under a second per call on CPU.
The weights are a pure function of `seed`.

Geometry (both): VAE of two blocks (factor 2) with 16 latent channels, transformers of two layers
with attention heads of 8 features, CLIP tokenizers of 16 tokens, a T5 of two layers; a 32 x 32
image has 16 x 16 latents, i.e. 8 x 8 transformer tokens. The SD3 folder is SD3.5-like (query/key
RMS norm, one dual-attention layer); its CLIPs have different widths (32 and 48) so that a swapped
or misordered concatenation shows. The FLUX folder is FLUX.1-dev-like (distilled guidance input)
unless `guidance_embeds=False` (schnell-like).

The T5 tokenizer is a Unigram model over whole-word pieces for the prompt words plus single
characters, made in code with the `tokenizers` library (characters it lacks become <unk>).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                       SD3Transformer2DModel, StableDiffusion3Pipeline)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

from .tiny_model import DEFAULT_WORDS, build_tiny_tokenizer, ensure_model_folder, tiny_clip_config

# the scheduler_config.json of the real models
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                  "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True}
# the real VAEs' latent normalisation
SD3_VAE_NORM = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE_NORM = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
LATENT_CHANNELS = 16
T5_PIECE = "\u2581"  # SentencePiece's word-start marker


def build_tiny_t5_tokenizer(vocab_words: list[str] | None = None) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram, <pad>=0, </s>=1, <unk>=2, every sequence ends in </s>) built offline.

    Args:
        vocab_words: words that are single pieces; None uses tiny_model's animal/colour list.

    Returns:
        A `T5TokenizerFast` without sentinel tokens; any printable ASCII text tokenizes.
    """
    words = dict.fromkeys(w for text in (vocab_words or DEFAULT_WORDS) for w in str(text).split())
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (T5_PIECE, -8.0)]
    vocab += [(T5_PIECE + w, -2.0) for w in words]
    # whole words score far above their spelling, so a known word is always one piece
    vocab += [(chr(c), -10.0) for c in range(33, 127)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=T5_PIECE, prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement=T5_PIECE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    with tempfile.TemporaryDirectory(prefix="tiny-t5-tok-") as tmp:
        file = Path(tmp) / "tokenizer.json"
        tok.save(str(file))
        return T5TokenizerFast(tokenizer_file=str(file), extra_ids=0, model_max_length=512)


def _t5(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


def _vae(norm: dict[str, float]) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, use_quant_conv=False,
        use_post_quant_conv=False, **norm)


def _clip_ids(tokenizer: CLIPTokenizer) -> tuple[int, int, int, int]:
    return len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id


def build_tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True) -> StableDiffusion3Pipeline:
    """The tiny SD3.5-like pipeline in memory; weights depend only on `seed` (global RNG untouched).

    Args:
        seed: seed of the random initialisation.
        with_t5: False leaves out T5 (text_encoder_3/tokenizer_3 None), as SD3 allows.
    """
    tokenizer = build_tiny_tokenizer()
    tokenizer_3 = build_tiny_t5_tokenizer()
    clip_l, clip_g, t5_width = 32, 48, 96  # T5 is wider than both CLIPs together, as in SD3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModelWithProjection(tiny_clip_config(*_clip_ids(tokenizer), width=clip_l))
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_config(*_clip_ids(tokenizer), width=clip_g, hidden_act="gelu"))
        text_encoder_3 = _t5(tokenizer_3, t5_width)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=t5_width, caption_projection_dim=32,
            pooled_projection_dim=clip_l + clip_g, out_channels=LATENT_CHANNELS, pos_embed_max_size=32,
            dual_attention_layers=(0,), qk_norm="rms_norm")
        vae = _vae(SD3_VAE_NORM)
    if not with_t5:
        text_encoder_3 = tokenizer_3 = None
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=build_tiny_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """The tiny FLUX.1 pipeline in memory; weights depend only on `seed` (global RNG untouched).

    Args:
        seed: seed of the random initialisation.
        guidance_embeds: True: a distilled-guidance input (FLUX.1-dev-like); False: schnell-like.
    """
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    width = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(tiny_clip_config(*_clip_ids(tokenizer), width=width))
        text_encoder_2 = _t5(tokenizer_2, width)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=width,
            pooled_projection_dim=width, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
        vae = _vae(FLUX_VAE_NORM)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, transformer=transformer)


def ensure_tiny_sd3_dir(path: str | Path, seed: int = 0, with_t5: bool = True) -> Path:
    """Return a folder holding the tiny SD3 model, writing it (atomically) on first use.

    A folder that already holds model_index.json is returned as is, whatever its seed or T5.

    Raises:
        FileExistsError: `path` exists, is not empty and holds no model_index.json.
    """
    return ensure_model_folder(
        path, lambda tmp: build_tiny_sd3_pipeline(seed, with_t5).save_pretrained(tmp, safe_serialization=True))


def ensure_tiny_flux_dir(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Return a folder holding the tiny FLUX.1 model, writing it (atomically) on first use.

    A folder that already holds model_index.json is returned as is, whatever its seed or guidance.

    Raises:
        FileExistsError: `path` exists, is not empty and holds no model_index.json.
    """
    return ensure_model_folder(
        path, lambda tmp: build_tiny_flux_pipeline(seed, guidance_embeds).save_pretrained(
            tmp, safe_serialization=True))
