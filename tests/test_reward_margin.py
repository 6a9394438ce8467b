"""The margin benchmark's slopes are the within-group covariances of advantage and metric."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.reward_margin import advantages, ratio_with_interval, slopes_with_interval


def test_slope_is_the_mean_within_group_covariance_of_advantage_and_metric():
    # Two groups of 4. Group 1: rewards 1,1,0,0 (mean 1/2); group 2: 1,0,0,0 (mean 1/4). Batch std over all 8.
    rewards = np.array([1, 1, 0, 0, 1, 0, 0, 0], dtype=float)
    adv = advantages(rewards, group_size=4, batch_images=8)
    centred = np.array([0.5, 0.5, -0.5, -0.5, 0.75, -0.25, -0.25, -0.25])
    assert adv == pytest.approx(centred / (rewards.std() + 1e-4), rel=1e-5)
    metric = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=float)
    draws = np.zeros((10, 2), dtype=int) + np.array([0, 1])  # every "resample" is the sample itself
    slope = slopes_with_interval(adv, metric, 4, draws)
    # covariance per group: group 1 mean(A*m) = 0.5/4, group 2 (0.75 - 0.25)/4, each over the batch std
    expected = np.mean([0.5 / 4, 0.5 / 4]) / (rewards.std() + 1e-4)
    assert slope["mean"] == pytest.approx(expected, rel=1e-5)
    assert slope["low"] == pytest.approx(slope["mean"]) and slope["high"] == pytest.approx(slope["mean"])


def test_a_reward_equal_to_the_metric_has_relative_slope_one_and_a_constant_reward_zero():
    rng = np.random.default_rng(0)
    accuracy = (rng.random(64) < 0.4).astype(float)
    draws = rng.integers(0, 8, size=(200, 8))
    adv = advantages(accuracy, 8, 32)
    same = ratio_with_interval(adv * accuracy, adv * accuracy, 8, draws)
    assert same["mean"] == pytest.approx(1.0) and same["low"] == pytest.approx(1.0)
    flat = advantages(np.ones(64), 8, 32)
    assert slopes_with_interval(flat, accuracy, 8, draws)["mean"] == 0.0
