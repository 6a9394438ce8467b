r"""SolidWorld: primitives in 3D, seen from four cameras. Prompts, ground-truth views and an exact evaluator.

Prompts name one primitive, or two with a relation::

    a red cube
    a small blue sphere
    a yellow cone on top of a large green cylinder
    a red sphere next to a blue cube

Shapes are cube, sphere, cone and cylinder; sizes small, large or none (medium); the colours are
ShapeWorld's. The two objects of a prompt differ in colour. Only flat-topped shapes (cube, cylinder)
carry another object. Every primitive fits in a box of side $2r$ that stands on its base ($r$ = 0.3, 0.4,
0.5 for small, medium, large): a cube of side $2r$, a sphere of radius $r$, and a cylinder and an upright
cone of radius $r$ and height $2r$.

**Views.** A scene is rendered by sphere tracing the signed distances of its primitives in torch, from
four orthographic cameras at azimuths 45, 135, 225 and 315 degrees and elevation 30 degrees, with
Lambert shading on a white background: an array (V=4, H, W, 3), 32x32 by default.

**The evaluator fits a 3D layout to the views and re-renders it** (analysis by synthesis, in the spirit
of Carve3D's multi-view reconstruction consistency). Pixels are assigned to palette colours by
chromaticity, so shading does not change them. For each colour seen, the best of the 12 candidate
primitives (4 shapes x 3 sizes) is placed where the views say it stands. The ground position comes from
least squares on the silhouettes' horizontal centres over the views, and the height from their lowest
points. Each candidate is re-rendered, and the one with the highest IoU with the observed silhouettes
wins. Pixels of other objects are left out, so occlusion does not count. An object is *consistent* when
that IoU is at least ``MIN_IOU``, it is seen in at least 3 views, and it forms one blob in each view.
Views that do not describe one 3D object fail this check. Relations are judged on the fitted layout.

The matched score follows ShapeWorld's: requested objects $i$ are matched one to one to detected objects
$d$. A match earns the fraction $c(i, d)$ of its checks that pass (colour, shape, size when asked,
consistency). A two-object prompt adds its relation check $\rho \in \{0, 1\}$, and every detected object
left unmatched costs $\lambda = 1/2$:

$$ s = \max\Big(0,\ \frac{\sum_{(i,d)\in M} c(i, d) + \rho - \lambda\,|E|}{N + [N = 2]}\Big), $$

so $s = 1$ exactly when every criterion holds, and a reward of $s$ is aligned with the accuracy reported.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .grammar import COLOURS
from .render import PALETTE

SHAPES_3D: tuple[str, ...] = ("cube", "sphere", "cone", "cylinder")
SUPPORTS: tuple[str, ...] = ("cube", "cylinder")
"""Shapes with a flat top, the only ones that carry another object."""
SIZES_3D: dict[str, float] = {"small": 0.3, "medium": 0.4, "large": 0.5}
"""Half extent r of each size (the word "medium" is never written: no size word means medium)."""
RELATIONS: tuple[str, ...] = ("on top of", "next to")
AZIMUTHS_DEG: tuple[float, ...] = (45.0, 135.0, 225.0, 315.0)
ELEVATION_DEG = 30.0
VIEW_SPAN = 2.6
"""World units across an image side (orthographic)."""
VIEW_CENTRE = (0.0, 0.7, 0.0)
LIGHT = (0.45, 0.8, 0.4)
AMBIENT = 0.45
DEFAULT_SIZE = 32
MIN_IOU = 0.7
MIN_VIEWS = 3
EXTRA_OBJECT_COST = 0.5
HELDOUT_PERCENT = 20
_SPLIT_SALT = "solidworld-split-v1"  # changing it would reshuffle the held-out set: never do that
TASKS: tuple[str, ...] = ("single_object", "next_to", "on_top")
CRITERIA: tuple[str, ...] = ("appearance", "count", "consistency", "relation")
SPLITS: tuple[str, ...] = ("train", "heldout", "easy", "all")
GRAMMAR = (f"'a [small|large] COLOUR SHAPE' or 'a [small|large] COLOUR SHAPE on top of|next to a [small|large] "
           f"COLOUR SHAPE' (two different colours; only a {' or '.join(SUPPORTS)} carries another object); "
           f"colours {'/'.join(COLOURS)}; shapes {'/'.join(SHAPES_3D)}")


class SolidPromptError(ValueError):
    """A prompt outside SolidWorld's grammar; the message says what is allowed."""


