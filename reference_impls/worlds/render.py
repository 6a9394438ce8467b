"""ShapeWorld renderer: ground-truth images for prompts, and the physical constants of the world.

Objects are solid, single-colour filled shapes on a white background. The palette colours are far
from each other and from white (at least 0.75 apart in RGB units of [0,1]) so that an evaluator can
tell them apart even in noisy model samples. Shapes never overlap and keep a gap of ``GAP`` empty
pixels (so each object is its own connected component) and a 1-pixel border. Relations are realised
with a clear margin: for "A left of B" the centre of A is at least ``RENDER_RELATION_MARGIN`` pixels
left of the centre of B.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

from .grammar import PromptSpec, Relation, as_spec

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (217, 26, 26),
    "green": (26, 166, 26),
    "blue": (26, 51, 217),
    "yellow": (242, 217, 26),
}
# Object extents (bounding-box side in pixels) on a 32x32 canvas; scaled for other sizes. Objects
# without a size adjective get a jittered medium extent, kept away from the small/big extents so that
# the evaluator's size thresholds (midway) are never ambiguous on renders.
SMALL_EXTENT = 6
MEDIUM_EXTENTS = (8, 9, 10)
BIG_EXTENT = 12
REFERENCE_SIZE = 32
GAP = 2  # empty pixels between objects: blur cannot merge two same-coloured objects into one
BORDER = 1
RENDER_RELATION_MARGIN = 4.0
_MAX_LAYOUT_TRIES = 5000


@dataclass(frozen=True)
class PlacedObject:
    """One rendered object instance: top-left corner (y, x) and side ``extent`` of its bounding box."""

    colour: str
    shape: str
    y: int
    x: int
    extent: int
    phrase: int  # index of the ObjectSpec in the prompt spec it realises

    @property
    def centre(self) -> tuple[float, float]:
        """(y, x) centre of the bounding box in pixel coordinates (pixel i spans [i, i+1))."""
        return (self.y + self.extent / 2.0, self.x + self.extent / 2.0)


def _scaled(extent: int, size: int) -> int:
    return max(3, int(round(extent * size / REFERENCE_SIZE)))


@cache
def shape_mask(shape: str, extent: int) -> np.ndarray:
    """Boolean ``extent x extent`` mask of a filled shape, sampled at pixel centres.

    Triangles point up (apex at the top centre, base on the bottom row) so the evaluator can use the
    vertical centroid as a shape cue; row r of the triangle is (r+1)/extent of the full width, which
    keeps a non-empty apex row even for small extents.
    """
    centres = np.arange(extent) + 0.5
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    half = extent / 2.0
    if shape == "square":
        mask = np.ones((extent, extent), dtype=bool)
    elif shape == "circle":
        mask = (yy - half) ** 2 + (xx - half) ** 2 <= half**2
    elif shape == "triangle":
        half_width = (np.arange(extent)[:, None] + 1) / extent * half
        mask = np.abs(xx - half) <= half_width + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask.setflags(write=False)
    return mask


def _extent_for(size_word: str | None, size: int, rng: np.random.Generator) -> int:
    if size_word == "small":
        return _scaled(SMALL_EXTENT, size)
    if size_word == "big":
        return _scaled(BIG_EXTENT, size)
    return _scaled(int(rng.choice(MEDIUM_EXTENTS)), size)


def _separated(a: PlacedObject, b: PlacedObject) -> bool:
    """True when at least GAP empty pixels separate the two bounding boxes along x or y."""
    return (
        a.x + a.extent + GAP <= b.x
        or b.x + b.extent + GAP <= a.x
        or a.y + a.extent + GAP <= b.y
        or b.y + b.extent + GAP <= a.y
    )


def relation_holds(name: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Whether centre ``a`` is ``name`` of centre ``b`` by at least ``margin`` pixels ((y, x) pairs)."""
    (ay, ax), (by, bx) = a, b
    if name == "left of":
        return bx - ax >= margin
    if name == "right of":
        return ax - bx >= margin
    if name == "above":
        return by - ay >= margin
    if name == "below":
        return ay - by >= margin
    raise ValueError(f"unknown relation {name!r}")


def layout(
    spec: PromptSpec | str, rng: np.random.Generator, size: int = REFERENCE_SIZE
) -> list[PlacedObject]:
    """Random non-overlapping placement of every object instance of ``spec`` (rejection sampling)."""
    spec = as_spec(spec)
    instances: list[tuple[str, str, int, int]] = []
    for phrase, obj in enumerate(spec.objects):
        for _ in range(obj.count):
            instances.append((obj.colour, obj.shape, _extent_for(obj.size, size, rng), phrase))
    relation: Relation | None = spec.relation
    margin = RENDER_RELATION_MARGIN * size / REFERENCE_SIZE
    for _ in range(_MAX_LAYOUT_TRIES):
        placed: list[PlacedObject] = []
        for colour, shape, extent, phrase in instances:
            high = size - BORDER - extent + 1  # exclusive upper bound of the top-left corner
            y, x = rng.integers(BORDER, high, size=2)
            placed.append(PlacedObject(colour, shape, int(y), int(x), extent, phrase))
        if not all(_separated(p, q) for i, p in enumerate(placed) for q in placed[i + 1 :]):
            continue
        if relation is not None:
            # Relations only join single objects, so phrase index == instance index here.
            if not relation_holds(
                relation.name, placed[relation.a].centre, placed[relation.b].centre, margin
            ):
                continue
        return placed
    raise RuntimeError(f"could not lay out {spec.text!r} on a {size}x{size} canvas")


def draw(objects: Sequence[PlacedObject], size: int = REFERENCE_SIZE) -> np.ndarray:
    """Paint placed objects onto a white canvas; returns uint8 (size, size, 3)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[...] = BACKGROUND
    for obj in objects:
        mask = shape_mask(obj.shape, obj.extent)
        region = image[obj.y : obj.y + obj.extent, obj.x : obj.x + obj.extent]
        region[mask] = PALETTE[obj.colour]
    return image


def render(spec: PromptSpec | str, rng: np.random.Generator, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Ground-truth image of a prompt: uint8 (size, size, 3), deterministic given ``rng``."""
    return draw(layout(spec, rng, size), size)


def render_batch(prompts: Sequence[PromptSpec | str], seed: int, size: int = REFERENCE_SIZE) -> np.ndarray:
    """Render prompts with one generator seeded by ``seed``; returns uint8 (N, size, size, 3)."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(prompts), size, size, 3), dtype=np.uint8)
    for i, prompt in enumerate(prompts):
        out[i] = render(prompt, rng, size)
    return out
