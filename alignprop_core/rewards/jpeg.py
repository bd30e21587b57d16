"""JPEG (in)compressibility rewards with a differentiable surrogate of the encoded file size.

AlignProp (Prabhudesai et al., 2023, arXiv:2310.03739) and DDPO (Black et al., 2023,
arXiv:2305.13301) reward images by their JPEG file size in kB at quality 95: ``-size`` for
compressibility, ``+size`` for incompressibility. A real encoder is not differentiable, so this
module models the baseline JPEG pipeline of ITU-T T.81 (ISO/IEC 10918-1) as Pillow/libjpeg runs it
for ``img.save(buf, "JPEG", quality=95)``, step by step, and makes only the entropy coding smooth:

1. RGB in [0, 255] -> YCbCr with the JFIF matrix, then 4:2:0 chroma subsampling by 2x2 averaging
   (Pillow's default at every quality); planes are padded by edge replication to whole 16x16 MCUs.
2. Level shift by -128 and orthonormal 8x8 DCT-II per block (T.81 A.3.3; the T.81 FDCT *is* the
   orthonormal DCT), computed as ``D @ X @ D.T``.
3. Division by the T.81 Annex K luminance/chrominance tables scaled by the IJG quality formula
   (``jpeg_set_quality``: scale = 5000/q below 50, else 200 - 2q; entries clamped to [1, 255]).
4. Rate. Baseline Huffman coding (T.81 F.1.2) spends on each non-zero AC coefficient of size
   category s = ceil(log2(|q| + 1)) a (run, size) code of about s bits plus s magnitude bits, and
   nothing on a coefficient that rounds to zero; DC differences are coded the same way. Here
   "rounds to non-zero" becomes ``sigmoid((|q| - 0.5) / tau)`` and s becomes ``log2(1 + |q|)``
   with ``|q| = sqrt(q^2 + eps)``, so every term has a gradient. Each block adds a constant for its
   end-of-block code, and the file adds the header bytes of Pillow's output.

The per-coefficient constants below were read off the standard Huffman tables (T.81 Tables K.3-K.6)
and then adjusted by least squares against Pillow's sizes on a seeded set of synthetic images
(seeds 1-3 of the test generator, not the tests' seed 0). On the tests' images the estimate ranks
like the real size with Spearman 0.98 at quality 95; the constants were fitted at quality 95 only
and give 0.95-0.98 from quality 25 to 100.
"""
from __future__ import annotations

import io
import numbers
from typing import Sequence

import torch

from .base import RewardFn, check_images

# T.81 Table K.1 / K.2, row-major (not zig-zag) so they line up with the DCT output.
LUMA_QTABLE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)
CHROMA_QTABLE = (
    17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99, 47, 66, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
    99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99, 99,
)

# Rate model, in bits. The standard AC tables spend ~3 bits on |q| = 1 and ~2 more per doubling;
# the values are that reading refitted by least squares (relative error) on seeded synthetic images.
AC_BASE = 2.2  # bits for any non-zero AC coefficient (its share of the run/size code)
AC_PER_LOG2 = 1.85  # bits per doubling of |q| (size code growth plus magnitude bits)
DC_BASE = (2.5, 2.0)  # (luma, chroma) bits of the DC size code for a small difference
DC_PER_LOG2 = 1.8  # bits per doubling of the DC difference
EOB_BITS = (4.0, 2.0)  # (luma, chroma) end-of-block code length (T.81 Tables K.5, K.6)
NONZERO_TAU = 0.1  # width of the soft "rounds to non-zero" step, in quantisation units
ABS_EPS = 1e-2  # smooths |q| at 0 so the gradient stays finite
HEADER_BYTES = 625.0  # SOI, JFIF, DQT, SOF0, DHT, SOS and EOI as Pillow writes them at 4:2:0
STUFFING = 1.0 + 1.0 / 256.0  # a 0x00 is stuffed after every 0xFF byte of entropy-coded data


def check_quality(quality: int) -> int:
    """Return `quality` as an int, or raise a ValueError unless it is an integer in [1, 100]."""
    if (isinstance(quality, bool) or not isinstance(quality, numbers.Real)
            or not float(quality).is_integer() or not 1 <= quality <= 100):
        raise ValueError(f"quality must be an integer in [1, 100] (JPEG quality as in Pillow); "
                         f"got {quality!r}.")
    return int(quality)


