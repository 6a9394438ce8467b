"""Video preference methods: Flow-DPO and VideoDPO losses by hand, and one update on a tiny video model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_video_checkpoints

from reference_impls.algorithms import get_method
from reference_impls.algorithms.diffusion_dpo import diffusion_dpo_loss
from reference_impls.algorithms.flow_dpo import flow_noise_levels
from reference_impls.algorithms.video_dpo import pair_weights, weighted_dpo_loss
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.training import build_config
from reference_impls.training.method import step_context


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_video_checkpoints(tmp_path_factory.mktemp("video-methods"))


def test_pair_weights_follow_the_rarity_of_both_scores() -> None:
    # scores 1, 1, 0.6 (winners) and 0, 0, 0 (losers) in 3 bins of width 1/3: frequencies 1/2 (bin 0),
    # 1/6 (bin 1), 1/3 (bin 2); raw weights p_max / (p_w p_l) = 0.5 / (p_w * 0.5) = 3, 3, 6; mean 4.
    weights = pair_weights(torch.tensor([1.0, 1.0, 0.6]), torch.tensor([0.0, 0.0, 0.0]), alpha=1.0, bins=3)
    torch.testing.assert_close(weights, torch.tensor([0.75, 0.75, 1.5]))
    flat = pair_weights(torch.tensor([1.0, 1.0, 0.6]), torch.tensor([0.0, 0.0, 0.0]), alpha=0.0, bins=3)
    torch.testing.assert_close(flat, torch.ones(3))


def test_weighted_loss_is_diffusion_dpo_at_unit_weights_and_scales_each_pair() -> None:
    err_w, err_l = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
    ref_w, ref_l = torch.tensor([0.15, 0.25]), torch.tensor([0.15, 0.15])
    plain, _ = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=20.0)
    unit, _ = weighted_dpo_loss(err_w, err_l, ref_w, ref_l, 20.0, torch.ones(2))
    torch.testing.assert_close(unit, plain)
    # inside = -10 * (delta_w - delta_l): pair 0: -10 * (-0.05 - 0.05) = 1; pair 1: -10 * (0.05 + 0.05) = -1
    weighted, _ = weighted_dpo_loss(err_w, err_l, ref_w, ref_l, 20.0, torch.tensor([2.0, 0.0]))
    expected = -(2.0 * math.log(1 / (1 + math.exp(-1.0))) + 0.0) / 2
    assert float(weighted) == pytest.approx(expected, rel=1e-6)


def test_logit_normal_noise_levels_stay_inside_and_centre_on_one_half() -> None:
    levels = flow_noise_levels(20_000, "logit-normal", torch.Generator().manual_seed(0))
    assert float(levels.min()) > 0 and float(levels.max()) < 1
    assert float(levels.median()) == pytest.approx(0.5, abs=0.02)
    assert float(levels.std()) < float(flow_noise_levels(20_000, "uniform", torch.Generator().manual_seed(0)).std())


def _method(name: str, model: Path, tmp_path: Path, **settings):  # noqa: ANN202
    cls = get_method(name)
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(model), "reward": "jpeg-compressibility", "num_pairs": 6, "bank_steps": 2,
        "num_steps": 2, "batch_size": 4, "monitor_samples": 2, "labeller_temperature": 1e-3,
        "cache_dir": str(tmp_path / "banks"), **settings}, cls.video_presets)
    return cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config)


@pytest.mark.parametrize(("name", "which"), [("flow-dpo", "video"), ("video-dpo", "video-diffusion")])
def test_first_update_starts_at_log_2_and_moves_the_weights(checkpoints, tmp_path, name, which) -> None:
    method = _method(name, checkpoints[which], tmp_path)
    before = [p.detach().clone() for p in method.policy.trainable_parameters()]
    metrics = method.train_step(step_context(0, 0))
    # model == reference: every inside term is 0, each pair contributes w log 2 (w = 1 for Flow-DPO)
    weight = metrics.get("pair_weight_mean", 1.0)
    assert metrics["loss"] == pytest.approx(weight * math.log(2), abs=1e-6)
    assert metrics["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, method.policy.trainable_parameters()))


def test_flow_dpo_refuses_a_diffusion_model(checkpoints, tmp_path) -> None:
    with pytest.raises(ValueError, match="flow-dpo needs a flow model"):
        _method("flow-dpo", checkpoints["video-diffusion"], tmp_path)
