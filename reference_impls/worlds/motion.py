r"""MotionWorld: ShapeWorld's objects, moving. Prompts, ground-truth clips and an exact evaluator.

Prompts name one or two objects, each with a direction and optionally a speed::

    a red circle moving right
    a blue square moving up quickly
    a green triangle moving left and a yellow circle moving down

A clip is ``frames`` images (8 by default) of 32x32 pixels. Objects keep ShapeWorld's look (solid palette
colours on white, a medium extent) and move in a straight line at a constant whole number of pixels per
frame: ``slowly`` is 1, ``quickly`` is 2, and a prompt without a speed word moves at either. Objects stay
inside the frame and apart from each other in every frame, so each frame parses cleanly.

The evaluator detects objects in every frame with ShapeWorld's detector, links them into tracks (same
colour, nearest centre, at most ``MAX_LINK`` pixels per frame) and judges each track: does it exist in
every frame (no flicker), keep its shape, move steadily (no jumps), in the asked direction, at the asked
speed? The matched score follows ShapeWorld's (``reference_impls.worlds.evaluate.matched_score``):
requested objects $i$ are matched one to one to whole tracks $d$, a match earns the fraction $c(i, d)$ of
its checks that pass (colour, shape, direction, and speed when asked; direction and speed fail on an
unsteady track), and every track left unmatched or broken costs $\lambda = 1/2$:

$$ s = \max\Big(0,\ \frac{\sum_{(i,d)\in M} c(i, d) - \lambda\,|E|}{N}\Big). $$

$s = 1$ exactly when the clip is correct, so a reward of $s$ is aligned with the accuracy reported.

The video models that live in this world (``motion-flow``, ``motion-diffusion``) are ShapeWorld's image
models inflated with temporal layers (``reference_impls.models.video_model``).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
from scipy.optimize import linear_sum_assignment

from .evaluate import EXTRA_OBJECT_COST, DetectedObject, aggregate_verdicts, detect_objects
from .grammar import COLOURS, SHAPES
from .render import BORDER, GAP, REFERENCE_SIZE, PlacedObject, draw

DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""(dy, dx) unit step of each direction word; y grows downwards as in the image array."""
SPEEDS: dict[str, int] = {"slowly": 1, "quickly": 2}
"""Pixels per frame at 32x32 (scaled with the clip side)."""
DEFAULT_FRAMES = 8
EXTENT = 8  # every object's bounding-box side at 32x32: the smallest medium ShapeWorld extent leaves room to move
MAX_LINK = 4.0  # pixels per frame a track may move at 32x32: twice the fast speed
STEADY_TOLERANCE = 1.5  # pixels at 32x32 one frame's motion may differ from the track's mean motion
MIN_SPEED = 0.5  # pixels per frame along the direction, below which an object is standing still
SPEED_BOUNDARY = 1.5  # between slow (1 px/frame) and fast (2 px/frame)
MAX_SIDEWAYS = 0.5  # pixels per frame across the direction that still count as a straight move
HELDOUT_PERCENT = 20
_SPLIT_SALT = "motionworld-split-v1"  # changing it would reshuffle the held-out set: never do that
TASKS: tuple[str, ...] = ("single_motion", "speed", "two_motions")
CRITERIA: tuple[str, ...] = ("appearance", "count", "consistency", "direction", "speed")
SPLITS: tuple[str, ...] = ("train", "heldout", "easy", "all")


ALLOWED_HELP = (
    f"MotionWorld prompts: 'a COLOUR SHAPE moving DIRECTION [SPEED]', or two such phrases joined by 'and' "
    f"(different colour or shape, no speed word); colours {'/'.join(COLOURS)}; shapes {'/'.join(SHAPES)}; "
    f"directions {'/'.join(DIRECTIONS)}; speeds {'/'.join(SPEEDS)}."
)


