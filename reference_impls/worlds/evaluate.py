"""ShapeWorld exact evaluator: parse any image back into objects and score a prompt criterion by criterion.

This is the world's analogue of GenEval, but exact: it needs no detector weights, only the world's
physics (palette, shapes, sizes). It knows nothing about models; it takes arrays.

Pipeline, batched over images:

1. **Colour assignment.** Each pixel goes to the nearest of the palette colours and the white
   background. A pixel nearest to a palette colour but farther than ``COLOUR_THRESHOLD`` from it is
   left unassigned (it is neither clearly an object nor background: grey, black, odd hues). Nearest
   wins, so a pixel is never given a colour it is not closest to; the threshold only rejects garbage
   and is loose enough that a blurred square keeps its corners (about 70% colour, 30% white).
2. **Objects.** Connected components per colour (4-connectivity, scipy.ndimage.label, one label pass
   for the whole batch), holes filled, specks smaller than ``MIN_AREA`` dropped.
3. **Shape** from two scale-free features of the component's bounding box: the fill ratio (square 1,
   circle ~0.8, triangle ~0.6) and the vertical centroid (an upright triangle carries its mass low,
   ~0.63 of the height; circles and squares sit at 0.5). Very elongated or sparse blobs are 'unknown',
   which counts as an extra object, and so are components far larger than any rendered object. **Size** from the bounding-box extent, with thresholds midway
   between the rendered small, medium and big extents.
4. **Criteria.** ``count``: every phrase has exactly its number of matching (colour and shape)
   objects and nothing else is in the image. ``colour``: each requested colour is present at least as
   often as requested. ``shape``: likewise for shapes. ``size`` (only when the prompt has a size word):
   every matching object has that size. ``relation`` (only when the prompt has one): some matching
   pair has its centres in the stated relation by at least ``EVAL_RELATION_MARGIN`` pixels.
   ``correct`` is the conjunction (compositional accuracy).
5. **Scores.** ``score`` is the *matched* score, the dense reward that is aligned with ``correct``
   (:func:`matched_score`): requested object instances are matched one-to-one to detected objects,
   each match earns the fraction of its attributes that agree, every detected object left unmatched costs
   one attribute, and a relation counts as one more unit. It is 1 exactly when ``correct`` holds, and no
   image scores higher by drawing more than was asked. ``criteria_score`` is the fraction of criteria
   that hold: the first reward of this atlas, kept as the example of a verifiable reward that can be
   gamed (colour and shape pass with "at least" counts, so spraying extra objects raises it).
6. **Tasks.** Every prompt belongs to one GenEval-style task (:func:`prompt_task`), so accuracy can be
   reported per task as GenEval does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .grammar import COLOURS, PromptSpec, as_spec
from .render import (
    BACKGROUND,
    BIG_EXTENT,
    MEDIUM_EXTENTS,
    PALETTE,
    REFERENCE_SIZE,
    SMALL_EXTENT,
    relation_holds,
)

CRITERIA: tuple[str, ...] = ("count", "colour", "shape", "size", "relation")
# GenEval's six tasks (Ghosh et al., 2023) mapped onto ShapeWorld's prompt forms (see prompt_task), plus
# ShapeWorld's own size attribute. In ShapeWorld every object is named with a colour, so GenEval's
# "colors" task becomes the two-object prompts that differ only in colour.
TASKS: tuple[str, ...] = ("single_object", "size", "counting", "two_objects", "colors", "color_attr", "position")
# An unrequested object costs one attribute of a two-attribute object (colour, shape): at least as much as
# one wrong attribute of any requested object (sized objects have three).
EXTRA_OBJECT_COST = 0.5
COLOUR_THRESHOLD = 0.45  # RGB distance in [0,1] units; mid grey (0.5, 0.5, 0.5) is 0.59 from green
MIN_AREA = 8  # pixels on a 32x32 image (scaled with area); the smallest rendered triangle has 24
EVAL_RELATION_MARGIN = 2.0  # pixels at 32x32; half the renderer's margin, so renders pass clearly
SQUARE_MIN_FILL = 0.92  # a 6-pixel circle fills 0.89 of its box, every square 1.0
CIRCLE_MIN_FILL = 0.68  # circles fill 0.75-0.89; below that a symmetric blob is not a clean shape
TRIANGLE_MIN_CENTROID = 0.56  # upright triangles sit at 0.58-0.64, symmetric shapes at 0.5
SYMMETRIC_MAX_OFFSET = 0.05
MIN_FILL = 0.45
MAX_ASPECT = 1.5
# Rendered objects are at most 12 pixels wide; a component much larger than that (a flood of one
# colour, say) is no object of this world, else an all-red image would pass as "a big red square".
MAX_OBJECT_EXTENT = 16
# Size thresholds midway between the rendered extents (small 6, medium 8-10, big 12 at 32x32).
SMALL_MAX_EXTENT = (SMALL_EXTENT + min(MEDIUM_EXTENTS)) / 2.0
BIG_MIN_EXTENT = (BIG_EXTENT + max(MEDIUM_EXTENTS)) / 2.0

_REFERENCE_COLOURS = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], dtype=np.float32) / 255.0
# Label components within each image only: connectivity in (y, x), none along the batch axis.
_BATCH_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_BATCH_STRUCTURE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class DetectedObject:
    """An object found in an image, with the features used to classify it (kept for display)."""

    colour: str
    shape: str  # 'circle', 'square', 'triangle' or 'unknown'
    size: str | None  # 'small', 'big' or None for medium
    centre: tuple[float, float]  # (y, x) centre of the bounding box, pixel i spans [i, i+1)
    bbox: tuple[int, int, int, int]  # (y0, x0, y1, x1), end-exclusive
    area: int
    fill: float
    centroid_y: float  # vertical centre of mass as a fraction of the box height

    @property
    def text(self) -> str:
        """Short description, e.g. 'small red circle'."""
        return " ".join(w for w in (self.size, self.colour, self.shape) if w)


@dataclass(frozen=True)
class Evaluation:
    """Verdict on one image for one prompt.

    ``criteria`` maps each applicable criterion name to whether it holds; ``correct`` is their
    conjunction and ``score`` the fraction that hold.
    """

    prompt: str
    criteria: dict[str, bool]
    correct: bool
    score: float
    """The matched score in [0, 1] (:func:`matched_score`); 1 exactly when ``correct``."""
    objects: tuple[DetectedObject, ...] = field(default_factory=tuple)
    criteria_score: float = 0.0
    """Fraction of criteria that hold (the gameable partial credit of ``shapes-criteria``)."""
    task: str = ""
    """The prompt's GenEval-style task (one of TASKS)."""


