"""Shared test utilities: tiny random policies and a quick way to run a method for a few steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reference_impls.algorithms import get_method
from reference_impls.models import load_policy
from reference_impls.models.components import TinyModelConfig
from reference_impls.models.shapes_model import build_shapes_policy
from reference_impls.rewards import get_reward
from reference_impls.training import build_config, train

TINY = TinyModelConfig(block_out_channels=(16, 32, 32), text_hidden_size=32)


def tiny_policy(kind: str = "diffusion", seed: int = 0):  # noqa: ANN201
    """A randomly initialised, very small ShapeWorld policy for fast unit tests of losses."""
    policy = build_shapes_policy(kind, TINY, seed=seed)
    policy.text_encoder.requires_grad_(False)
    return policy


def run_smoke(method: str, reward: str, out: Path, model: str | None = None, resume: bool = False,
              **overrides: Any) -> list[dict]:
    """Run the method's smoke preset on a shipped model; returns metrics records."""
    cls = get_method(method)
    settings = {"preset": "smoke", "reward": reward, **overrides}
    if model is not None:
        settings["model"] = model
    config = build_config(cls.config_class, cls.presets, settings, cls.video_presets)
    torch.manual_seed(config.seed)
    policy = load_policy(config.model)
    return train(cls(policy=policy, reward=get_reward(config.reward), config=config), out, resume=resume,
                 progress=False)


def training_rewards(records: list[dict]) -> list[float]:
    return [r["reward_mean"] for r in records if "reward_mean" in r]


def strip_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


VIDEO_FRAMES = 4


def tiny_video_pair(seed: int = 0):  # noqa: ANN201
    """A tiny random ShapeWorld flow model and the video model inflated from it (4 frames)."""
    from reference_impls.models.shapes_model import inflate_to_motion_policy

    image = build_shapes_policy("flow", TINY, seed=seed)
    return image, inflate_to_motion_policy(image, VIDEO_FRAMES, TINY, seed=seed)


def write_tiny_video_checkpoints(root: Path) -> dict[str, Path]:
    """Folders ``image``, ``video`` (flow) and ``video-diffusion`` (derived) under ``root``."""
    from reference_impls.models.pretrain import write_checkpoint_atomically
    from reference_impls.models.shapes_model import derive_vp_diffusion_from_flow

    image, video = tiny_video_pair()
    write_checkpoint_atomically(image, root / "image", TINY, {"note": "tiny random"})
    write_checkpoint_atomically(video, root / "video", TINY, {"note": "tiny random"})
    derive_vp_diffusion_from_flow(root / "video", root / "video-diffusion")
    return {"image": root / "image", "video": root / "video", "video-diffusion": root / "video-diffusion"}


def paired_reward_gain(run_dir: Path, base_model: str, reward: str, prompt: str, n: int = 32,
                       num_steps: int = 6, seed: int = 1234, sampler: str = "ddim") -> float:
    """Mean reward of the trained model minus the base's, on the same prompt and the same initial noise.

    Pairing removes the batch-to-batch noise of the logged ``reward_mean`` (SD about 0.02 on 16 images of one
    smoke prompt), so a smoke run's small, consistent change shows with a few dozen images. ``sampler``: ddim
    (eta 1) for diffusion models, sde or ode for flow models.
    """
    from reference_impls.comparison import score_model
    from reference_impls.sampling import SamplerConfig

    config = SamplerConfig(sampler, num_steps=num_steps, eta=1.0)  # type: ignore[arg-type]
    base, trained = (score_model(load_policy(model), [prompt], config, seed, samples_per_prompt=n,
                                 reward_name=reward) for model in (base_model, str(run_dir / "final")))
    return float(trained.reward.mean() - base.reward.mean())
