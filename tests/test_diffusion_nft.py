"""DiffusionNFT: its loss against hand computations, the first update against advantage-weighted flow
matching, the old policy's soft update and its survival across a resume."""

from __future__ import annotations

import pytest
import torch
from helpers import run_smoke, tiny_policy

from reference_impls.algorithms.diffusion_nft import (
    DiffusionNFT,
    DiffusionNFTConfig,
    nft_loss,
    optimality_probability,
)
from reference_impls.rewards import get_reward
from reference_impls.training.method import step_context


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _method(**settings) -> DiffusionNFT:  # noqa: ANN003
    config = DiffusionNFTConfig(**{"reward": "jpeg-compressibility", "batch_size": 4, "group_size": 2,
                                   "num_steps": 3, "minibatch_size": 4, "prompts": "easy", **settings})
    config.validate()
    return DiffusionNFT(policy=tiny_policy("flow"), reward=get_reward(config.reward), config=config)


def test_optimality_probability_maps_clipped_advantages_to_the_unit_interval():
    config = DiffusionNFTConfig(group_size=2, batch_size=4, std_scope="none", adv_clip_max=2.0)
    rewards = torch.tensor([0.0, 1.0, 0.0, 10.0])
    # centred: (-0.5, 0.5, -5, 5); clipped to [-2, 2]; r = 1/2 + A / 4
    assert optimality_probability(rewards, config).tolist() == pytest.approx([0.375, 0.625, 0.0, 1.0])


def test_loss_equals_its_hand_computed_value_without_adaptive_weights():
    x0 = torch.zeros(1, 1, 1, 2)
    x_t = torch.tensor([[[[1.0, 2.0]]]])
    v_theta, v_old = torch.tensor([[[[2.0, 2.0]]]]), torch.tensor([[[[1.0, 3.0]]]])
    t, r, beta = torch.tensor([0.5]), torch.tensor([0.75]), 0.5
    # v+ = 0.5 v_old + 0.5 v = (1.5, 2.5); x0+ = x_t - 0.5 v+ = (0.25, 0.75): mean square 0.3125
    # v- = 1.5 v_old - 0.5 v = (0.5, 3.5);  x0- = (0.75, 0.25): mean square 0.3125
    # loss = A_max / beta * (0.75 * 0.3125 + 0.25 * 0.3125) = 5 / 0.5 * 0.3125
    loss = nft_loss(v_theta, v_old, x_t, x0, t, r, beta, adv_clip_max=5.0, adaptive=False)
    assert loss.item() == pytest.approx(3.125)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_first_update_is_advantage_weighted_flow_matching_whatever_beta(beta: float):
    # With v_theta = v_old the gradient is A * grad(|x_t - t v - x0|^2 / w) with A = (2r - 1) A_max.
    torch.manual_seed(0)
    x0, x_t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t, r = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.5, 0.1])
    v_old = torch.randn(3, 2, 4, 4)
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, r, beta, adv_clip_max=5.0).sum().backward()

    reference = v_old.clone().requires_grad_(True)
    error = x_t - t.view(-1, 1, 1, 1) * reference - x0
    scale = error.detach().abs().mean(dim=(1, 2, 3))
    advantage = (2 * r - 1) * 5.0
    (advantage * (error**2).mean(dim=(1, 2, 3)) / scale).sum().backward()
    assert torch.allclose(v.grad, reference.grad, atol=1e-5)
    assert v.grad[1].abs().max().item() == pytest.approx(0.0, abs=1e-6)  # r = 1/2: no pull either way


def test_train_step_moves_the_policy_and_the_old_policy_follows_softly():
    method = _method(old_decay_rate=0.25, old_decay_max=0.5)
    start = {n: p.detach().clone() for n, p in method.policy.denoiser.named_parameters()}
    metrics = method.train_step(step_context(0, 0))
    # One optimiser step, so d = min(0.25 * 1, 0.5) = 0.25: old = 0.25 start + 0.75 new.
    assert metrics["old_decay"] == pytest.approx(0.25)
    old = dict(method.old.denoiser.named_parameters())
    moved = 0
    for name, parameter in method.policy.denoiser.named_parameters():
        if not parameter.requires_grad:
            continue
        expected = 0.25 * start[name] + 0.75 * parameter.detach()
        assert torch.allclose(old[name], expected, atol=1e-6), name
        moved += int(not torch.equal(parameter.detach(), start[name]))
    assert moved > 0
    assert metrics["kl_to_reference"] == pytest.approx(0.0, abs=1e-12)  # the reference is the start: no drift yet


def test_rollouts_come_from_the_old_policy(monkeypatch):
    method = _method()
    used = []
    import reference_impls.algorithms.diffusion_nft as module

    original = module.collect

    def spy(m, ctx, prompts, sampler=None, noise=None):  # noqa: ANN001, ANN202
        used.append(m.policy.denoiser is method.old.denoiser)
        assert sampler.name == "ode"
        return original(m, ctx, prompts, sampler, noise)

    monkeypatch.setattr(module, "collect", spy)
    method.train_step(step_context(0, 0))
    assert used == [True] and method.policy.denoiser is not method.old.denoiser


def test_smoke_run_resumes_with_the_old_policy_restored(tmp_path):
    small = dict(model="shapes-flow", checkpoint_every=1, eval_prompts=4, batch_size=8, minibatch_size=4)
    full = run_smoke("diffusion-nft", "prompt-colour", tmp_path / "full", steps=2, **small)
    run_smoke("diffusion-nft", "prompt-colour", tmp_path / "resumed", steps=1, **small)
    resumed = run_smoke("diffusion-nft", "prompt-colour", tmp_path / "resumed", steps=2, resume=True, **small)
    losses = [r["loss"] for r in full if "loss" in r]
    assert [r["loss"] for r in resumed if "loss" in r] == pytest.approx(losses, rel=1e-6)


def test_smoke_run_raises_the_reward(tmp_path):
    records = run_smoke("diffusion-nft", "jpeg-incompressibility", tmp_path / "run", model="shapes-flow")
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    assert len(rewards) >= 4
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2, rewards
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


def test_results_row_uses_the_reward_its_config_names():
    from benchmarks.method_table import default_reward
    from reference_impls.algorithms import get_method

    assert default_reward(get_method("diffusion-nft")) == "shapes-accuracy"
    assert default_reward(get_method("flow-grpo")) == "shapes-composition"