def _as_float_nhwc(images: np.ndarray) -> np.ndarray:
    """Convert a batch (or one image) to float32 NHWC in [0, 1]; accepts NCHW/CHW and uint8."""
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (N,H,W,3), (N,3,H,W) or one image, got {x.shape}")
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {x.shape}")
    if x.dtype == np.bool_:
        raise TypeError("boolean images are not supported")
    if np.issubdtype(x.dtype, np.integer):
        return x.astype(np.float32) / 255.0
    # Model samples may overshoot or contain NaNs; clip rather than reject them.
    return np.clip(np.nan_to_num(x.astype(np.float32), nan=1.0), 0.0, 1.0)


def assign_colours(images: np.ndarray) -> np.ndarray:
    """Per-pixel palette index (into COLOURS), or -1 for background and unassigned pixels; (N,H,W)."""
    x = _as_float_nhwc(images)
    d2 = ((x[..., None, :] - _REFERENCE_COLOURS) ** 2).sum(axis=-1)
    nearest = d2.argmin(axis=-1)
    near_enough = np.take_along_axis(d2, nearest[..., None], axis=-1)[..., 0] <= COLOUR_THRESHOLD**2
    is_object = (nearest < len(COLOURS)) & near_enough
    return np.where(is_object, nearest, -1).astype(np.int8)