@dataclass(frozen=True)
class Solid:
    """One requested primitive."""

    colour: str
    shape: str
    size: str | None = None

    @property
    def text(self) -> str:
        return " ".join(w for w in ("a", self.size, self.colour, self.shape) if w)

    @property
    def radius(self) -> float:
        return SIZES_3D[self.size or "medium"]


@dataclass(frozen=True)
class SolidSpec:
    """A parsed prompt: one object, or two with a relation (the first relative to the second)."""

    objects: tuple[Solid, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        if self.relation is None:
            return self.objects[0].text
        return f"{self.objects[0].text} {self.relation} {self.objects[1].text}"

    @property
    def task(self) -> str:
        return {None: "single_object", "next to": "next_to", "on top of": "on_top"}[self.relation]


def _parse_object(words: list[str], text: str) -> tuple[Solid, list[str]]:
    if not words or words[0] != "a":
        raise SolidPromptError(f"{text!r}: expected 'a' before each object. Grammar: {GRAMMAR}")
    words = words[1:]
    size = words[0] if words and words[0] in ("small", "large") else None
    words = words[1:] if size else words
    if len(words) < 2 or words[0] not in COLOURS or words[1] not in SHAPES_3D:
        raise SolidPromptError(f"{text!r}: expected a colour ({', '.join(COLOURS)}) and a shape "
                               f"({', '.join(SHAPES_3D)}). Grammar: {GRAMMAR}")
    return Solid(words[0], words[1], size), words[2:]


def parse_solid_prompt(text: str) -> SolidSpec:
    words = text.lower().replace(",", " ").split()
    first, rest = _parse_object(words, text)
    if not rest:
        return SolidSpec((first,))
    joined = " ".join(rest)
    relation = next((r for r in RELATIONS if joined.startswith(r + " ")), None)
    if relation is None:
        raise SolidPromptError(f"{text!r}: expected 'on top of' or 'next to' after {first.text!r}. Grammar: {GRAMMAR}")
    second, tail = _parse_object(rest[len(relation.split()):], text)
    if tail:
        raise SolidPromptError(f"{text!r}: unexpected words after the second object: {' '.join(tail)!r}")
    if first.colour == second.colour:
        raise SolidPromptError(f"{text!r}: the two objects must have different colours")
    if relation == "on top of" and second.shape not in SUPPORTS:
        raise SolidPromptError(f"{text!r}: only a {' or '.join(SUPPORTS)} can carry another object")
    return SolidSpec((first, second), relation)


def as_solid_spec(prompt: str | SolidSpec) -> SolidSpec:
    return prompt if isinstance(prompt, SolidSpec) else parse_solid_prompt(prompt)


@cache
def all_solid_prompts() -> tuple[str, ...]:
    """Every canonical prompt: 48 with one object, 2,592 with two."""
    singles = [Solid(c, s, z) for z in (None, "small", "large") for c in COLOURS for s in SHAPES_3D]
    specs = [SolidSpec((o,)) for o in singles]
    for a, b in itertools.product(singles, singles):
        if a.colour == b.colour:
            continue
        specs.append(SolidSpec((a, b), "next to"))
        if b.shape in SUPPORTS:
            specs.append(SolidSpec((a, b), "on top of"))
    return tuple(spec.text for spec in specs)


def is_heldout_solid(text: str) -> bool:
    """Stable held-out membership (~20%) from a salted SHA-256 of the canonical text."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{parse_solid_prompt(text).text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


@cache
def _split(name: str) -> tuple[str, ...]:
    prompts = all_solid_prompts()
    if name == "all":
        return prompts
    if name == "heldout":
        return tuple(p for p in prompts if is_heldout_solid(p))
    train = tuple(p for p in prompts if not is_heldout_solid(p))
    if name == "train":
        return train
    if name == "easy":
        return tuple(p for p in train if parse_solid_prompt(p).relation is None)
    raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")


def solid_prompt_split(name: str) -> list[str]:
    """Prompts of a split: 'train', 'heldout' (never for training), 'easy' (one-object train prompts), 'all'."""
    return list(_split(name))


# -- scenes and rendering --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlacedSolid:
    """A primitive in the scene: its base centre (x, y0, z) and half extent r."""

    colour: str
    shape: str
    x: float
    y0: float
    z: float
    radius: float


def layout_scene(spec: SolidSpec | str, rng: np.random.Generator) -> list[PlacedSolid]:
    """Where the prompt's objects stand: on the ground near the centre, side by side, or stacked."""
    spec = as_solid_spec(spec)
    first = spec.objects[0]
    if spec.relation is None:
        x, z = rng.uniform(-0.15, 0.15, size=2)
        return [PlacedSolid(first.colour, first.shape, float(x), 0.0, float(z), first.radius)]
    second = spec.objects[1]
    if spec.relation == "on top of":
        x, z = rng.uniform(-0.1, 0.1, size=2)
        base = PlacedSolid(second.colour, second.shape, float(x), 0.0, float(z), second.radius)
        return [PlacedSolid(first.colour, first.shape, float(x), 2 * second.radius, float(z), first.radius), base]
    # Side by side along x or z, so that no camera (on the diagonals) looks along the pair.
    gap = float(rng.uniform(0.25, 0.45))
    half = (first.radius + second.radius + gap) / 2
    axis = np.array([1.0, 0.0]) if rng.random() < 0.5 else np.array([0.0, 1.0])
    sign = 1.0 if rng.random() < 0.5 else -1.0
    a, b = -sign * half * axis, sign * half * axis
    return [PlacedSolid(first.colour, first.shape, float(a[0]), 0.0, float(a[1]), first.radius),
            PlacedSolid(second.colour, second.shape, float(b[0]), 0.0, float(b[1]), second.radius)]


def _cameras(size: int, offset: tuple[float, float] = (0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins (V, H, W, 3) and directions (V, 3) of the orthographic cameras; ``offset`` moves the image
    content by (right, down) pixels (the evaluator's sub-pixel templates)."""
    return camera_rays(size, AZIMUTHS_DEG, offset=offset)


def camera_rays(size: int, azimuths_deg: Sequence[float], elevation_deg: float = ELEVATION_DEG,
                offset: tuple[float, float] = (0.0, 0.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins (V, H, W, 3) and directions (V, 3) of orthographic cameras at any azimuths (a turntable
    uses many), each framed like SolidWorld's: ``VIEW_SPAN`` wide around ``VIEW_CENTRE``."""
    elevation = math.radians(elevation_deg)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size - 0.5
    v_coord, u_coord = torch.meshgrid(-coords * VIEW_SPAN, coords * VIEW_SPAN, indexing="ij")
    origins, directions = [], []
    for azimuth in azimuths_deg:
        theta = math.radians(azimuth)
        towards_camera = torch.tensor([math.cos(elevation) * math.sin(theta), math.sin(elevation),
                                       math.cos(elevation) * math.cos(theta)], dtype=torch.float32)
        right = torch.tensor([math.cos(theta), 0.0, -math.sin(theta)], dtype=torch.float32)
        up = torch.linalg.cross(towards_camera, right)
        pixel = VIEW_SPAN / size
        centre = (torch.tensor(VIEW_CENTRE, dtype=torch.float32) + 6.0 * towards_camera
                  - offset[0] * pixel * right + offset[1] * pixel * up)
        origins.append(centre + u_coord[..., None] * right + v_coord[..., None] * up)
        directions.append(-towards_camera)
    return torch.stack(origins), torch.stack(directions)


def _triangle_sdf(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance in the (rho, y) plane to the cone's section: the triangle (-r, 0), (r, 0), (0, 2r)."""
    rho, y = q[..., 0].abs(), q[..., 1]
    # Distance to the slanted edge from (r, 0) to (0, 2r) and to the base segment, with the inside sign.
    edge = torch.stack([-r, 2 * r], dim=-1)
    rel = torch.stack([rho - r, y], dim=-1)
    t = ((rel * edge).sum(-1) / (edge * edge).sum(-1)).clamp(0, 1)
    slant = (rel - t[..., None] * edge).norm(dim=-1)
    base = torch.stack([(rho - r).clamp(min=0), y], dim=-1).norm(dim=-1)
    inside = (y > 0) & (2 * r * rho + r * y < 2 * r * r)
    distance = torch.minimum(slant, base)
    return torch.where(inside, -distance, distance)


def _primitive_sdf(p: torch.Tensor, shape: torch.Tensor, centre: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Signed distance of points p (..., 3) to primitives given per point: shape index, base centre, radius."""
    rel = p - centre
    mid = rel - torch.stack([torch.zeros_like(r), r, torch.zeros_like(r)], dim=-1)
    q = mid.abs() - r[..., None]
    cube = q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    sphere = mid.norm(dim=-1) - r
    rho = torch.stack([rel[..., 0], rel[..., 2]], dim=-1).norm(dim=-1)
    d = torch.stack([rho - r, mid[..., 1].abs() - r], dim=-1)
    cylinder = d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)
    cone = _triangle_sdf(torch.stack([rho, rel[..., 1]], dim=-1), r)
    return torch.stack([cube, sphere, cone, cylinder], dim=-1).gather(-1, shape[..., None]).squeeze(-1)


def _scene_tensors(scenes: Sequence[Sequence[PlacedSolid]]) -> tuple[torch.Tensor, ...]:
    slots = max(1, max(len(s) for s in scenes))
    shape = torch.zeros(len(scenes), slots, dtype=torch.long)
    centre = torch.zeros(len(scenes), slots, 3, dtype=torch.float32)
    radius = torch.zeros(len(scenes), slots, dtype=torch.float32)
    colour = torch.ones(len(scenes), slots, 3, dtype=torch.float32)
    present = torch.zeros(len(scenes), slots, dtype=torch.bool)
    for i, scene in enumerate(scenes):
        for j, obj in enumerate(scene):
            shape[i, j] = SHAPES_3D.index(obj.shape)
            centre[i, j] = torch.tensor([obj.x, obj.y0, obj.z], dtype=torch.float32)
            radius[i, j] = obj.radius
            colour[i, j] = torch.tensor(PALETTE[obj.colour], dtype=torch.float32) / 255
            present[i, j] = True
    return shape, centre, radius, colour, present


def _object_distances(points: torch.Tensor, scene_of_point: torch.Tensor,
                      scene: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(P, slots) distances of points (P, 3) to each object of the scene each point belongs to."""
    shape, centre, radius, _, present = scene
    shape, centre, radius, present = (t[scene_of_point] for t in (shape, centre, radius, present))
    per_slot = [torch.where(present[:, j], _primitive_sdf(points, shape[:, j], centre[:, j], radius[:, j]),
                            torch.full_like(radius[:, j], 1e3))
                for j in range(shape.shape[1])]
    return torch.stack(per_slot, dim=-1)


MARCH_STEPS = 64
MARCH_FAR = 12.0
"""Ray length past which a ray has left the scene: the cameras stand 6 units from the view centre."""


def _march(points: torch.Tensor, directions: torch.Tensor, scene_of_point: torch.Tensor,
           scene: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sphere-trace rays (P, 3) from ``points`` along ``directions``; returns end points and a hit mask.

    Only rays still travelling are evaluated: most rays settle within a few steps, and a ray that has hit
    or left the scene never changes again, so tracing the rest alone gives the same image, faster.
    """
    points = points.clone()
    travelled = torch.zeros(points.shape[0], dtype=torch.float32)
    hit = torch.zeros(points.shape[0], dtype=torch.bool)
    active = torch.arange(points.shape[0])
    for _ in range(MARCH_STEPS):
        distance = _object_distances(points[active], scene_of_point[active], scene).min(dim=-1).values
        arrived = distance < 1e-3
        advance = torch.where(arrived, torch.zeros_like(distance), distance.clamp(min=0) * 0.95)
        hit[active] = arrived
        travelled[active] += advance
        points[active] += advance[:, None] * directions[active]
        active = active[~(arrived | (travelled[active] > MARCH_FAR))]
        if active.numel() == 0:
            break
    return points, hit


def _march_every_ray(points: torch.Tensor, directions: torch.Tensor, scene_of_point: torch.Tensor,
                     scene: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain sphere tracer ``_march`` replaced: every ray for all ``MARCH_STEPS`` steps, a ray that hit
    standing still. Kept as the reference the fast tracer is tested (same image) and timed
    (``benchmarks/render_speed.py``) against; nothing renders with it."""
    hit = torch.zeros(points.shape[0], dtype=torch.bool)
    for _ in range(MARCH_STEPS):
        distance = _object_distances(points, scene_of_point, scene).min(dim=-1).values
        hit |= distance < 1e-3
        points = points + torch.where(hit, 0.0, distance.clamp(min=0) * 0.95)[:, None] * directions
    return points, hit


def _rays(n: int, size: int, offset: tuple[float, float] = (0.0, 0.0)
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Every camera ray of ``n`` scenes, flat: origins (P, 3), directions (P, 3), the scene each ray belongs
    to (P,), and the (N, V, H, W) grid they unflatten to."""
    origins, direction = _cameras(size, offset)
    grid = (n, *origins.shape[:-1])
    scene_of_point = torch.arange(n).view(n, 1, 1, 1).expand(grid).reshape(-1)
    directions = direction.view(1, -1, 1, 1, 3).expand(*grid, 3).reshape(-1, 3)
    return origins.expand(n, *origins.shape).reshape(-1, 3), directions, scene_of_point, grid


def render_scenes(scenes: Sequence[Sequence[PlacedSolid]], size: int = DEFAULT_SIZE, shaded: bool = True,
                  offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """(N, V, H, W, 3) uint8 views and (N, V, H, W) int masks of which object each pixel shows (-1 = none)."""
    scene = _scene_tensors(scenes)
    origins, directions, scene_of_point, grid = _rays(len(scenes), size, offset)
    points, hit = _march(origins, directions, scene_of_point, scene)
    # Colour and shade only the rays that hit something; the others show the white background.
    at, hit_scene = points[hit], scene_of_point[hit]
    owner = torch.full((points.shape[0],), -1, dtype=torch.long)
    owner[hit] = _object_distances(at, hit_scene, scene).argmin(dim=-1)
    rgb = torch.ones(points.shape[0], 3, dtype=torch.float32)
    albedo = scene[3][hit_scene, owner[hit]]
    shade = torch.ones(at.shape[0], dtype=torch.float32)
    if shaded:
        eps = 1e-3
        normal = torch.stack([
            _object_distances(at + eps * axis, hit_scene, scene).min(-1).values
            - _object_distances(at - eps * axis, hit_scene, scene).min(-1).values
            for axis in torch.eye(3, dtype=torch.float32)], dim=-1)
        normal = normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        light = torch.tensor(LIGHT, dtype=torch.float32)
        shade = AMBIENT + (1 - AMBIENT) * (normal @ (light / light.norm())).clamp(min=0)
    rgb[hit] = albedo * shade[:, None]
    rgb = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).view(*grid, 3)
    return rgb.numpy(), owner.view(grid).numpy()


def render_views(specs: Sequence[SolidSpec | str], seed: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Ground-truth views (N, V, H, W, 3) uint8 of prompts, each laid out from its own seeded draw."""
    scenes = [layout_scene(spec, np.random.default_rng([seed, i])) for i, spec in enumerate(specs)]
    return render_scenes(scenes, size)[0]


# -- the evaluator ---------------------------------------------------------------------------------------
_CHROMA = np.array([np.array(PALETTE[c], dtype=np.float64) / sum(PALETTE[c]) for c in COLOURS])


def colour_labels(views: np.ndarray) -> np.ndarray:
    """(..., H, W) palette index of each pixel by chromaticity, -1 for background and unsaturated pixels."""
    pixels = views.astype(np.float64)
    total = pixels.sum(-1, keepdims=True)
    chroma = pixels / np.maximum(total, 1.0)
    distance = np.linalg.norm(chroma[..., None, :] - _CHROMA, axis=-1)
    label = distance.argmin(-1)
    saturated = (pixels.max(-1) - pixels.min(-1)) > 40
    close = distance.min(-1) < 0.12
    return np.where(saturated & close, label, -1)


@dataclass(frozen=True)
class FittedSolid:
    """A detected object: its colour, the best-fitting primitive and where it stands."""

    colour: str
    shape: str
    size: str
    x: float
    y0: float
    z: float
    iou: float
    views_seen: int
    blobs: int
    """Largest number of separate blobs of this colour in one view (1 for a well-formed object)."""

    @property
    def radius(self) -> float:
        return SIZES_3D[self.size]

    @property
    def consistent(self) -> bool:
        return self.iou >= MIN_IOU and self.views_seen >= MIN_VIEWS and self.blobs == 1


SUBPIXEL = 4
"""Template offsets per pixel and axis: silhouettes of a few pixels change with where they fall on the grid."""


@cache
def _candidates(size: int) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The 12 (shape, size) candidates and their masks at the origin, moved by every quarter-pixel offset:
    (SUBPIXEL, SUBPIXEL, 12, V, H, W), indexed [down, right]."""
    pairs = [(shape, name) for shape in SHAPES_3D for name in SIZES_3D]
    scenes = [[PlacedSolid("red", shape, 0.0, 0.0, 0.0, SIZES_3D[name])] for shape, name in pairs]
    grid = np.stack([np.stack([render_scenes(scenes, size, shaded=False, offset=(right / SUBPIXEL, down / SUBPIXEL))[1] == 0
                               for right in range(SUBPIXEL)]) for down in range(SUBPIXEL)])
    return pairs, grid


def _pixel_geometry(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per view: the image-plane directions of world x and z (right, up components), and of world y (up)."""
    elevation = math.radians(ELEVATION_DEG)
    rows = []
    for azimuth in AZIMUTHS_DEG:
        theta = math.radians(azimuth)
        rows.append(((math.cos(theta), -math.sin(theta)),
                     (-math.sin(elevation) * math.sin(theta), -math.sin(elevation) * math.cos(theta))))
    horizontal = np.array([r[0] for r in rows])
    vertical = np.array([r[1] for r in rows])
    return horizontal, vertical, np.full(len(AZIMUTHS_DEG), math.cos(elevation))


def _shifted(masks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Masks (..., H, W) moved by whole pixels (down by ``rows``, right by ``cols``), zero-filled."""
    out = np.zeros_like(masks)
    h, w = masks.shape[-2:]
    src_r, dst_r = slice(max(0, -rows), min(h, h - rows)), slice(max(0, rows), min(h, h + rows))
    src_c, dst_c = slice(max(0, -cols), min(w, w - cols)), slice(max(0, cols), min(w, w + cols))
    out[..., dst_r, dst_c] = masks[..., src_r, src_c]
    return out


def _fit_colour(masks: np.ndarray, ignore: np.ndarray, colour: str, blobs: int) -> FittedSolid:
    """The candidate primitive that best explains one colour's silhouettes over the views.

    Orthographic cameras make a translated object's silhouette a translated silhouette, so each candidate
    is its silhouette at the origin moved to where the fitted 3D position projects in each view.
    """
    size = masks.shape[-1]
    pairs, grid = _candidates(size)
    templates = grid[0, 0]
    pixel = VIEW_SPAN / size
    cols = np.arange(size)
    horizontal, vertical, y_up = _pixel_geometry(size)
    seen = [v for v in range(masks.shape[0]) if masks[v].sum() >= 3]
    if not seen:
        return FittedSolid(colour, "cube", "medium", 0.0, 0.0, 0.0, 0.0, 0, blobs)
    occupied = masks[seen].any(1)  # (S, W) columns with pixels
    u_obs = (occupied * cols).sum(1) / occupied.sum(1)
    low_obs = np.array([np.nonzero(masks[v].any(1))[0].max() for v in seen])
    best: tuple[float, int, tuple[float, float, float]] = (-1.0, 0, (0.0, 0.0, 0.0))
    for k in range(len(pairs)):
        template = templates[k, seen]
        tpl_cols = template.any(1)
        u_tpl = (tpl_cols * cols).sum(1) / np.maximum(tpl_cols.sum(1), 1)
        low_tpl = np.array([np.nonzero(t.any(1))[0].max() for t in template])
        if len(seen) >= 2:
            (x, z), *_ = np.linalg.lstsq(horizontal[seen], (u_obs - u_tpl) * pixel, rcond=None)
        else:
            x = z = 0.0
        # The lowest row rises by (y0 cos(elevation) + the ground offset's vertical component) / pixel.
        ground = vertical[seen] @ np.array([x, z])
        y0 = max(0.0, float(np.median(((low_tpl - low_obs) * pixel - ground) / y_up[seen])))
        inter = union = 0
        for v in range(masks.shape[0]):
            du = (horizontal[v] @ np.array([x, z])) / pixel
            dv = (vertical[v] @ np.array([x, z]) + y0 * y_up[v]) / pixel
            keep = ~ignore[v]
            # The template at the offset's fraction, moved by its whole pixels; one pixel either way
            # absorbs the rounding of the fitted position.
            down, right = -dv, du
            frac_down, frac_right = (int(round((x - math.floor(x)) * SUBPIXEL)) for x in (down, right))
            whole_down = math.floor(down) + frac_down // SUBPIXEL
            whole_right = math.floor(right) + frac_right // SUBPIXEL
            template = grid[frac_down % SUBPIXEL, frac_right % SUBPIXEL, k, v]
            counts = []
            for dr, dc in itertools.product((-1, 0, 1), repeat=2):
                moved = _shifted(template, whole_down + dr, whole_right + dc)
                counts.append((int((moved & masks[v] & keep).sum()), int(((moved | masks[v]) & keep).sum())))
            view_inter, view_union = max(counts, key=lambda c: c[0] / max(c[1], 1))
            inter += view_inter
            union += view_union
        iou = inter / max(union, 1)
        if iou > best[0]:
            best = (iou, k, (float(x), y0, float(z)))
    iou, k, (x, y0, z) = best
    shape, name = pairs[k]
    return FittedSolid(colour, shape, name, x, y0, z, iou, len(seen), blobs)


def detect_solids(views: np.ndarray) -> list[FittedSolid]:
    """The objects in one sample's views (V, H, W, 3): one fitted primitive per colour seen."""
    labels = colour_labels(views)
    found = []
    for index, colour in enumerate(COLOURS):
        masks = labels == index
        if masks.sum() < 6:
            continue
        blobs = 0
        for v in range(masks.shape[0]):
            count = 0
            if masks[v].any():
                components, n = ndimage.label(masks[v], structure=np.ones((3, 3)))
                count = int((np.bincount(components.ravel())[1:] >= 3).sum())
            blobs = max(blobs, count)
        if blobs == 0:  # only specks under the blob size (a sampler's leftover noise): not an object
            continue
        ignore = (labels >= 0) & ~masks  # other objects' pixels: occlusion is not a mismatch
        found.append(_fit_colour(masks, ignore, colour, blobs))
    return found


def relation_holds(relation: str, upper: FittedSolid, lower: FittedSolid) -> bool:
    """On the fitted layout: stacked (above the other's top, over its base) or side by side on the ground."""
    apart = math.hypot(upper.x - lower.x, upper.z - lower.z)
    if relation == "on top of":
        return abs(upper.y0 - (lower.y0 + 2 * lower.radius)) <= 0.2 and apart <= 0.6 * lower.radius + 0.1
    return (upper.y0 <= 0.2 and lower.y0 <= 0.2 and apart >= 0.8 * (upper.radius + lower.radius)
            and apart <= upper.radius + lower.radius + 1.0)


GROUND_TOLERANCE = 0.15
"""A fitted object whose base is this close to the ground stands on it."""


def stands(obj: FittedSolid, others: Sequence[FittedSolid]) -> bool:
    """Physical support on the fitted layout: on the ground, or resting on the flat top of a cube or a
    cylinder with its centre over that top (a centre outside the face tips over; a sphere or cone carries
    nothing; anything else floats)."""
    if obj.y0 <= GROUND_TOLERANCE:
        return True
    for support in others:
        if support is obj or support.shape not in SUPPORTS:
            continue
        if abs(obj.y0 - (support.y0 + 2 * support.radius)) > 0.2:
            continue
        dx, dz = obj.x - support.x, obj.z - support.z
        inside = (max(abs(dx), abs(dz)) <= support.radius if support.shape == "cube"
                  else math.hypot(dx, dz) <= support.radius)
        if inside:
            return True
    return False


def scene_stands(objects: Sequence[FittedSolid]) -> bool:
    """DSO's physical feedback on SolidWorld: something was generated and every object of it stands."""
    return bool(objects) and all(stands(obj, objects) for obj in objects)


@dataclass(frozen=True)
class SolidEvaluation:
    """Verdict on one sample's views for one prompt (the same fields as ShapeWorld's ``Evaluation``)."""

    prompt: str
    criteria: dict[str, bool]
    correct: bool
    score: float
    """The matched score in [0, 1]; 1 exactly when ``correct``."""
    objects: tuple[FittedSolid, ...]
    task: str


def _checks(obj: Solid, found: FittedSolid) -> dict[str, bool]:
    checks = {"colour": found.colour == obj.colour, "shape": found.shape == obj.shape,
              "consistent": found.consistent}
    if obj.size is not None:
        checks["size"] = found.size == obj.size
    return checks


def score_solids(found: Sequence[FittedSolid], spec: SolidSpec | str) -> SolidEvaluation:
    spec = as_solid_spec(spec)
    checks = [[_checks(obj, d) for d in found] for obj in spec.objects]
    credit = np.array([[float(np.mean(list(c.values()))) if c["colour"] else 0.0 for c in row] for row in checks])
    credit = credit.reshape(len(spec.objects), len(found))
    gain = np.where(credit > 0, credit + EXTRA_OBJECT_COST, 0.0)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    matched = {int(r): int(c) for r, c in zip(rows, cols) if gain[r, c] > 0}
    extras = sum(d.blobs for d in found) - len(matched)
    relation = True
    if spec.relation is not None:
        relation = 0 in matched and 1 in matched and relation_holds(spec.relation, found[matched[0]],
                                                                    found[matched[1]])
    total = sum(credit[r, c] for r, c in matched.items()) + (float(relation) if spec.relation else 0.0)
    denominator = len(spec.objects) + (1 if spec.relation else 0)
    score = max(0.0, (total - EXTRA_OBJECT_COST * extras) / denominator)
    looks = [[d for d in found if (d.colour, d.shape) == (o.colour, o.shape) and (o.size is None or d.size == o.size)]
             for o in spec.objects]
    criteria = {
        "appearance": all(looks),
        "count": len(found) == len(spec.objects) and all(d.blobs == 1 for d in found),
        "consistency": bool(found) and all(d.consistent for d in found),
    }
    if spec.relation is not None:
        criteria["relation"] = relation
    correct = all(criteria.values())
    if correct != (score >= 1.0 - 1e-9):  # the score is built so that these agree; say so loudly if not
        raise AssertionError(f"{spec.text!r}: score {score} disagrees with criteria {criteria}")
    return SolidEvaluation(spec.text, criteria, correct, score, tuple(found), spec.task)


def evaluate_views(views: np.ndarray, prompts: Sequence[SolidSpec | str]) -> list[SolidEvaluation]:
    """Evaluate samples of views (N, V, H, W, 3) uint8 in [0, 255]; one prompt per sample."""
    x = np.asarray(views)
    if x.ndim != 5 or x.shape[-1] != 3 or x.shape[1] != len(AZIMUTHS_DEG):
        raise ValueError(f"expected views of shape (N, {len(AZIMUTHS_DEG)}, H, W, 3), got {x.shape}")
    if len(prompts) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} samples but {len(prompts)} prompts")
    return [score_solids(detect_solids(sample), prompt) for sample, prompt in zip(x, prompts)]


def aggregate_solid(evaluations: Sequence[SolidEvaluation]) -> dict[str, float]:
    """Accuracy, mean matched score, per-criterion and per-task accuracy, and the mean over tasks."""
    from .evaluate import aggregate_verdicts

    return aggregate_verdicts(evaluations, CRITERIA, TASKS)