def scaled_qtable(base: Sequence[int], quality: int) -> torch.Tensor:
    """Scale a T.81 quantisation table for `quality` exactly as libjpeg's ``jpeg_set_quality`` does.

    Args:
        base: the 64 entries of a quality-50 table, row-major.
        quality: JPEG quality in [1, 100].

    Returns:
        (8, 8) float64 tensor of divisors in [1, 255].
    """
    quality = check_quality(quality)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    table = [min(max((b * scale + 50) // 100, 1), 255) for b in base]
    return torch.tensor(table, dtype=torch.float64).reshape(8, 8)


def dct_matrix(n: int = 8) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): ``D @ x`` transforms a column, ``D @ X @ D.T`` a block."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    d = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2.0 / n) ** 0.5
    d[0] /= 2.0 ** 0.5
    return d


def _pad_edge(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) on the bottom/right to a multiple, replicating the edge like libjpeg."""
    ph, pw = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    if ph == 0 and pw == 0:
        return x
    return torch.nn.functional.pad(x, (0, pw, 0, ph), mode="replicate")


def _blocks(plane: torch.Tensor) -> torch.Tensor:
    """(B, H, W) with H, W multiples of 8 -> (B, H/8, W/8, 8, 8) blocks."""
    b, h, w = plane.shape
    return plane.reshape(b, h // 8, 8, w // 8, 8).transpose(2, 3)


def _soft_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + ABS_EPS)


def _block_bits(q: torch.Tensor, channel: int) -> torch.Tensor:
    """Estimated bits of quantised blocks (B, N, 8, 8) given in scan order; returns (B,)."""
    mag = _soft_abs(q.flatten(2)[..., 1:])  # (B, N, 63) AC magnitudes
    nonzero = torch.sigmoid((mag - 0.5) / NONZERO_TAU)
    ac_bits = (nonzero * (AC_BASE + AC_PER_LOG2 * torch.log2(1 + mag))).sum((1, 2))
    # DC is coded as the difference to the previous block of the same component (T.81 F.1.2.1),
    # the first one against 0.
    dc = q[..., 0, 0]  # (B, N)
    diff = _soft_abs(dc - torch.nn.functional.pad(dc[:, :-1], (1, 0)))
    dc_bits = (DC_BASE[channel] + DC_PER_LOG2 * torch.log2(1 + diff)).sum(1)
    return ac_bits + dc_bits + EOB_BITS[channel] * q.shape[1]


def _quantised_blocks(plane: torch.Tensor, table: torch.Tensor, mcu_luma: bool) -> torch.Tensor:
    """(B, H, W) level-shifted plane -> quantised DCT blocks (B, N, 8, 8) in the encoder's order."""
    d = dct_matrix()
    # D X D^T on a row-major flattened block is kron(D, D) @ x; folding the quantiser divisors into
    # that (64, 64) matrix makes transform plus quantisation a single matmul.
    transform = (torch.kron(d, d) / table.reshape(64, 1)).to(plane)
    blocks = _blocks(plane)  # (B, H/8, W/8, 8, 8)
    b, ny, nx = blocks.shape[:3]
    if mcu_luma:
        # With 4:2:0 each MCU holds a 2x2 group of luma blocks, scanned row by row inside the MCU.
        blocks = blocks.reshape(b, ny // 2, 2, nx // 2, 2, 8, 8).permute(0, 1, 3, 2, 4, 5, 6)
    return (blocks.reshape(b, -1, 64) @ transform.T).reshape(b, -1, 8, 8)


def estimate_jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Differentiable estimate of the JPEG file size Pillow writes for each image.

    Args:
        images: (B, 3, H, W) RGB in [0, 1], any float dtype and size.
        quality: JPEG quality in [1, 100], as in Pillow's ``save(..., quality=...)``.

    Returns:
        (B,) estimated size in kB (1 kB = 1000 bytes, as in DDPO), same dtype as `images`.
    """
    quality = check_quality(quality)
    check_images(images)
    x = _pad_edge(images * 255.0, 16)  # (B, 3, H16, W16): whole 16x16 MCUs
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b  # +128 offset and -128 level shift cancel
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b
    chroma = torch.nn.functional.avg_pool2d(torch.stack([cb, cr], 1), 2)  # (B, 2, H16/2, W16/2)
    luma_q = scaled_qtable(LUMA_QTABLE, quality)
    chroma_q = scaled_qtable(CHROMA_QTABLE, quality)
    bits = 0.0
    for plane, table, channel, mcu in ((y - 128.0, luma_q, 0, True), (chroma[:, 0], chroma_q, 1, False),
                                       (chroma[:, 1], chroma_q, 1, False)):
        q = _quantised_blocks(plane, table, mcu)
        bits = bits + _block_bits(q, channel)
    return (bits / 8.0 * STUFFING + HEADER_BYTES) / 1000.0


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> list[float]:
    """Real JPEG size of each image as Pillow writes it (default 4:2:0 subsampling), in kB.

    Images are rounded to uint8 first, as DDPO's ``jpeg_compressibility`` does.

    Args:
        images: (B, 3, H, W) RGB in [0, 1].
        quality: JPEG quality in [1, 100].

    Returns:
        One size per image in kB (1000 bytes).
    """
    from PIL import Image

    quality = check_quality(quality)
    check_images(images)
    arrays = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return sizes


def make_jpeg_compressibility(quality: int = 95) -> RewardFn:
    """Reward = -estimated JPEG size in kB at `quality`: higher for images that compress well."""
    quality = check_quality(quality)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        return -estimate_jpeg_size_kb(images, quality)

    return reward


def make_jpeg_incompressibility(quality: int = 95) -> RewardFn:
    """Reward = +estimated JPEG size in kB at `quality`: higher for detailed, noisy images."""
    quality = check_quality(quality)

    def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images, prompts)
        return estimate_jpeg_size_kb(images, quality)

    return reward