class MotionPromptError(ValueError):
    """A prompt outside the MotionWorld grammar; the message names the word and what is allowed."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"{problem}. {ALLOWED_HELP}")


@dataclass(frozen=True)
class MovingObject:
    """One requested object: what it looks like and how it moves (speed None: any)."""

    colour: str
    shape: str
    direction: str
    speed: str | None = None

    @property
    def text(self) -> str:
        words = ["a", self.colour, self.shape, "moving", self.direction]
        return " ".join([*words, self.speed] if self.speed else words)


@dataclass(frozen=True)
class MotionSpec:
    """A parsed MotionWorld prompt: one or two moving objects, in canonical (palette) order."""

    objects: tuple[MovingObject, ...]

    @property
    def text(self) -> str:
        return " and ".join(obj.text for obj in self.objects)

    @property
    def task(self) -> str:
        if len(self.objects) == 2:
            return "two_motions"
        return "speed" if self.objects[0].speed else "single_motion"


def _order(obj: MovingObject) -> tuple[int, int]:
    return (COLOURS.index(obj.colour), SHAPES.index(obj.shape))


def _expect(words: list[str], position: int, allowed: Sequence[str], what: str, text: str) -> str:
    word = words[position] if position < len(words) else "<end>"
    if word not in allowed:
        raise MotionPromptError(f"{text!r}: expected {what} ({', '.join(allowed)}) at word {position + 1}, got {word!r}")
    return word


def parse_motion_prompt(text: str) -> MotionSpec:
    """Parse a prompt of the MotionWorld grammar; errors name the word and what is allowed there."""
    words = text.lower().replace(",", " ").split()
    objects: list[MovingObject] = []
    position = 0
    while True:
        _expect(words, position, ("a",), "an article", text)
        colour = _expect(words, position + 1, COLOURS, "a colour", text)
        shape = _expect(words, position + 2, SHAPES, "a shape", text)
        _expect(words, position + 3, ("moving",), "the word 'moving'", text)
        direction = _expect(words, position + 4, tuple(DIRECTIONS), "a direction", text)
        position += 5
        speed = words[position] if position < len(words) and words[position] in SPEEDS else None
        position += speed is not None
        objects.append(MovingObject(colour, shape, direction, speed))
        if position == len(words):
            break
        _expect(words, position, ("and", *SPEEDS), "'and' or a speed", text)
        position += 1
        if len(objects) == 2:
            raise MotionPromptError(f"{text!r}: at most two moving objects")
    if len(objects) == 2:
        if _order(objects[0]) == _order(objects[1]):
            raise MotionPromptError(f"{text!r}: the two objects must differ in colour or shape (they are tracked apart)")
        if any(obj.speed for obj in objects):
            raise MotionPromptError(f"{text!r}: speed words are for one-object prompts")
    return MotionSpec(tuple(sorted(objects, key=_order)))


def as_motion_spec(prompt: str | MotionSpec) -> MotionSpec:
    return prompt if isinstance(prompt, MotionSpec) else parse_motion_prompt(prompt)


@cache
def _all_specs() -> tuple[MotionSpec, ...]:
    looks = list(itertools.product(COLOURS, SHAPES))
    specs = [MotionSpec((MovingObject(c, s, d, v),))
             for (c, s) in looks for d in DIRECTIONS for v in (None, *SPEEDS)]
    for (c1, s1), (c2, s2) in itertools.combinations(looks, 2):
        for d1, d2 in itertools.product(DIRECTIONS, repeat=2):
            specs.append(MotionSpec((MovingObject(c1, s1, d1), MovingObject(c2, s2, d2))))
    return tuple(specs)


def all_motion_prompts() -> list[str]:
    """Every canonical prompt: 144 with one object, 1,056 with two."""
    return [spec.text for spec in _all_specs()]


def is_heldout_motion(text: str) -> bool:
    """Stable held-out membership (~20%) from a salted SHA-256 of the canonical text."""
    canonical = parse_motion_prompt(text).text
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{canonical}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


@cache
def _split(name: str) -> tuple[str, ...]:
    prompts = all_motion_prompts()
    if name == "all":
        return tuple(prompts)
    if name == "heldout":
        return tuple(p for p in prompts if is_heldout_motion(p))
    train = tuple(p for p in prompts if not is_heldout_motion(p))
    if name == "train":
        return train
    if name == "easy":
        return tuple(p for p in train if " and " not in p)
    raise ValueError(f"unknown split {name!r}; allowed: {', '.join(SPLITS)}")


def motion_prompt_split(name: str) -> list[str]:
    """Prompts of a split: 'train', 'heldout' (never for training), 'easy' (one-object train prompts), 'all'."""
    return list(_split(name))


# -- rendering ------------------------------------------------------------------------------------------
def _scaled(value: float, size: int) -> float:
    return value * size / REFERENCE_SIZE


def layout_clip(spec: MotionSpec | str, rng: np.random.Generator, frames: int = DEFAULT_FRAMES,
                size: int = REFERENCE_SIZE) -> list[list[PlacedObject]]:
    """Objects of every frame: straight constant-speed paths inside the frame, apart in every frame."""
    spec = as_motion_spec(spec)
    extent = max(3, round(_scaled(EXTENT, size)))
    for _ in range(5000):
        paths = []
        for phrase, obj in enumerate(spec.objects):
            step = max(1, round(_scaled(SPEEDS[obj.speed] if obj.speed else rng.choice([1, 2]), size)))
            dy, dx = (step * d for d in DIRECTIONS[obj.direction])
            travel_y, travel_x = abs(dy) * (frames - 1), abs(dx) * (frames - 1)
            high_y, high_x = size - BORDER - extent - travel_y + 1, size - BORDER - extent - travel_x + 1
            if high_y <= BORDER or high_x <= BORDER:
                raise ValueError(f"{frames} frames at {size}x{size} leave no room to move {obj.text!r}")
            y0 = int(rng.integers(BORDER, high_y)) + (travel_y if dy < 0 else 0)
            x0 = int(rng.integers(BORDER, high_x)) + (travel_x if dx < 0 else 0)
            paths.append([PlacedObject(obj.colour, obj.shape, y0 + dy * f, x0 + dx * f, extent, phrase)
                          for f in range(frames)])
        clip = [list(objects) for objects in zip(*paths)]
        if all(_apart(frame) for frame in clip):
            return clip
    raise RuntimeError(f"could not lay out {spec.text!r} in {frames} frames of {size}x{size}")


def _apart(objects: Sequence[PlacedObject]) -> bool:
    return all(a.x + a.extent + GAP <= b.x or b.x + b.extent + GAP <= a.x
               or a.y + a.extent + GAP <= b.y or b.y + b.extent + GAP <= a.y
               for i, a in enumerate(objects) for b in objects[i + 1:])


def render_clip(spec: MotionSpec | str, rng: np.random.Generator, frames: int = DEFAULT_FRAMES,
                size: int = REFERENCE_SIZE) -> np.ndarray:
    """Ground-truth clip: uint8 (frames, size, size, 3), deterministic given ``rng``."""
    return np.stack([draw(objects, size) for objects in layout_clip(spec, rng, frames, size)])


def render_clips(prompts: Sequence[MotionSpec | str], seed: int, frames: int = DEFAULT_FRAMES,
                 size: int = REFERENCE_SIZE) -> np.ndarray:
    """uint8 (N, frames, size, size, 3) from one generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.stack([render_clip(p, rng, frames, size) for p in prompts])