def _classify_shape(h: int, w: int, fill: float, centroid_y: float, scale: float) -> str:
    if min(h, w) < 3 or max(h, w) > MAX_ASPECT * min(h, w) or fill < MIN_FILL:
        return "unknown"
    if max(h, w) > MAX_OBJECT_EXTENT * scale:
        return "unknown"
    if centroid_y >= TRIANGLE_MIN_CENTROID and fill < SQUARE_MIN_FILL:
        return "triangle"
    if abs(centroid_y - 0.5) <= SYMMETRIC_MAX_OFFSET:
        if fill >= SQUARE_MIN_FILL:
            return "square"
        if fill >= CIRCLE_MIN_FILL:
            return "circle"
    return "unknown"


def _classify_size(extent: int, scale: float) -> str | None:
    if extent <= SMALL_MAX_EXTENT * scale:
        return "small"
    if extent >= BIG_MIN_EXTENT * scale:
        return "big"
    return None


def detect_objects(images: np.ndarray) -> list[tuple[DetectedObject, ...]]:
    """Objects in each image of a batch (NHWC or NCHW, uint8 or float in [0,1])."""
    labels = assign_colours(images)
    n, h, w = labels.shape
    scale = min(h, w) / REFERENCE_SIZE
    min_area = max(2, int(round(MIN_AREA * h * w / REFERENCE_SIZE**2)))
    found: list[list[DetectedObject]] = [[] for _ in range(n)]
    for k, colour in enumerate(COLOURS):
        components, n_components = ndimage.label(labels == k, structure=_BATCH_STRUCTURE)
        if n_components == 0:
            continue
        areas = np.bincount(components.ravel(), minlength=n_components + 1)
        slices = ndimage.find_objects(components)
        # Only components big enough to be objects reach the Python loop (noise makes many specks).
        for index in np.flatnonzero(areas[1:] >= min_area):
            sl = slices[index]
            mask = ndimage.binary_fill_holes(components[sl][0] == index + 1)
            bh, bw = mask.shape
            area = int(mask.sum())
            rows = np.nonzero(mask)[0]
            fill = area / float(bh * bw)
            centroid_y = (rows.mean() + 0.5) / bh
            y0, x0 = sl[1].start, sl[2].start
            found[sl[0].start].append(
                DetectedObject(
                    colour=colour,
                    shape=_classify_shape(bh, bw, fill, centroid_y, scale),
                    size=_classify_size(max(bh, bw), scale),
                    centre=(y0 + bh / 2.0, x0 + bw / 2.0),
                    bbox=(y0, x0, y0 + bh, x0 + bw),
                    area=area,
                    fill=round(fill, 4),
                    centroid_y=round(float(centroid_y), 4),
                )
            )
    # Reading order (top to bottom, left to right) so the listing is stable for display.
    return [tuple(sorted(objs, key=lambda o: (o.bbox[0], o.bbox[1]))) for objs in found]


def prompt_task(spec: PromptSpec | str) -> str:
    """GenEval-style task of a prompt (one of TASKS).

    single phrase, one object, no size -> ``single_object``; with a size word -> ``size``; two or three
    objects -> ``counting``; relations -> ``position``; conjunctions by what tells their phrases apart:
    shape only (same colour) -> ``two_objects``, colour only (same shape) -> ``colors``, both ->
    ``color_attr`` (each colour must be bound to the right shape).
    """
    spec = as_spec(spec)
    if spec.relation is not None:
        return "position"
    if len(spec.objects) == 1:
        obj = spec.objects[0]
        if obj.count > 1:
            return "counting"
        return "size" if obj.size is not None else "single_object"
    first, second = spec.objects
    if first.colour == second.colour:
        return "two_objects"
    if first.shape == second.shape:
        return "colors"
    return "color_attr"


