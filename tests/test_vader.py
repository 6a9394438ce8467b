"""VADER: the frame subset, the refusal of image models, and one update on a tiny video model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_tiny_video_checkpoints

from reference_impls.algorithms import get_method
from reference_impls.algorithms.vader import frame_subset_mask
from reference_impls.models import load_policy
from reference_impls.rewards import RewardFunction, get_reward
from reference_impls.training import build_config
from reference_impls.training.method import step_context


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_video_checkpoints(tmp_path_factory.mktemp("vader"))


def test_frame_subset_keeps_exactly_k_frames_per_clip() -> None:
    mask = frame_subset_mask(5, 8, 3, torch.Generator().manual_seed(0))
    assert mask.shape == (5, 1, 8, 1, 1)
    assert mask.sum(dim=(1, 2, 3, 4)).tolist() == [3] * 5
    assert len({tuple(row.flatten().tolist()) for row in mask}) > 1  # drawn per clip
    assert frame_subset_mask(2, 8, 0, torch.Generator()).all() and frame_subset_mask(2, 8, 8, torch.Generator()).all()


def test_reward_gradient_reaches_only_the_chosen_frames() -> None:
    clips = torch.rand(2, 3, 4, 8, 8, requires_grad=True)
    keep = frame_subset_mask(2, 4, 1, torch.Generator().manual_seed(1))
    torch.where(keep, clips, clips.detach()).sum().backward()
    assert torch.equal(clips.grad != 0, keep.expand_as(clips))


def _brightness() -> RewardFunction:
    """A differentiable clip reward (mean brightness) that needs no trained network."""
    return RewardFunction("brightness", lambda clips, prompts: clips.mean(dim=(1, 2, 3, 4)), True,
                          "mean brightness", modality="video")


def test_one_vader_update_ascends_a_differentiable_reward(checkpoints) -> None:
    cls = get_method("vader")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(checkpoints["video"]), "batch_size": 2, "num_steps": 3, "k": 1,
        "grad_frames": 2})
    method = cls(policy=load_policy(config.model), reward=_brightness(), config=config)
    before = [p.detach().clone() for p in method.policy.trainable_parameters()]
    metrics = method.train_step(step_context(0, 0))
    assert metrics["loss"] == pytest.approx(-metrics["reward_mean"], rel=1e-6)
    assert metrics["grad_frames"] == 2 and metrics["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, method.policy.trainable_parameters()))


def test_vader_refuses_an_image_model_and_a_reward_without_gradient(checkpoints) -> None:
    cls = get_method("vader")
    config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": str(checkpoints["image"])})
    with pytest.raises(ValueError, match="vader trains video models"):
        cls(policy=load_policy(config.model), reward=_brightness(), config=config)
    with pytest.raises(ValueError, match="differentiable rewards: .*motion-learned"):
        cls(policy=load_policy(str(checkpoints["video"])), reward=get_reward("motion-composition"), config=config)


def test_motion_reward_training_writes_a_loadable_checkpoint(tmp_path) -> None:
    from reference_impls.rewards.learned_motion import (
        MotionRewardNetConfig,
        MotionRewardTrainConfig,
        load_motion_reward_net,
        train_motion_reward,
    )

    config = MotionRewardTrainConfig(clips=16, heldout_clips=8, steps=3, batch_size=4)
    network = MotionRewardNetConfig(widths=(4, 4, 4, 4), prompt_hidden=8, head_hidden=8)
    provenance = train_motion_reward(tmp_path / "reward", config, network, command="test", progress=False)
    assert provenance["quality"]["heldout"]["n"] == 8 and len(provenance["quality"]) == 2
    assert not (tmp_path / "reward.partial").exists()
    assert load_motion_reward_net(str(tmp_path / "reward")).config.widths == (4, 4, 4, 4)