# -- evaluation -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Track:
    """One object followed through the clip: its detection in each frame it was linked in."""

    colour: str
    detections: tuple[DetectedObject, ...]
    first_frame: int

    def complete(self, frames: int) -> bool:
        return self.first_frame == 0 and len(self.detections) == frames

    @property
    def shape(self) -> str:
        """The shape seen in every frame, or 'unknown' if it changes (identity not kept)."""
        shapes = {d.shape for d in self.detections}
        return shapes.pop() if len(shapes) == 1 else "unknown"

    def velocity(self) -> np.ndarray:
        """Mean (dy, dx) per frame from the first to the last detection."""
        centres = np.array([d.centre for d in self.detections])
        return (centres[-1] - centres[0]) / max(1, len(centres) - 1)

    def steady(self, size: int) -> bool:
        """Every frame-to-frame step within the tolerance of the mean step (no jumps, no stops)."""
        centres = np.array([d.centre for d in self.detections])
        steps = np.diff(centres, axis=0)
        return bool(np.all(np.abs(steps - self.velocity()) <= _scaled(STEADY_TOLERANCE, size)))


def link_tracks(frames: Sequence[Sequence[DetectedObject]], size: int = REFERENCE_SIZE) -> list[Track]:
    """Link detections frame to frame: same colour, one to one, nearest centres within ``MAX_LINK``."""
    open_tracks: list[list] = []  # [colour, detections, first_frame]
    closed: list[list] = []
    limit = _scaled(MAX_LINK, size)
    for index, detections in enumerate(frames):
        cost = np.full((len(open_tracks), len(detections)), np.inf)
        for i, (colour, history, _) in enumerate(open_tracks):
            for j, det in enumerate(detections):
                distance = float(np.hypot(*np.subtract(history[-1].centre, det.centre)))
                if det.colour == colour and distance <= limit:
                    cost[i, j] = distance
        finite = np.where(np.isfinite(cost), cost, 1e6)
        rows, cols = linear_sum_assignment(finite) if cost.size else ([], [])
        linked = {(r, c) for r, c in zip(rows, cols) if np.isfinite(cost[r, c])}
        still_open = []
        for i, track in enumerate(open_tracks):
            match = next((c for r, c in linked if r == i), None)
            if match is None:
                closed.append(track)
            else:
                track[1].append(detections[match])
                still_open.append(track)
        used = {c for _, c in linked}
        still_open += [[det.colour, [det], index] for j, det in enumerate(detections) if j not in used]
        open_tracks = still_open
    return [Track(colour, tuple(history), first) for colour, history, first in closed + open_tracks]