def _attribute_credit(requested: tuple[str, str, str | None], detected: DetectedObject) -> float:
    colour, shape, size = requested
    checks = [detected.colour == colour, detected.shape == shape]
    if size is not None:
        checks.append(detected.size == size)
    return sum(checks) / len(checks)


def matched_score(objects: Sequence[DetectedObject], spec: PromptSpec | str, size: int = REFERENCE_SIZE,
                  extra_object_cost: float | None = None) -> float:
    r"""Dense score aligned with accuracy: match requested instances to detections one-to-one.

    With requested instances $i = 1..N$, detections $d$, a maximum-credit one-to-one matching $M$ (pairs
    with zero credit are not matches), credit $c(i, d)$ = fraction of $i$'s attributes (colour, shape and
    size when asked) that $d$ has, $E$ the detections left unmatched and $R = 1$ for relation prompts:

    $$ s = \max\Big(0,\ \frac{\sum_{(i,d) \in M} c(i,d) + R\,[\text{relation holds}] - \lambda |E|}{N + R}\Big),
    \qquad \lambda = 1/2, $$

    where the relation is checked between the two detections matched to the related objects, so one wrong
    attribute costs that attribute only. Drawing exactly what was asked is the only way to reach 1, and an
    unrequested object costs as much as a wrong attribute of a two-attribute object, never less.
    ``extra_object_cost`` sets $\lambda$ (default: ``EXTRA_OBJECT_COST``, read at call time).
    """
    spec = as_spec(spec)
    cost = EXTRA_OBJECT_COST if extra_object_cost is None else extra_object_cost
    requested = [(p.colour, p.shape, p.size) for p in spec.objects for _ in range(p.count)]
    credit = np.array([[_attribute_credit(r, d) for d in objects] for r in requested]).reshape(len(requested), -1)
    # A match also saves the extra-object cost of its detection; zero-credit pairs are no match.
    gain = np.where(credit > 0, credit + cost, 0.0)
    if spec.relation is None:
        rows, cols = linear_sum_assignment(gain, maximize=True)
        best = float(gain[rows, cols].sum())
        units = len(requested)
    else:
        # Two single objects: try every pair of detections (or none) so the relation joins the matching.
        name, a, b = spec.relation
        margin = EVAL_RELATION_MARGIN * size / REFERENCE_SIZE
        options = [None, *range(len(objects))]
        best = 0.0
        for da in options:
            for db in options:
                if da is not None and da == db:
                    continue
                total = (gain[a, da] if da is not None else 0.0) + (gain[b, db] if db is not None else 0.0)
                if (da is not None and db is not None and credit[a, da] > 0 and credit[b, db] > 0
                        and relation_holds(name, objects[da].centre, objects[db].centre, margin)):
                    total += 1.0
                best = max(best, float(total))
        units = len(requested) + 1
    total = best - cost * len(objects)
    return max(0.0, total / units)


def score_objects(
    objects: Sequence[DetectedObject], spec: PromptSpec | str, size: int = REFERENCE_SIZE
) -> Evaluation:
    """Score detected objects against a prompt (``size``: image side, which scales the margin)."""
    spec = as_spec(spec)
    matches = [[o for o in objects if (o.colour, o.shape) == phrase.key] for phrase in spec.objects]
    criteria: dict[str, bool] = {}
    criteria["count"] = (
        all(len(m) == p.count for m, p in zip(matches, spec.objects)) and len(objects) == spec.n_objects
    )
    criteria["colour"] = all(
        sum(o.colour == c for o in objects) >= sum(p.count for p in spec.objects if p.colour == c)
        for c in {p.colour for p in spec.objects}
    )
    criteria["shape"] = all(
        sum(o.shape == s for o in objects) >= sum(p.count for p in spec.objects if p.shape == s)
        for s in {p.shape for p in spec.objects}
    )
    if any(p.size is not None for p in spec.objects):
        criteria["size"] = all(
            len(m) > 0 and all(o.size == p.size for o in m)
            for m, p in zip(matches, spec.objects)
            if p.size is not None
        )
    if spec.relation is not None:
        name, a, b = spec.relation
        margin = EVAL_RELATION_MARGIN * size / REFERENCE_SIZE
        criteria["relation"] = any(
            relation_holds(name, oa.centre, ob.centre, margin) for oa in matches[a] for ob in matches[b]
        )
    correct = all(criteria.values())
    criteria_score = sum(criteria.values()) / len(criteria)
    score = matched_score(objects, spec, size)
    return Evaluation(spec.text, criteria, correct, float(score), tuple(objects),
                      criteria_score=float(criteria_score), task=prompt_task(spec))


