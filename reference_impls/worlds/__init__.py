"""Synthetic worlds where the truth is known: prompts, ground-truth renders and exact evaluators.

ShapeWorld (images): a small prompt grammar of coloured shapes with counts, sizes and spatial
relations; a renderer for ground-truth 32x32 images; an evaluator that parses any image back into
objects and scores each criterion of the prompt exactly (our GenEval). See ``grammar``, ``render``
and ``evaluate`` for the details of each part.
"""

from .evaluate import (
    CRITERIA,
    EXTRA_OBJECT_COST,
    TASKS,
    DetectedObject,
    Evaluation,
    aggregate,
    assign_colours,
    detect_objects,
    evaluate,
    evaluate_batch,
    matched_score,
    prompt_task,
    score_objects,
)
from .grammar import (
    COLOURS,
    COUNT_WORDS,
    MAX_OBJECTS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ObjectSpec,
    PromptError,
    PromptSpec,
    Relation,
    all_prompts,
    as_spec,
    is_heldout,
    parse_prompt,
    prompt_split,
    sample_prompts,
)
from .render import BACKGROUND, PALETTE, PlacedObject, draw, layout, render, render_batch, shape_mask

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "COUNT_WORDS",
    "CRITERIA",
    "EXTRA_OBJECT_COST",
    "TASKS",
    "MAX_OBJECTS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "DetectedObject",
    "Evaluation",
    "ObjectSpec",
    "PlacedObject",
    "PromptError",
    "PromptSpec",
    "Relation",
    "aggregate",
    "all_prompts",
    "as_spec",
    "assign_colours",
    "detect_objects",
    "draw",
    "evaluate",
    "evaluate_batch",
    "is_heldout",
    "layout",
    "matched_score",
    "parse_prompt",
    "prompt_split",
    "prompt_task",
    "render",
    "render_batch",
    "sample_prompts",
    "score_objects",
    "shape_mask",
]
