"""Named rewards over generated images.

A reward maps a batch of images in [0, 1], shape (B, 3, H, W), and their prompts to a (B,) tensor.
Differentiable rewards keep the autograd graph (reward-backprop methods need it); the others are
computed on detached copies and return plain tensors (policy-gradient methods need only values).

* ``jpeg-compressibility`` / ``jpeg-incompressibility``: minus / plus the JPEG file size in kB, as in
  DDPO (Black et al., 2023); of a clip, the mean over its frames. Not differentiable.
* ``shapes-composition``: half for an exactly right image, half the exact ShapeWorld evaluator's matched
  score: (accuracy + matched score) / 2. 1 exactly when the image is correct, dense like the matched score,
  and aligned with accuracy at the margin too, not only at its optimum: half of it is paid only for an
  exactly right image, so partial credit cannot outbid accuracy (``python -m benchmarks.reward_margin``:
  its accuracy slope is 0.97 of the binary reward's, the matched score's alone 0.74). Our GenEval-style
  verifiable reward. Not differentiable.
* ``shapes-matched``: the matched score alone (``shapes-composition`` before 2026-12-07): requested objects
  matched one to one to detected ones, partial credit per attribute, a cost for every unrequested object,
  the relation as one more unit. 1 exactly when correct, but its partial credit pays for extra objects at
  the margin (objects-per-image slope five times the binary reward's).
* ``shapes-criteria``: the fraction of the evaluator's criteria that hold (count, colour, shape, size,
  relation). Kept as the documented example of a verifiable reward that can be gamed: colour and shape
  pass with "at least" counts, so drawing extra objects raises it while accuracy falls.
* ``shapes-accuracy``: 1 if every criterion holds, else 0 (the metric we report as accuracy).
* ``prompt-colour``: mean soft membership of pixels in the colour(s) the prompt names. Differentiable,
  and hackable on purpose: painting the whole canvas that colour maximises it while the exact
  evaluator's score collapses.
* ``random-control``: not a goal but a control: uniform noise keyed by a hash of each sample's 8-bit pixels
  (images, clips or views). Deterministic, and unpredictable from the image, so the advantages it gives are
  pure noise; a method trained on it shows what its procedure alone does to the model (drift), which the
  real reward's effect has to be judged against.
* ``shapes-learned``: a small CNN trained to predict the exact evaluator's score from (image, prompt)
  (``reference_impls/rewards/learned.py``): the ImageReward/PickScore analogue. Differentiable.

Video rewards take clips (B, 3, F, H, W):

* ``motion-composition``: MotionWorld's exact matched score: requested moving objects matched one to one
  to tracks, credit for colour, shape, direction and speed, a cost for every extra or broken track; 1
  exactly when the clip is correct (aligned with the accuracy reported, like ``shapes-matched``).
* ``motion-accuracy``: 1 if every criterion of the clip holds, else 0.
* ``motion-learned``: a small 3D CNN trained to predict the exact evaluator's criteria from (clip, prompt)
  (``reference_impls/rewards/learned_motion.py``): the learned video reward VADER backpropagates through.
  Differentiable.

Multi-view rewards take SolidWorld's views (B, 3, V, H, W):

* ``solid-composition``: SolidWorld's exact matched score: requested objects matched one to one to the
  primitives fitted to the views (colour, shape, size, cross-view consistency), the relation judged on the
  fitted 3D layout, extra objects cost; 1 exactly when the views are correct.
* ``solid-accuracy``: 1 if every criterion holds, else 0.
* ``solid-consistency``: the multi-view reconstruction consistency in the spirit of Carve3D's MRC (Xie et
  al., 2024), which fits a NeRF to the views, re-renders them and compares: here the evaluator fits one
  primitive per colour to the views and re-renders it, and the reward is the silhouettes' IoU with the
  re-rendering, averaged over the objects found, scaled down by every extra blob (an object that splits
  in a view cannot be one solid), 0 when nothing is found. It reads no prompt.
* ``solid-stability``: DSO's physical feedback (Li et al., 2025) on the fitted layout: 1 if every object
  stands (on the ground, or centred on the flat top of a cube or cylinder), else 0. It reads no prompt,
  so a model can satisfy it by ignoring "on top of"; it is reported beside accuracy, never instead of it.
* ``solid-global`` / ``solid-parts``: the two levels of AR3D-R1's hierarchical reward (Tang et al., 2025),
  read off the exact verdict. Global: the fraction of the scene-level criteria that hold (object count,
  cross-view consistency, and the relation when there is one): is the layout right? Parts: the mean over
  the requested objects of the fraction of their own attributes (colour, shape, size when asked) that the
  best detected object of that colour has, 0 for a missing colour: is each part right?
  Flow-GRPO's ``--hierarchical`` trains its early (coarse) denoising steps on the first and its late (fine)
  steps on the second.
* ``solid-learned``: a small multi-view CNN trained to predict the exact SolidWorld criteria from the four
  views and the prompt (``reference_impls/rewards/learned_solid.py``): the analogue of DreamReward's Reward3D
  that DreamReward backpropagates through into a 3D field. Differentiable.
"""