def evaluate_batch(images: np.ndarray, specs: Sequence[PromptSpec | str]) -> list[Evaluation]:
    """Evaluate a batch: images (N,H,W,3) or (N,3,H,W), uint8 or float in [0,1]; one spec per image."""
    x = _as_float_nhwc(images)
    if len(specs) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {len(specs)} prompts")
    detected = detect_objects(x)
    side = min(x.shape[1], x.shape[2])
    return [score_objects(objs, spec, side) for objs, spec in zip(detected, specs)]


def evaluate(image: np.ndarray, spec: PromptSpec | str) -> Evaluation:
    """Evaluate one image (H,W,3) or (3,H,W), uint8 or float in [0,1], against one prompt."""
    x = np.asarray(image)
    if x.ndim != 3:
        raise ValueError(f"expected one image of shape (H,W,3) or (3,H,W), got {x.shape}")
    return evaluate_batch(x[None], [spec])[0]


def aggregate(evaluations: Sequence[Evaluation]) -> dict[str, float]:
    """Overall accuracy, mean scores, per-criterion accuracy (over the prompts that have it), per-task
    accuracy ``task_<name>`` and ``task_mean``, the unweighted mean over the tasks present (GenEval's
    overall score)."""
    if not evaluations:
        raise ValueError("no evaluations to aggregate")
    out: dict[str, float] = {
        "n": float(len(evaluations)),
        "accuracy": float(np.mean([e.correct for e in evaluations])),
        "mean_score": float(np.mean([e.score for e in evaluations])),
        "criteria_score": float(np.mean([e.criteria_score for e in evaluations])),
        "objects_per_image": float(np.mean([len(e.objects) for e in evaluations])),
    }
    out.update(accuracy_by_criterion_and_task(evaluations, CRITERIA, TASKS))
    return out


def accuracy_by_criterion_and_task(evaluations: Sequence, criteria: Sequence[str],
                                   tasks: Sequence[str]) -> dict[str, float]:
    """Per-criterion accuracy over the evaluations that have the criterion, ``task_<name>`` accuracy per task
    present, and ``task_mean``, their unweighted mean (any world whose verdicts carry ``criteria``,
    ``correct`` and ``task``)."""
    out: dict[str, float] = {}
    for name in criteria:
        values = [e.criteria[name] for e in evaluations if name in e.criteria]
        if values:
            out[name] = float(np.mean(values))
    present = []
    for task in tasks:
        values = [e.correct for e in evaluations if e.task == task]
        if values:
            out[f"task_{task}"] = float(np.mean(values))
            present.append(out[f"task_{task}"])
    out["task_mean"] = float(np.mean(present))
    return out


def aggregate_verdicts(evaluations: Sequence, criteria: Sequence[str], tasks: Sequence[str]) -> dict[str, float]:
    """Accuracy, mean matched score, per-criterion and per-task accuracy, and the mean over tasks, of any
    world whose verdicts carry ``correct``, ``score``, ``criteria`` and ``task``."""
    if not evaluations:
        raise ValueError("no evaluations to aggregate")
    out = {"n": float(len(evaluations)), "accuracy": float(np.mean([e.correct for e in evaluations])),
           "mean_score": float(np.mean([e.score for e in evaluations]))}
    out.update(accuracy_by_criterion_and_task(evaluations, criteria, tasks))
    return out
