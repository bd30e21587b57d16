"""A tiny, randomly initialised SD1.x-architecture model that is built locally, never downloaded.

It uses the real classes (CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, AutoencoderKL) with
very small widths, so tests, CI and the ComfyUI smoke workflow exercise exactly the code paths of
SD1.5 in well under a second on CPU. The weights are a pure function of `seed`.

Geometry: prompts of 16 tokens, text width 32, latents 4 x 16 x 16, images 3 x 32 x 32.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import unicodedata
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from alignprop_core.models.t2i_model import T2IModel, save_t2i_model

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16
END_OF_WORD = "</w>"

DEFAULT_WORDS = (
    "a an the photo picture painting of on in with and "
    "cat dog horse cow sheep pig goat rabbit mouse bird duck chicken owl fish frog turtle "
    "lion tiger bear elephant monkey fox wolf deer zebra giraffe "
    "blue red green yellow white black background grass field"
).split()

TINY_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}

# Runs of letters are what CLIP's pre-tokenizer keeps together; anything else can never be one token.
_WORD_RE = re.compile(r"[^\W\d_]+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map, so every byte has a visible BPE symbol."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _write_tokenizer_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _load_tokenizer(folder: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def build_tiny_tokenizer(vocab_words: list[str] | None = None) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over bytes plus whole-word tokens for `vocab_words`.

    Every known word becomes one token; any other text still tokenizes, into byte-level characters.

    Args:
        vocab_words: words (or whole prompts; letter runs are extracted and lower-cased) that must be
            single tokens. None uses a built-in list of animals, colours and prompt glue words.

    Returns:
        A `CLIPTokenizer` with model_max_length 16, pad token `<|endoftext|>`.
    """
    encode_bytes = _bytes_to_unicode()
    byte_chars = list(encode_bytes.values())
    words: dict[str, str] = {}  # word -> its byte-level symbols (insertion order is the vocab order)
    for text in DEFAULT_WORDS if vocab_words is None else vocab_words:
        # Same normalisation as CLIPTokenizer's (NFC, lower case) so the words match at encode time.
        for word in _WORD_RE.findall(unicodedata.normalize("NFC", str(text)).lower()):
            symbols = "".join(encode_bytes[b] for b in word.encode("utf-8"))
            if len(symbols) > 1:
                words.setdefault(word, symbols)

    vocab_list = byte_chars + [c + END_OF_WORD for c in byte_chars]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(vocab_list)}
    merges: list[tuple[str, str]] = []
    merges_seen: set[tuple[str, str]] = set()

    def add_chain(pieces: list[str]) -> None:
        # Appending merges after all existing ones cannot change words that already reduce to one
        # token (their merge sequence never reaches the new, lowest-priority merges).
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges_seen:
                merges.append((left, right))
                merges_seen.add((left, right))
            left = left + right
            if left not in vocab:
                vocab[left] = len(vocab)

    for symbols in words.values():
        add_chain(list(symbols[:-1]) + [symbols[-1] + END_OF_WORD])

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tok-") as tmp:
        folder = Path(tmp)
        # Earlier merges can split a later word differently than char by char (e.g. "at</w>" inside
        # "cat"); re-tokenize and chain the pieces that came out until every word is one token.
        for _ in range(1 + max((len(s) for s in words.values()), default=0)):
            tok = _load_tokenizer(_write_with_specials(folder, vocab, merges))
            split = [(w, tok.tokenize(w)) for w in words]
            split = [(w, p) for w, p in split if len(p) != 1]
            if not split:
                return tok
            for _, pieces in split:
                add_chain(pieces)
        raise RuntimeError(f"BPE merges did not converge for words {[w for w, _ in split]}; "
                           "drop them from vocab_words (they still tokenize, just into pieces).")


def _write_with_specials(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> Path:
    # Special tokens go last, as in OpenAI CLIP (ids 49406/49407 there).
    full = dict(vocab)
    full[BOS] = len(full)
    full[EOS] = len(full)
    _write_tokenizer_files(folder, full, merges)
    return folder


def tiny_clip_config(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, width: int = 32,
                     hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    """A 2-layer CLIP text transformer of `width` features (projection too) over MAX_TOKENS tokens."""
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, projection_dim=width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
        hidden_act=hidden_act, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)


def _build_networks(vocab_size: int, bos_id: int, eos_id: int, pad_id: int
                    ) -> tuple[CLIPTextModel, UNet2DConditionModel, AutoencoderKL]:
    text_encoder = CLIPTextModel(tiny_clip_config(vocab_size, bos_id, eos_id, pad_id))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1, norm_num_groups=8, sample_size=32, scaling_factor=0.18215)
    return text_encoder, unet, vae


def build_tiny_model(seed: int = 0, vocab_words: list[str] | None = None) -> T2IModel:
    """Build the tiny model; the weights depend only on `seed` (the global RNG is left untouched).

    Args:
        seed: seed of the random initialisation.
        vocab_words: words the tokenizer keeps whole (see `build_tiny_tokenizer`).

    Returns:
        A frozen (eval, requires_grad False) float32 CPU `T2IModel`.
    """
    tokenizer = build_tiny_tokenizer(vocab_words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder, unet, vae = _build_networks(
            len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for net in (text_encoder, unet, vae):
        net.requires_grad_(False)
        net.eval()
    return T2IModel(tokenizer, text_encoder, unet, vae, dict(TINY_SCHEDULER_CONFIG))


def ensure_tiny_model_dir(path: str | Path, seed: int = 0,
                          vocab_words: list[str] | None = None) -> Path:
    """Return a diffusers-format folder holding the tiny model, building it on first use.

    The model is written to a sibling temp folder and renamed into place, so an interrupted run
    never leaves a half-written model behind.

    Args:
        path: target folder; if it already holds model_index.json it is returned as is.
        seed: seed used when the model has to be built.
        vocab_words: words the tokenizer keeps whole when the model has to be built.

    Returns:
        `path` as a Path.

    Raises:
        FileExistsError: `path` exists, is not empty and holds no model_index.json.
    """
    return ensure_model_folder(path, lambda tmp: save_t2i_model(build_tiny_model(seed, vocab_words), tmp))


def ensure_model_folder(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Return `path` if it holds model_index.json, else fill it atomically with `write`.

    `write(tmp)` writes a whole model folder into a sibling temp folder, which is then renamed onto
    `path`: the folder appears complete or not at all, and a concurrent builder's folder is kept.

    Raises:
        FileExistsError: `path` exists, is not empty and holds no model_index.json.
    """
    path = Path(path).expanduser()
    if (path / "model_index.json").is_file():
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{str(path)!r} exists but holds no model_index.json; remove it or "
                              "choose another folder for the tiny model.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        try:
            if path.is_dir():
                path.rmdir()  # known empty; Windows cannot rename onto an existing folder
            os.replace(tmp, path)  # atomic rename: the folder appears complete or not at all
        except OSError:
            # Another process finished first; its folder is as good as ours.
            if not (path / "model_index.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