from __future__ import annotations

import difflib
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class RewardFunction:
    """A named reward."""

    name: str
    fn: Callable[[torch.Tensor, list[str]], torch.Tensor]
    """(images in [0,1] of shape (B, 3, H, W), prompts) -> rewards (B,)."""
    differentiable: bool
    """True if gradients flow from the reward to the images."""
    description: str
    """One line for ``rlvg train --help`` and the docs."""
    world: str | None = None
    """The synthetic world whose prompts it needs (``shapes``, ``motion``, ``solid``), or None for any prompt."""
    modality: str = "image"
    """What it scores: ``image`` (B, 3, H, W), ``video`` clips (B, 3, F, H, W), ``multiview`` views
    (B, 3, V, H, W), or ``any`` of them."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        expected = {"image": (4,), "video": (5,), "multiview": (5,), "any": (4, 5)}[self.modality]
        if images.dim() not in expected or images.shape[1] != 3:
            layout = {"image": "(B, 3, H, W)", "video": "(B, 3, F, H, W)", "multiview": "(B, 3, V, H, W)",
                      "any": "(B, 3, H, W) or (B, 3, F, H, W)"}[self.modality]
            noun = "views" if self.modality == "multiview" else f"{self.modality}s"
            raise ValueError(f"reward {self.name!r} scores {noun} of shape {layout}, got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"reward {self.name!r}: {len(prompts)} prompts for {images.shape[0]} images")
        if self.differentiable:
            return self.fn(images, prompts)
        with torch.no_grad():
            return self.fn(images.detach(), prompts)


class UnknownRewardError(ValueError):
    """An unknown reward name; the message lists the valid ones."""


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG size of each image in kB; of a clip (B, 3, F, H, W), the mean over its frames."""
    if images.dim() == 5:
        batch, _, frames = images.shape[:3]
        per_frame = jpeg_size_kb(images.transpose(1, 2).flatten(0, 1), quality)
        return per_frame.view(batch, frames).mean(dim=1)
    sizes = []
    for array in _to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


def exact_verdicts(world: str, media: torch.Tensor, prompts: list[str]) -> list:
    """The world's exact evaluator on media in [0, 1]: images, clips or views (one verdict per sample)."""
    from reference_impls.worlds.registry import get_world, to_uint8

    return get_world(world).evaluate(to_uint8(media), prompts)


