"""An exponential moving average of the weights: the recursion, final/ holding it, and resume keeping it."""

from __future__ import annotations

import pytest
import torch
from helpers import run_smoke, tiny_policy

from reference_impls.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.training.method import step_context


def test_the_average_follows_its_recursion() -> None:
    torch.set_num_threads(1)
    config = FlowGRPOConfig(reward="jpeg-compressibility", batch_size=4, group_size=2, num_steps=4, minibatch_size=4,
                            prompts="easy", learning_rate=1e-2, ema_decay=0.5)
    method = FlowGRPO(policy=tiny_policy("flow"), reward=get_reward(config.reward), config=config)
    snapshots = [[p.detach().clone() for p in method.policy.trainable_parameters()]]
    for step in range(2):
        method.train_step(step_context(0, step))
        snapshots.append([p.detach().clone() for p in method.policy.trainable_parameters()])
    w0, w1, w2 = snapshots
    expected = [0.5 * (0.5 * a + 0.5 * b) + 0.5 * c for a, b, c in zip(w0, w1, w2)]
    assert any(not torch.equal(a, c) for a, c in zip(w0, w2))
    for average, value in zip(method.ema, expected):
        torch.testing.assert_close(average, value)
    with pytest.raises(ValueError, match="--ema-decay"):
        FlowGRPOConfig(ema_decay=1.0).validate()


def test_final_holds_the_average_and_a_resumed_run_keeps_it(tmp_path) -> None:
    # Four denoising steps and two evaluation prompts: the test is about weights, not images.
    settings = dict(steps=2, checkpoint_every=1, ema_decay=0.9, learning_rate=1e-3, eval_every=0, num_steps=4,
                    eval_prompts=2)
    run_smoke("flow-grpo", "jpeg-compressibility", tmp_path / "whole", **settings)
    run_smoke("flow-grpo", "jpeg-compressibility", tmp_path / "cut", **{**settings, "steps": 1})
    run_smoke("flow-grpo", "jpeg-compressibility", tmp_path / "cut", resume=True, **settings)
    whole = load_policy(str(tmp_path / "whole" / "final")).denoiser.state_dict()
    resumed = load_policy(str(tmp_path / "cut" / "final")).denoiser.state_dict()
    base = load_policy("shapes-flow").denoiser.state_dict()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], atol=1e-6, rtol=1e-5)
    run_smoke("flow-grpo", "jpeg-compressibility", tmp_path / "raw", **{**settings, "ema_decay": 0.0})
    raw = load_policy(str(tmp_path / "raw" / "final")).denoiser.state_dict()
    # The average lags the raw weights: it has moved from the base, but less far.
    ema_distance = sum(float((whole[k] - base[k]).norm()) for k in whole)
    raw_distance = sum(float((raw[k] - base[k]).norm()) for k in raw)
    assert 0 < ema_distance < 0.5 * raw_distance