def _direction_and_speed(obj: MovingObject, track: Track, size: int) -> tuple[bool, bool]:
    dy, dx = DIRECTIONS[obj.direction]
    velocity = track.velocity()
    along = float(velocity[0] * dy + velocity[1] * dx)
    sideways = float(abs(velocity[0] * dx) + abs(velocity[1] * dy))
    direction = along >= _scaled(MIN_SPEED, size) and sideways <= _scaled(MAX_SIDEWAYS, size)
    if obj.speed is None:
        return direction, True
    fast = along >= _scaled(SPEED_BOUNDARY, size)
    return direction, direction and (fast == (obj.speed == "quickly"))


def _credit(obj: MovingObject, track: Track, size: int) -> tuple[float, dict[str, bool]]:
    steady = track.steady(size)
    direction, speed = _direction_and_speed(obj, track, size) if steady else (False, False)
    checks = {"colour": track.colour == obj.colour, "shape": track.shape == obj.shape, "direction": direction}
    if obj.speed is not None:
        checks["speed"] = speed
    checks["steady"] = steady
    scored = [v for k, v in checks.items() if k != "steady"]
    return sum(scored) / len(scored), checks


@dataclass(frozen=True)
class MotionEvaluation:
    """Verdict on one clip for one prompt (the same fields as ShapeWorld's ``Evaluation``)."""

    prompt: str
    criteria: dict[str, bool]
    correct: bool
    score: float
    """The matched score in [0, 1]; 1 exactly when ``correct``."""
    tracks: tuple[Track, ...]
    task: str

    @property
    def objects(self) -> tuple[Track, ...]:
        """The objects seen: one track per object followed through the clip (broken ones included)."""
        return self.tracks


def score_tracks(tracks: Sequence[Track], spec: MotionSpec | str, frames: int,
                 size: int = REFERENCE_SIZE) -> MotionEvaluation:
    spec = as_motion_spec(spec)
    complete = [t for t in tracks if t.complete(frames)]
    broken = len(tracks) - len(complete)
    credits = [[_credit(obj, track, size) for track in complete] for obj in spec.objects]
    credit = np.array([[c for c, _ in row] for row in credits]).reshape(len(spec.objects), len(complete))
    gain = np.where(credit > 0, credit + EXTRA_OBJECT_COST, 0.0)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    matched = [(r, c) for r, c in zip(rows, cols) if gain[r, c] > 0]
    total = sum(gain[r, c] for r, c in matched) - EXTRA_OBJECT_COST * (len(complete) + broken)
    score = max(0.0, float(total) / len(spec.objects))
    # Criteria judge each requested object by the whole tracks that look like it (ShapeWorld's criteria
    # do the same), so a diagnosis does not depend on how the score's matching broke a tie.
    looks = [[credits[i][j][1] for j, track in enumerate(complete)
              if (track.colour, track.shape) == (obj.colour, obj.shape)] for i, obj in enumerate(spec.objects)]
    criteria = {
        "appearance": all(looks),
        "count": len(complete) == len(spec.objects) and broken == 0,
        "consistency": broken == 0 and all(t.steady(size) and t.shape != "unknown" for t in complete),
        "direction": all(any(c["direction"] for c in found) for found in looks),
    }
    if any(obj.speed for obj in spec.objects):
        criteria["speed"] = all(any(c.get("speed", True) for c in found) for found in looks)
    correct = all(criteria.values())
    if correct != (score >= 1.0 - 1e-9):  # the score is built so that these agree; say so loudly if not
        raise AssertionError(f"{spec.text!r}: score {score} disagrees with criteria {criteria}")
    return MotionEvaluation(spec.text, criteria, correct, score, tuple(tracks), spec.task)


def evaluate_clips(clips: np.ndarray, prompts: Sequence[MotionSpec | str]) -> list[MotionEvaluation]:
    """Evaluate clips (N, T, H, W, 3) or (N, T, 3, H, W), uint8 or float in [0, 1]; one prompt per clip."""
    x = np.asarray(clips)
    if x.ndim != 5:
        raise ValueError(f"expected clips of shape (N, T, H, W, 3) or (N, T, 3, H, W), got {x.shape}")
    if len(prompts) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} clips but {len(prompts)} prompts")
    n, frames = x.shape[:2]
    detected = detect_objects(x.reshape(n * frames, *x.shape[2:]))
    size = x.shape[-2] if x.shape[-1] == 3 else x.shape[-1]
    out = []
    for k, prompt in enumerate(prompts):
        per_frame = detected[k * frames:(k + 1) * frames]
        out.append(score_tracks(link_tracks(per_frame, size), prompt, frames, size))
    return out


def aggregate_motion(evaluations: Sequence[MotionEvaluation]) -> dict[str, float]:
    """Accuracy, mean matched score, per-criterion and per-task accuracy, and the mean over tasks."""
    return aggregate_verdicts(evaluations, CRITERIA, TASKS)