def verdict_reward(world: str, value: Callable[[Any], float]) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """A reward that reads one number off each exact verdict (the matched score, correctness, ...)."""
    def reward(media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        values = [float(value(verdict)) for verdict in exact_verdicts(world, media, prompts)]
        return torch.tensor(values, dtype=torch.float32, device=media.device)

    return reward


def pixel_hash_noise(media: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Uniform noise in [0, 1) keyed by each sample's 8-bit pixels: the same image always gets the same value, and
    no function of the image the model could learn predicts it (a hash, not a projection)."""
    quantised = (media.clamp(0, 1) * 255).round().to(torch.uint8).flatten(1).cpu().numpy()
    values = [int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") / 2.0**64
              for row in quantised]
    return torch.tensor(values, dtype=torch.float32, device=media.device)


def accuracy_and_matched(verdict: Any) -> float:
    """Half for being exactly right, half the matched score: aligned with accuracy at the margin too."""
    return 0.5 * float(verdict.correct) + 0.5 * float(verdict.score)


def motion_learned(clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    from reference_impls.rewards.learned_motion import learned_motion_reward

    return learned_motion_reward(clips, prompts)


def reconstruction_consistency(objects) -> float:  # noqa: ANN001 - a sequence of FittedSolid
    """Mean fitted IoU over the objects, divided by (1 + the extra blobs): 1 for views of one clean 3D layout."""
    if not objects:
        return 0.0
    extra_blobs = sum(max(0, o.blobs - 1) for o in objects)
    return float(np.mean([o.iou for o in objects])) / (1 + extra_blobs)


def solid_consistency(views: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    from reference_impls.worlds.registry import to_uint8
    from reference_impls.worlds.solid import detect_solids

    scores = [reconstruction_consistency(detect_solids(sample)) for sample in to_uint8(views)]
    return torch.tensor(scores, dtype=torch.float32, device=views.device)


GLOBAL_CRITERIA = ("count", "consistency", "relation")


def global_score(verdict) -> float:  # noqa: ANN001 - a SolidEvaluation
    """Fraction of the scene-level criteria (count, consistency, relation if asked) that hold."""
    held = [verdict.criteria[k] for k in GLOBAL_CRITERIA if k in verdict.criteria]
    return float(np.mean(held))


def part_score(verdict) -> float:  # noqa: ANN001 - a SolidEvaluation
    """Mean over requested objects of the best same-colour detection's share of their shape/size checks."""
    from reference_impls.worlds.solid import as_solid_spec

    per_object = []
    for obj in as_solid_spec(verdict.prompt).objects:
        candidates = [d for d in verdict.objects if d.colour == obj.colour]
        checks = [[d.shape == obj.shape] + ([d.size == obj.size] if obj.size else []) for d in candidates]
        # Colour found counts as one passed check of 1 + len(checks); a missing colour scores 0.
        per_object.append(max(((1 + sum(c)) / (1 + len(c)) for c in checks), default=0.0))
    return float(np.mean(per_object))


def solid_stability(views: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    from reference_impls.worlds.registry import to_uint8
    from reference_impls.worlds.solid import detect_solids, scene_stands

    stable = [float(scene_stands(detect_solids(sample))) for sample in to_uint8(views)]
    return torch.tensor(stable, dtype=torch.float32, device=views.device)


PROMPT_COLOUR_WIDTH = 0.25
"""Width (RGB distance in [0,1] units) of the soft colour membership; palette colours are >= 0.76 apart."""


def _prompt_colours(prompt: str) -> list[str]:
    from reference_impls.worlds import as_spec

    return sorted({obj.colour for obj in as_spec(prompt).objects})


def prompt_colour(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    from reference_impls.worlds import PALETTE

    pixels = images.permute(0, 2, 3, 1)  # (B, H, W, 3)
    rewards = []
    for pixel_block, prompt in zip(pixels, prompts):
        targets = torch.tensor([PALETTE[c] for c in _prompt_colours(prompt)], dtype=images.dtype,
                               device=images.device) / 255.0
        distance2 = ((pixel_block[:, :, None, :] - targets[None, None]) ** 2).sum(-1)  # (H, W, K)
        membership = torch.exp(-distance2 / (2 * PROMPT_COLOUR_WIDTH**2)).amax(dim=-1)
        rewards.append(membership.mean())
    return torch.stack(rewards)


def solid_learned(views: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    from reference_impls.rewards.learned_solid import learned_solid_reward

    return learned_solid_reward(views, prompts)


def shapes_learned(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    from reference_impls.rewards.learned import learned_composition_reward

    return learned_composition_reward(images, prompts)


REWARDS: dict[str, RewardFunction] = {
    r.name: r
    for r in [
        RewardFunction("jpeg-compressibility", lambda im, p: -jpeg_size_kb(im), False,
                       "minus the JPEG size in kB (quality 95), as in DDPO; clips: mean over frames",
                       modality="any"),
        RewardFunction("jpeg-incompressibility", lambda im, p: jpeg_size_kb(im), False,
                       "the JPEG size in kB (quality 95), as in DDPO; clips: mean over frames", modality="any"),
        RewardFunction("random-control", pixel_hash_noise, False,
                       "control, not a goal: uniform noise keyed by a hash of each sample's pixels; shows what a "
                       "method's procedure does to a model with no signal to follow", modality="any"),
        RewardFunction("shapes-composition", verdict_reward("shapes", accuracy_and_matched), False,
                       "exact ShapeWorld evaluator: (accuracy + matched score) / 2; 1 exactly when correct, dense, "
                       "and half of it paid only for an exactly right image", world="shapes"),
        RewardFunction("shapes-matched", verdict_reward("shapes", lambda e: e.score), False,
                       "exact ShapeWorld evaluator's matched score: matched objects with partial credit, extra "
                       "objects cost; 1 exactly when correct (shapes-composition before 2026-12-07)", world="shapes"),
        RewardFunction("shapes-criteria", verdict_reward("shapes", lambda e: e.criteria_score), False,
                       "gameable on purpose: fraction of prompt criteria satisfied (extra objects pay)",
                       world="shapes"),
        RewardFunction("shapes-accuracy", verdict_reward("shapes", lambda e: e.correct), False,
                       "exact ShapeWorld evaluator: 1 if all criteria hold, else 0", world="shapes"),
        RewardFunction("prompt-colour", prompt_colour, True,
                       "differentiable: mean soft membership of pixels in the prompt's colours", world="shapes"),
        RewardFunction("shapes-learned", shapes_learned, True,
                       "differentiable: a small CNN's prediction of the exact evaluator's score", world="shapes"),
        RewardFunction("motion-composition", verdict_reward("motion", lambda e: e.score), False,
                       "exact MotionWorld evaluator on clips: matched moving objects (colour, shape, direction, "
                       "speed), extra or broken tracks cost; 1 exactly when correct", world="motion",
                       modality="video"),
        RewardFunction("motion-accuracy", verdict_reward("motion", lambda e: e.correct), False,
                       "exact MotionWorld evaluator on clips: 1 if all criteria hold, else 0", world="motion",
                       modality="video"),
        RewardFunction("motion-learned", motion_learned, True,
                       "differentiable: a small 3D CNN's prediction of the exact MotionWorld criteria",
                       world="motion", modality="video"),
        RewardFunction("solid-composition", verdict_reward("solid", lambda e: e.score), False,
                       "exact SolidWorld evaluator on 4 views: matched primitives fitted to the views (colour, "
                       "shape, size, cross-view consistency), relation on the fitted layout; 1 exactly when "
                       "correct", world="solid", modality="multiview"),
        RewardFunction("solid-accuracy", verdict_reward("solid", lambda e: e.correct), False,
                       "exact SolidWorld evaluator on 4 views: 1 if all criteria hold, else 0", world="solid",
                       modality="multiview"),
        RewardFunction("solid-consistency", solid_consistency, False,
                       "Carve3D-style reconstruction consistency: IoU of the views with the re-rendered fitted "
                       "primitives, extra blobs cost; reads no prompt", world="solid", modality="multiview"),
        RewardFunction("solid-stability", solid_stability, False,
                       "DSO-style physical feedback: 1 if every fitted object stands (ground, or centred on a "
                       "cube's or cylinder's top), else 0; reads no prompt", world="solid", modality="multiview"),
        RewardFunction("solid-global", verdict_reward("solid", global_score), False,
                       "AR3D-R1's coarse level on the exact verdict: fraction of count, consistency and relation "
                       "(if asked) that hold", world="solid", modality="multiview"),
        RewardFunction("solid-parts", verdict_reward("solid", part_score), False,
                       "AR3D-R1's fine level on the exact verdict: per requested object, the share of its colour, "
                       "shape and size (if asked) that the best same-colour detection has", world="solid",
                       modality="multiview"),
        RewardFunction("solid-learned", solid_learned, True,
                       "differentiable: a small multi-view CNN's prediction of the exact SolidWorld criteria (the "
                       "Reward3D analogue)", world="solid", modality="multiview"),
    ]
}


def reward_names() -> list[str]:
    return sorted(REWARDS)


def get_reward(name: str, model_path: str | None = None) -> RewardFunction:
    """The named reward; a pretrained one (``pickscore``, ``aesthetic``, ``hpsv2``) loads from ``model_path``."""
    from reference_impls.rewards.pretrained import PRETRAINED_REWARDS

    if name in PRETRAINED_REWARDS:
        if not model_path:
            raise ValueError(f"reward {name!r} is a pretrained model: pass --reward-model PATH, a local folder with "
                             "its weights (see reference_impls/rewards/pretrained.py)")
        return PRETRAINED_REWARDS[name](model_path)
    if model_path:
        raise ValueError(f"--reward-model is for the pretrained rewards ({', '.join(PRETRAINED_REWARDS)}); "
                         f"{name!r} takes none")
    if name in REWARDS:
        return REWARDS[name]
    valid = [*reward_names(), *(f"{n} (with --reward-model PATH)" for n in PRETRAINED_REWARDS)]
    close = difflib.get_close_matches(name, [*REWARDS, *PRETRAINED_REWARDS], n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownRewardError(f"unknown reward {name!r}.{hint} Valid rewards: {', '.join(valid)}")
