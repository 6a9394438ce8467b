"""The synthetic worlds by name: what evaluation, comparison, training and the CLI need to know of each.

A world is a prompt grammar with splits, an exact evaluator and GenEval-style tasks. Models carry the
name of the world they were pretrained on (``GenerativePolicy.world``); everything downstream looks the
world up here instead of asking "is this ShapeWorld?". Modality lives in the world: ``image`` worlds
score (N, H, W, 3) arrays, ``video`` worlds (N, F, H, W, 3) clips, ``multiview`` worlds (N, V, H, W, 3) views
from fixed cameras (the same layout as clips, with views in place of frames).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch


@dataclass(frozen=True)
class World:
    """One synthetic world's interface."""

    name: str
    modality: Literal["image", "video", "multiview"]
    """What its samples are: images (B, 3, H, W), clips (B, 3, F, H, W) or views (B, 3, V, H, W)."""
    splits: tuple[str, ...]
    """Named prompt splits (``heldout`` is never trained on)."""
    tasks: tuple[str, ...]
    """GenEval-style tasks, in report order."""
    prompt_split: Callable[[str], list[str]]
    """Split name -> prompts (ValueError naming the valid splits for an unknown one)."""
    canonical: Callable[[str], str]
    """Any accepted spelling of a prompt -> its canonical text (``prompt_error`` if outside the grammar)."""
    prompt_task: Callable[[str], str]
    """Prompt -> its task."""
    evaluate: Callable[[np.ndarray, Sequence[str]], list[Any]]
    """uint8 media (N, H, W, 3) or (N, F, H, W, 3) and prompts -> one verdict per sample, each with
    ``correct``, ``score`` (the matched score, 1 exactly when correct) and ``objects``."""
    aggregate: Callable[[Sequence[Any]], dict[str, float]]
    """Verdicts -> accuracy, mean score, per-criterion and per-task accuracy."""
    prompt_error: type[ValueError]
    """The error a prompt outside the grammar raises."""

    def sample_prompts(self, n: int, split: str, rng: np.random.Generator) -> list[str]:
        """``n`` prompts uniformly with replacement from ``split`` (deterministic given ``rng``)."""
        pool = self.prompt_split(split)
        return [pool[i] for i in rng.integers(0, len(pool), size=n)]


class UnknownWorldError(ValueError):
    """A world name that is not registered; the message lists the valid ones."""


def _shapes() -> World:
    from reference_impls.worlds import (
        SPLITS,
        TASKS,
        PromptError,
        aggregate,
        as_spec,
        evaluate_batch,
        prompt_split,
        prompt_task,
    )

    return World("shapes", "image", SPLITS, TASKS, prompt_split, lambda p: as_spec(p).text, prompt_task,
                 evaluate_batch, aggregate, PromptError)


def _motion() -> World:
    from reference_impls.worlds import motion

    return World("motion", "video", motion.SPLITS, motion.TASKS, motion.motion_prompt_split,
                 lambda p: motion.parse_motion_prompt(p).text, lambda p: motion.as_motion_spec(p).task,
                 motion.evaluate_clips, motion.aggregate_motion, motion.MotionPromptError)


def _solid() -> World:
    from reference_impls.worlds import solid

    def evaluate(views: np.ndarray, prompts: Sequence[str]) -> list[Any]:
        return solid.evaluate_views(views, prompts)

    return World("solid", "multiview", solid.SPLITS, solid.TASKS, solid.solid_prompt_split,
                 lambda p: solid.parse_solid_prompt(p).text, lambda p: solid.as_solid_spec(p).task,
                 evaluate, solid.aggregate_solid, solid.SolidPromptError)


_BUILDERS: dict[str, Callable[[], World]] = {"shapes": _shapes, "motion": _motion, "solid": _solid}
WORLD_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_world(name: str) -> World:
    if name not in _BUILDERS:
        close = difflib.get_close_matches(name, WORLD_NAMES, n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownWorldError(f"unknown world {name!r}.{hint} Valid worlds: {', '.join(WORLD_NAMES)}")
    return _BUILDERS[name]()


def to_uint8(media: torch.Tensor) -> np.ndarray:
    """Images (N, 3, H, W) -> (N, H, W, 3) or clips (N, 3, F, H, W) -> (N, F, H, W, 3), uint8, from [0, 1]."""
    array = (media.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    if array.dim() == 4:
        return array.permute(0, 2, 3, 1).numpy()
    if array.dim() == 5:
        return array.permute(0, 2, 3, 4, 1).numpy()
    raise ValueError(f"expected images (N, 3, H, W) or clips (N, 3, F, H, W), got {tuple(media.shape)}")
