"""Mixed precision: the denoiser runs under autocast, the step's Gaussian stays fp32, the ratio starts at 1."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_policy

from reference_impls.algorithms.ddpo import DDPO, DDPOConfig
from reference_impls.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from reference_impls.rewards import get_reward
from reference_impls.sampling import SamplerConfig, rollout, transition_log_prob
from reference_impls.training.method import step_context

SAMPLERS = {"flow": SamplerConfig("sde", num_steps=4), "diffusion": SamplerConfig("ddim", num_steps=4, eta=1.0)}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red square"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_autocast_runs_the_denoiser_in_low_precision_and_returns_fp32(kind: str, dtype: torch.dtype) -> None:
    policy = tiny_policy(kind)
    x, t = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0)), torch.tensor([300.0, 700.0])
    cond = policy.encode_text(PROMPTS[:2])
    with torch.no_grad():
        full = policy.predict(x, t, cond)
        policy.autocast_dtype = dtype
        low = policy.predict(x, t, cond)
    assert low.dtype == torch.float32
    assert not torch.equal(low, full)  # the flag does something
    torch.testing.assert_close(low, full, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["flow", "diffusion"])
def test_recomputed_log_probs_equal_the_rollouts_under_autocast(kind: str, dtype: torch.dtype) -> None:
    """Minibatches of other sizes than the rollout's recompute the same fp32 log-densities."""
    policy = tiny_policy(kind)
    policy.autocast_dtype = dtype
    trajectory = rollout(policy, PROMPTS, SAMPLERS[kind], torch.Generator().manual_seed(0))
    for rows in ([0, 1], [1, 2, 3]):
        sub = trajectory.subset(torch.tensor(rows))
        for step in range(trajectory.num_steps):
            with torch.no_grad():
                new = transition_log_prob(policy, sub, step).log_prob
            assert new.dtype == torch.float32
            torch.testing.assert_close(new, sub.log_probs[:, step], atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ppo_ratio_is_one_at_the_first_inner_step_in_mixed_precision(precision: str) -> None:
    config = DDPOConfig(reward="jpeg-compressibility", batch_size=8, num_steps=4, minibatch_size=4, prompts="easy",
                        mixed_precision=precision)
    metrics = DDPO(policy=tiny_policy("diffusion"), reward=get_reward(config.reward), config=config
                   ).train_step(step_context(0, 0))
    assert metrics["ratio_first"] == pytest.approx(1.0, abs=1e-5)
    config = FlowGRPOConfig(reward="jpeg-compressibility", batch_size=8, group_size=4, num_steps=4, minibatch_size=4,
                            prompts="easy", mixed_precision=precision)
    metrics = FlowGRPO(policy=tiny_policy("flow"), reward=get_reward(config.reward), config=config
                       ).train_step(step_context(0, 0))
    assert metrics["ratio_first"] == pytest.approx(1.0, abs=1e-5)


def test_an_unknown_precision_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="no, bf16, fp16"):
        DDPOConfig(mixed_precision="fp8").validate()


def test_channels_last_changes_the_memory_order_not_the_method() -> None:
    def ddpo(channels_last: bool) -> DDPO:
        torch.manual_seed(0)  # tiny_policy's random weights: the same for both
        config = DDPOConfig(reward="jpeg-compressibility", batch_size=8, num_steps=4, minibatch_size=4,
                            prompts="easy", channels_last=channels_last)
        return DDPO(policy=tiny_policy("diffusion"), reward=get_reward(config.reward), config=config)

    plain, fast = ddpo(False), ddpo(True)
    convs = [m.weight for m in fast.policy.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in plain.policy.denoiser.modules() if isinstance(m, torch.nn.Conv2d))
    sampler = SamplerConfig("ddim", num_steps=4, eta=1.0)
    trajectories = [rollout(m.policy, ["a red circle"] * 2, sampler, torch.Generator().manual_seed(0))
                    for m in (plain, fast)]
    torch.testing.assert_close(trajectories[1].images, trajectories[0].images, atol=1e-4, rtol=0)  # kernel rounding
    metrics = fast.train_step(step_context(0, 0))
    assert metrics["ratio_first"] == pytest.approx(1.0, abs=1e-6)
