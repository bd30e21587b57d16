"""The toy world's data: procedurally drawn coloured shapes with captions, a pure function of a seed.

Every image shows 1-4 non-touching shapes of one kind (circle, square, triangle) and one colour on a
plain background, e.g. "three red circles on a black background". Shapes are drawn with 4x
supersampled coverage (soft edges) and never touch (a gap of at least two pixels), so their number
is also the number of connected components of the foreground. Colours get a small per-image
jitter so that a classifier trained on the world does not key on exact RGB values.

The caption grammar is small on purpose: `VOCABULARY` lists every word a caption can hold, and
`all_prompts` / `split_prompts` enumerate the grammar and split it into training and held-out
prompts with disjoint (count, colour, shape) combinations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

COUNT_WORDS = ("one", "two", "three", "four")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.13, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
}
MAX_COUNT = len(COUNT_WORDS)
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
VOCABULARY = tuple(COUNT_WORDS + COLOUR_NAMES + SHAPES + tuple(s + "s" for s in SHAPES)
                   + BACKGROUND_NAMES + ("on", "a", "background"))

SUPERSAMPLE = 4  # sub-pixels per pixel side used for the soft shape edges
GAP_PX = 2.0  # minimum free pixels between the bounding circles of two shapes
COLOUR_JITTER = 0.06  # max absolute per-channel change of shape and background colours
# shape radius range as a fraction of the image side (3.5-6 px at 32 px)
RADIUS_RANGE = (0.11, 0.19)
# radius of the circle that bounds each shape, in units of its nominal radius r
_BOUNDING = {"circle": 1.0, "square": 1.15, "triangle": 1.15}


@dataclass(frozen=True)
class Scene:
    """What one image shows; `render` draws it and `caption` describes it."""

    count: int  # number of shapes, 1..MAX_COUNT
    colour: str  # key of COLOURS
    shape: str  # one of SHAPES
    background: str  # key of BACKGROUNDS
    centres: tuple[tuple[float, float], ...]  # (x, y) in pixels, one per shape
    radii: tuple[float, ...]  # nominal radius in pixels, one per shape
    colour_rgb: tuple[float, float, float]  # jittered shape colour
    background_rgb: tuple[float, float, float]  # jittered background colour

    @property
    def caption(self) -> str:
        return caption_for(self.count, self.colour, self.shape, self.background)

    @property
    def labels(self) -> tuple[int, int, int, int]:
        """(count - 1, colour index, shape index, background index): the classifier's targets."""
        return (self.count - 1, COLOUR_NAMES.index(self.colour), SHAPES.index(self.shape),
                BACKGROUND_NAMES.index(self.background))


def caption_for(count: int, colour: str, shape: str, background: str) -> str:
    """E.g. caption_for(3, "red", "circle", "black") == "three red circles on a black background"."""
    noun = shape if count == 1 else shape + "s"
    return f"{COUNT_WORDS[count - 1]} {colour} {noun} on a {background} background"


def parse_caption(text: str) -> dict[str, int | str | None]:
    """The count, colour, shape and background a prompt asks for (None where it names none).

    Words are matched anywhere in the text, so "two blue squares" and the full caption both parse.
    """
    words = text.lower().replace(",", " ").split()
    out: dict[str, int | str | None] = {"count": None, "colour": None, "shape": None, "background": None}
    for i, word in enumerate(words):
        if word in COUNT_WORDS and out["count"] is None:
            out["count"] = COUNT_WORDS.index(word) + 1
        elif word.rstrip("s") in SHAPES and out["shape"] is None:
            out["shape"] = word.rstrip("s")
        elif word in BACKGROUNDS and i + 1 < len(words) and words[i + 1] == "background":
            out["background"] = word
        elif word in COLOURS and out["colour"] is None:
            out["colour"] = word
    return out


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))


def _choice(gen: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (), generator=gen))


def _jitter(rgb: tuple[float, float, float], gen: torch.Generator) -> tuple[float, float, float]:
    return tuple(min(max(c + _uniform(gen, -COLOUR_JITTER, COLOUR_JITTER), 0.0), 1.0) for c in rgb)


def _place(gen: torch.Generator, count: int, shape: str, size: int, gap: float = GAP_PX
           ) -> tuple[tuple[tuple[float, float], ...], tuple[float, ...]]:
    """Centres and radii of `count` shapes whose bounding circles keep `gap` px apart (a negative
    gap lets them overlap by up to that much) and stay inside."""
    lo, hi = RADIUS_RANGE
    for attempt in range(200):
        shrink = 1.0 - 0.3 * min(attempt / 100, 1.0)  # crowded draws retry with smaller shapes
        centres: list[tuple[float, float]] = []
        radii: list[float] = []
        for _ in range(count):
            r = _uniform(gen, lo, hi) * size * shrink
            reach = r * _BOUNDING[shape]
            for _ in range(50):
                x, y = _uniform(gen, reach + 1, size - reach - 1), _uniform(gen, reach + 1, size - reach - 1)
                if all(math.hypot(x - cx, y - cy) >= reach + cr * _BOUNDING[shape] + gap
                       for (cx, cy), cr in zip(centres, radii)):
                    centres.append((x, y))
                    radii.append(r)
                    break
            else:
                break
        if len(centres) == count:
            return tuple(centres), tuple(radii)
    raise RuntimeError(f"could not place {count} {shape}s in a {size}px image")


