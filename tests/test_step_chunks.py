"""Several denoising steps per denoiser call in the policy-gradient updates: the same gradient, fewer calls."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_policy

from reference_impls.algorithms.ddpo import DDPO, DDPOConfig
from reference_impls.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from reference_impls.rewards import get_reward
from reference_impls.training.method import step_context
from reference_impls.training.online import step_chunks


def test_chunks_cover_every_sample_step_pair_once_in_step_major_order() -> None:
    rows = torch.tensor([5, 2])
    chunks = list(step_chunks(rows, num_steps=5, steps_per_call=2))
    assert [n for _, _, n in chunks] == [2, 2, 1]
    row, column, _ = chunks[0]
    assert row.tolist() == [5, 2, 5, 2] and column.tolist() == [0, 0, 1, 1]
    pairs = {(int(r), int(c)) for row, column, _ in chunks for r, c in zip(row, column)}
    assert pairs == {(r, c) for r in (5, 2) for c in range(5)}
    assert [n for _, _, n in step_chunks(rows, 5, 0)] == [5]


def _first_gradient(method_cls, config_cls, kind: str, steps_per_call: int, **settings) -> list[torch.Tensor]:
    torch.set_num_threads(1)
    config = config_cls(reward="jpeg-compressibility", batch_size=8, num_steps=5, minibatch_size=4, prompts="easy",
                        steps_per_call=steps_per_call, **settings)
    method = method_cls(policy=tiny_policy(kind), reward=get_reward(config.reward), config=config)
    captured: list[torch.Tensor] = []

    def capture() -> float:
        if not captured:
            captured.extend(p.grad.detach().clone() for p in method.policy.trainable_parameters())
        method.optimizer.zero_grad(set_to_none=True)
        return 0.0

    method.apply_gradients = capture  # type: ignore[method-assign]
    method.train_step(step_context(0, 0))
    return captured


@pytest.mark.parametrize("per_call", [0, 2])
def test_ddpo_and_grpo_gradients_do_not_depend_on_steps_per_call(per_call: int) -> None:
    for method_cls, config_cls, kind, settings in ((DDPO, DDPOConfig, "diffusion", {"min_step_std": 0.0}),
                                                   (FlowGRPO, FlowGRPOConfig, "flow", {"group_size": 4})):
        one = _first_gradient(method_cls, config_cls, kind, 1, **settings)
        batched = _first_gradient(method_cls, config_cls, kind, per_call, **settings)
        scale = max(float(g.abs().max()) for g in one)
        assert scale > 0
        for a, b in zip(one, batched):
            torch.testing.assert_close(b, a, atol=1e-4 * scale, rtol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradient() -> None:
    plain = _first_gradient(DDPO, DDPOConfig, "diffusion", 1, min_step_std=0.0)
    checkpointed = _first_gradient(DDPO, DDPOConfig, "diffusion", 1, min_step_std=0.0, gradient_checkpointing=True)
    scale = max(float(g.abs().max()) for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, atol=1e-5 * scale, rtol=1e-4)
    config = DDPOConfig(reward="jpeg-compressibility", gradient_checkpointing=True)
    method = DDPO(policy=tiny_policy("diffusion"), reward=get_reward(config.reward), config=config)
    assert method.policy.denoiser.is_gradient_checkpointing


def test_gradient_checkpointing_is_refused_by_a_denoiser_without_it() -> None:
    from helpers import tiny_video_pair

    config = DDPOConfig(reward="jpeg-compressibility", gradient_checkpointing=True)
    _, video_policy = tiny_video_pair()
    with pytest.raises(ValueError, match="does not support it"):
        DDPO(policy=video_policy, reward=get_reward(config.reward), config=config)
