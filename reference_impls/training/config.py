"""Dataclass configs shared by every method, presets, and their command-line flags.

Each field's docstring (the string literal under it) is its ``--help`` text: one source for the code,
the CLI and the docs.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from dataclasses import dataclass, fields
from functools import cache
from typing import Any, get_type_hints

PRESETS = ("smoke", "cpu", "gpu")
SHARED_PRESETS: dict[str, dict[str, Any]] = {
    # A 20-step evaluation at the start and the end was most of a video or multi-view smoke run (38 of 50 s
    # of VADER's notebook run); the cpu and gpu presets keep 20 steps.
    "smoke": {"eval_num_steps": 8},
}
"""Settings every method's preset of that name starts from, below the method's own."""
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings every method shares. Methods subclass it to add their own."""

    model: str = "shapes-diffusion"
    """Shipped model name (shapes-diffusion, shapes-flow) or a local checkpoint/pipeline folder."""
    reward: str = "jpeg-compressibility"
    """Reward name (see rlvg train METHOD --help for the list)."""
    reward_model: str = ""
    """Local folder with the weights of a pretrained reward (pickscore, aesthetic, hpsv2); empty for the others."""
    preset: str = "smoke"
    """smoke (under a minute on 2 CPU cores), cpu (a real run of minutes), gpu (real checkpoints)."""
    steps: int = 8
    """Outer iterations: each collects fresh samples (or pairs) and updates the policy."""
    seed: int = 0
    """Seeds prompts, noise and minibatch order; the same seed and thread count give the same metrics on CPU
    (another thread count rounds sums differently, which over hundreds of updates makes a different run)."""
    device: str = "cpu"
    """Torch device (cpu, cuda, cuda:1, mps)."""
    prompts: str = "train"
    """Training prompts: a ShapeWorld split (train, easy, or train-<task> such as train-position for one
    GenEval-style task) or one literal prompt in quotes."""
    batch_size: int = 8
    """Samples collected per outer iteration."""
    num_steps: int = 10
    """Denoising steps of the training sampler."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight during training rollouts (1.0 = off)."""
    learning_rate: float = 3e-4
    """AdamW learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    eval_every: int = 4
    """Evaluate on fixed held-out prompts every this many steps (0 = only at start and end)."""
    eval_prompts: int = 32
    """Number of held-out prompts per evaluation."""
    eval_num_steps: int = 20
    """Steps of the deterministic sampler that draws the held-out evaluation during training (num_steps if
    that is more). Smoke presets use 8: they check that a run works end to end, not how good its images are."""
    checkpoint_every: int = 4
    """Write an atomic checkpoint every this many steps (and at the end)."""
    threads: int = 0
    """CPU threads for torch (0 = torch's default); part of what makes a run reproducible (see seed)."""
    lora_rank: int = 0
    """Train LoRA adapters of this rank on the denoiser's attention projections instead of every weight
    (0 = full fine-tuning). The final model folder holds the merged weights."""
    lora_alpha: float = 0.0
    """LoRA scale numerator: the update is (lora_alpha / lora_rank) B A (0 = lora_rank, a scale of 1)."""
    gradient_checkpointing: bool = False
    """Recompute the denoiser's block activations during backward instead of storing them (diffusers'
    enable_gradient_checkpointing): less memory for about a third more compute."""
    channels_last: bool = False
    """Keep the denoiser's weights in channels-last memory order, which oneDNN's CPU convolutions (and cuDNN's
    under bf16/fp16) run faster. Off by default: the results in benchmarks/ were measured without it, and a
    different convolution kernel changes the last bits of every number (benchmarks/trl_ddpo_speed.py)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the trained weights, w_ema <- d w_ema + (1 - d) w after every
    optimiser step (0 = off). The final model folder then holds the averaged weights."""
    mixed_precision: str = "no"
    """Denoiser forward passes under autocast: no, bf16 or fp16. Weights, optimiser state and the sampler's
    Gaussian arithmetic (means, stds, log-probs) stay fp32. fp16 has no loss scaling: prefer bf16."""

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; valid presets: {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "num_steps", "eval_prompts", "eval_num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the docstring written under it (walking the class hierarchy)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, following in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_int_pair(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected two integers START,END, got {text!r}") from error
    return start, end


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per dataclass field; defaults are left as None so presets can fill them."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    for f in fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        hint = hints[f.name]
        kind = {int: int, float: float, str: str, bool: _parse_bool}.get(hint)
        if kind is None and "tuple[int, int]" in str(hint):
            kind = _parse_int_pair
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            default=None,
            metavar=f.name.upper() if kind is not _parse_bool else "BOOL",
            help=f"{docs.get(f.name, '')} (default: {default!r}, presets may override)",
        )


def build_config(cls: type, presets: dict[str, dict[str, Any]], overrides: dict[str, Any],
                 video_presets: dict[str, dict[str, Any]] | None = None) -> Any:
    """Dataclass defaults < ``SHARED_PRESETS`` < the method's preset < its video variant (for a video or
    multi-view model) < explicit flags.

    A rollout of an 8-frame clip costs about nine images' worth (``benchmarks/video_cost.py``), so a
    method's presets may carry a video variant that keeps the same preset inside its time budget. Four views
    of a SolidWorld scene cost about half a clip and take the same variant.
    """
    preset = overrides.get("preset") or "smoke"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    values = {**SHARED_PRESETS.get(preset, {}), **presets.get(preset, {})}
    if video_presets and preset in video_presets:
        defaults = {f.name: f.default for f in fields(cls)}
        model = overrides.get("model") or values.get("model") or defaults.get("model")
        if model is not None and model_modality(str(model)) in ("video", "multiview"):
            values.update(video_presets[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    values["preset"] = preset
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} for {cls.__name__}")
    config = cls(**values)
    config.validate()
    return config


def model_modality(name_or_path: str) -> str | None:
    """``image``, ``video`` or ``multiview`` for a synthetic-world model (read from its folder, no weights
    loaded), else None."""
    from reference_impls.models.loading import model_world
    from reference_impls.worlds.registry import get_world

    world = model_world(name_or_path)
    return None if world is None else get_world(world).modality