def random_scene(gen: torch.Generator, size: int = 32, count: int | None = None,
                 colour: str | None = None, shape: str | None = None,
                 background: str | None = None, gap: float = GAP_PX) -> Scene:
    """Draw a scene; any attribute given is kept, the others are drawn from `gen`. With `gap` below
    GAP_PX shapes may touch or overlap, so `count` is no longer the number of separate blobs."""
    count = count if count is not None else 1 + _choice(gen, MAX_COUNT)
    colour = colour if colour is not None else COLOUR_NAMES[_choice(gen, len(COLOURS))]
    shape = shape if shape is not None else SHAPES[_choice(gen, len(SHAPES))]
    background = background if background is not None else BACKGROUND_NAMES[_choice(gen, len(BACKGROUNDS))]
    centres, radii = _place(gen, count, shape, size, gap)
    return Scene(count, colour, shape, background, centres, radii,
                 _jitter(COLOURS[colour], gen), _jitter(BACKGROUNDS[background], gen))


def _coverage(scene: Scene, size: int) -> torch.Tensor:
    """(size, size) fraction of each pixel covered by the scene's shapes."""
    n = size * SUPERSAMPLE
    coords = (torch.arange(n, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # sub-pixel centres in px
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    mask = torch.zeros(n, n, dtype=torch.bool)
    for (cx, cy), r in zip(scene.centres, scene.radii):
        dx, dy = x - cx, y - cy
        if scene.shape == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif scene.shape == "square":
            half = r * 0.8
            inside = (dx.abs() <= half) & (dy.abs() <= half)
        else:  # upward triangle: apex at (0, -r), base at y = 0.6 r from x = -0.95 r to 0.95 r
            base, half_w = 0.6 * r, 0.95 * r
            inside = (dy <= base) & (dx.abs() * (base + r) <= half_w * (dy + r))
        mask |= inside
    return mask.float().reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(dim=(1, 3))


def render(scene: Scene, size: int = 32) -> torch.Tensor:
    """(3, size, size) float image in [0, 1]."""
    cover = _coverage(scene, size)
    fg = torch.tensor(scene.colour_rgb).view(3, 1, 1)
    bg = torch.tensor(scene.background_rgb).view(3, 1, 1)
    return bg + (fg - bg) * cover


def generate(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, list[Scene]]:
    """`n` images (n, 3, size, size) in [0, 1] and their scenes; the same seed gives the same set."""
    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scene(gen, size) for _ in range(n)]
    images = torch.stack([render(s, size) for s in scenes]) if scenes else torch.empty(0, 3, size, size)
    return images, scenes


def all_prompts() -> list[str]:
    """Every caption of the grammar (4 counts x 4 colours x 3 shapes x 3 backgrounds = 144)."""
    return [caption_for(c, col, s, b) for c in range(1, MAX_COUNT + 1) for col in COLOUR_NAMES
            for s in SHAPES for b in BACKGROUND_NAMES]


def is_held_out(count: int, colour: str, shape: str) -> bool:
    """A quarter of the (count, colour, shape) combinations, balanced over every attribute value,
    is held out: AlignProp never trains on them, the demo evaluates on them."""
    return (count - 1 + COLOUR_NAMES.index(colour) + SHAPES.index(shape)) % 4 == 0


def _round_robin_counts(prompts: list[str]) -> list[str]:
    """Reorder so that consecutive prompts cycle through the counts 1, 2, 3, 4 (any 8 in a row,
    e.g. the demo's before/after grid, show every count twice) and through the backgrounds."""
    by_count: dict[int, list[str]] = {}
    for prompt in prompts:
        by_count.setdefault(parse_caption(prompt)["count"], []).append(prompt)

    def key(prompt: str) -> tuple[int, str]:  # background index shifted by count: neighbours differ
        p = parse_caption(prompt)
        return ((BACKGROUND_NAMES.index(p["background"]) - p["count"]) % len(BACKGROUNDS), prompt)

    columns = [sorted(by_count[c], key=key) for c in sorted(by_count)]
    out = []
    for i in range(max(len(c) for c in columns)):
        out += [c[i] for c in columns if i < len(c)]
    return out


def split_prompts() -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts) of the grammar; their (count, colour, shape)
    combinations are disjoint. Both lists cycle through the counts (see `_round_robin_counts`);
    they are shipped as alignprop_core/data/toy_train.txt and toy_eval.txt."""
    train, held_out = [], []
    for prompt in all_prompts():
        p = parse_caption(prompt)
        (held_out if is_held_out(p["count"], p["colour"], p["shape"]) else train).append(prompt)
    return _round_robin_counts(train), _round_robin_counts(held_out)
