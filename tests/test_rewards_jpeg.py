"""The JPEG-size surrogate tracks Pillow's real sizes, steers ascent the right way, and checks input."""
from __future__ import annotations

import math

import pytest
import torch

from alignprop_core.rewards.jpeg import (
    CHROMA_QTABLE, LUMA_QTABLE, dct_matrix, estimate_jpeg_size_kb, jpeg_size_kb, make_jpeg_compressibility,
    make_jpeg_incompressibility, scaled_qtable)

pytestmark = pytest.mark.usefixtures("one_thread")




def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflected borders."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _gradient(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A linear colour ramp in a random direction, (3, H, W)."""
    angle = float(torch.rand(1, generator=g)) * 2 * math.pi
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ramp = (math.cos(angle) * xx + math.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    a, b = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
    return a + (b - a) * ramp


def _shapes(g: torch.Generator, h: int, w: int, n: int, background: torch.Tensor) -> torch.Tensor:
    """`n` random flat-coloured rectangles and discs painted over `background` (3, H, W)."""
    img = background.clone()
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(n):
        colour = torch.rand(3, 1, 1, generator=g)
        cy, cx = float(torch.rand(1, generator=g)) * h, float(torch.rand(1, generator=g)) * w
        size = 4 + float(torch.rand(1, generator=g)) * min(h, w) / 3
        if i % 2:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < size ** 2
        else:
            mask = ((yy - cy).abs() < size) & ((xx - cx).abs() < size * 0.7)
        img = torch.where(mask, colour, img)
    return img


def _checkerboard(g: torch.Generator, h: int, w: int, period: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = ((yy // period + xx // period) % 2).bool()
    return torch.where(mask, torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g))


def varied_images(seed: int) -> list[torch.Tensor]:
    """A deterministic mix of noise, filtered noise, ramps, shapes, blurs and checkerboards."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(64, 64)] * 4 + [(128, 128), (48, 96)]
    out: list[torch.Tensor] = []
    for k, (h, w) in enumerate(sizes):
        mid = torch.full((3, 1, 1), 0.5)
        for amp in (0.02, 0.08, 0.25, 0.5):
            out.append(mid + amp * (torch.rand(3, h, w, generator=g) - 0.5) * 2)
        for sigma in (0.7, 1.5, 3.0, 6.0):
            noise = torch.rand(1, 3, h, w, generator=g)
            low = _gaussian_blur(noise, sigma)[0]
            low = (low - low.mean()) / low.std() * 0.15 + 0.5
            out.append(low)
        ramp = _gradient(g, h, w)
        out.append(ramp)
        flat = torch.rand(3, 1, 1, generator=g).expand(3, h, w)
        out.append(_shapes(g, h, w, 3 + 3 * (k % 3), flat))
        on_ramp = _shapes(g, h, w, 6, _gradient(g, h, w))
        out.append(on_ramp)
        out.append(_gaussian_blur(on_ramp[None], 1.0 + k % 3)[0])
        out.append(_checkerboard(g, h, w, (1, 2, 4, 8, 3, 16)[k]))
        out.append(_checkerboard(g, h, w, (5, 8, 2, 1, 6, 4)[k]))
        mix = 0.7 * on_ramp + 0.3 * torch.rand(3, h, w, generator=g)
        out.append(mix)
        out.append(ramp + 0.05 * torch.randn(3, h, w, generator=g))
    return [img.clamp(0, 1) for img in out]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 (ties broken by order; the sizes here are continuous)."""
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
    return r


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_surrogate_ranks_images_like_pillow():
    images = varied_images(seed=0)
    assert len(images) >= 90
    est = torch.tensor([float(estimate_jpeg_size_kb(img[None])) for img in images], dtype=torch.float64)
    real = torch.tensor([jpeg_size_kb(img[None])[0] for img in images], dtype=torch.float64)
    spearman = _pearson(_ranks(est), _ranks(real))
    pearson = _pearson(est, real)
    print(f"spearman={spearman:.4f} pearson={pearson:.4f} over {len(images)} images")
    assert spearman >= 0.9
    assert pearson >= 0.9


def _ascend(reward, image: torch.Tensor, steps: int = 50, lr: float = 0.01) -> torch.Tensor:
    """Adam ascent of `reward` on the pixels, kept in [0, 1]."""
    x = image.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-reward(x, ["p"] * len(x)).sum()).backward()
        opt.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    return x.detach()


@pytest.fixture(scope="module")
def noisy_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (0.5 + 0.1 * (torch.rand(1, 3, 64, 64, generator=g) * 2 - 1)).clamp(0, 1)


def test_compressibility_ascent_shrinks_real_jpeg(noisy_image):
    before = jpeg_size_kb(noisy_image)[0]
    after = jpeg_size_kb(_ascend(make_jpeg_compressibility(), noisy_image))[0]
    print(f"compressibility ascent: {before:.3f} kB -> {after:.3f} kB")
    assert after <= 0.8 * before


def test_incompressibility_ascent_grows_real_jpeg(noisy_image):
    before = jpeg_size_kb(noisy_image)[0]
    after = jpeg_size_kb(_ascend(make_jpeg_incompressibility(), noisy_image))[0]
    print(f"incompressibility ascent: {before:.3f} kB -> {after:.3f} kB")
    assert after >= 1.2 * before


@pytest.mark.parametrize("shape, dtype", [((3, 3, 64, 64), torch.float32), ((2, 3, 37, 45), torch.float32),
                                          ((1, 3, 16, 24), torch.float64)])
def test_rewards_return_b_scores_with_gradients(shape, dtype):
    images = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=dtype).requires_grad_(True)
    prompts = ["p"] * shape[0]
    comp = make_jpeg_compressibility()(images, prompts)
    assert comp.shape == (shape[0],) and comp.dtype == dtype and torch.isfinite(comp).all()
    incomp = make_jpeg_incompressibility(quality=80)(images, prompts)
    assert torch.isfinite(incomp).all() and (incomp > 0).all()
    torch.testing.assert_close(-comp, estimate_jpeg_size_kb(images, 95))
    comp.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # Every image gets its own gradient, including the rows/columns that padding replicates.
    assert (images.grad.flatten(1).abs().sum(1) > 0).all()
    assert images.grad[..., -1, :].abs().sum() > 0 and images.grad[..., :, -1].abs().sum() > 0


@pytest.mark.parametrize("quality", [95, 50, 10])
def test_quantisation_tables_match_pillow(quality):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", quality=quality)
    tables = Image.open(buffer).quantization  # natural (row-major) order, like ours
    assert list(tables[0]) == scaled_qtable(LUMA_QTABLE, quality).flatten().int().tolist()
    assert list(tables[1]) == scaled_qtable(CHROMA_QTABLE, quality).flatten().int().tolist()


def test_dct_is_orthonormal_dct_ii():
    d = dct_matrix()
    torch.testing.assert_close(d @ d.T, torch.eye(8, dtype=torch.float64))
    # A flat block of value v has DC 8 v (T.81 A.3.3 with C(0) = 1/sqrt(2)) and no AC.
    coefs = d @ torch.full((8, 8), 3.0, dtype=torch.float64) @ d.T
    assert abs(float(coefs[0, 0]) - 24.0) < 1e-9 and coefs.flatten()[1:].abs().max() < 1e-9


def test_real_size_uses_pillow_defaults():
    flat = torch.full((2, 3, 16, 16), 0.5)
    sizes = jpeg_size_kb(flat)
    assert len(sizes) == 2 and 0.5 < sizes[0] < 0.8
    assert abs(float(estimate_jpeg_size_kb(flat)[0]) - sizes[0]) < 0.02


@pytest.mark.parametrize("quality", [0, 101, 95.5, "95", True, float("nan")])
def test_bad_quality_names_the_field(quality):
    with pytest.raises(ValueError, match="quality"):
        make_jpeg_compressibility(quality)
    with pytest.raises(ValueError, match="quality"):
        make_jpeg_incompressibility(quality=quality)
    with pytest.raises(ValueError, match="quality"):
        jpeg_size_kb(torch.zeros(1, 3, 8, 8), quality)


def test_bad_images_are_rejected():
    reward = make_jpeg_compressibility()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reward(torch.full((1, 3, 8, 8), 1.5), ["p"])
    with pytest.raises(ValueError, match="shape"):
        reward(torch.zeros(1, 8, 8, 3), ["p"])
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.zeros(2, 3, 8, 8), ["p"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        jpeg_size_kb(torch.full((1, 3, 8, 8), -0.5))
