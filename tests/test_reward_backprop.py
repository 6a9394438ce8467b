"""ReFL, DRaFT-K, DRaFT-LV, AlignProp and the learned reward: gradients against hand computations on a
toy linear denoiser, the learned reward's contract, and a smoke run per method on the shipped model."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler
from helpers import run_smoke, strip_timing, tiny_policy, training_rewards
from torch import nn

from reference_impls.algorithms.alignprop import draw_truncation
from reference_impls.algorithms.draft_lv import low_variance_images, lv_loss, renoise_last_step
from reference_impls.algorithms.refl import denoising_loss, refl_loss
from reference_impls.models.policy import Conditioning, GenerativePolicy
from reference_impls.sampling import SamplerConfig, make_schedule, rollout
from reference_impls.training.differentiable import sample_with_grad

T = 4  # sampling steps of the toy chain
STRIDE = 1000 // T


class PerStepScale(nn.Module):
    """eps_theta(x, step i) = w_i * x: one scalar per sampling step, so credit per step is visible."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 0.5, 0.1]))


def linear_policy() -> GenerativePolicy:
    """A diffusion policy on a (3, 1, 1) latent whose denoiser is PerStepScale; decode is the identity."""

    def call(module: PerStepScale, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        step = T - torch.round((t.float() + 1) / STRIDE).long()  # trailing spacing: t_i = (T - i) * stride - 1
        return module.w[step].view(-1, 1, 1, 1) * x

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                              clip_sample=False)
    return GenerativePolicy(name="toy-linear", denoiser=PerStepScale(), prediction="epsilon", scheduler=scheduler,
                            encode_text=lambda p: Conditioning(torch.zeros(len(p), 1, 1)),
                            call_denoiser=call, latent_shape=(3, 1, 1), decode=lambda x: x)


DDIM0 = SamplerConfig("ddim", num_steps=T, eta=0.0)


def step_factor(policy: GenerativePolicy, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For DDIM eta=0 and eps = w x: x_{i+1} = c_i(w_i) x_i; returns (c_i(w_i), dc_i/dw_i)."""
    schedule = make_schedule(policy, DDIM0)
    a, a_prev = schedule.alpha_bar[i].double(), schedule.alpha_bar_prev[i].double()
    w = policy.denoiser.w[i].detach().double()
    slope = -(a_prev / a).sqrt() * (1 - a).sqrt() + (1 - a_prev).sqrt()
    return (a_prev / a).sqrt() + slope * w, slope


def reward_sum(images: torch.Tensor) -> torch.Tensor:
    return images.sum(dim=(1, 2, 3))


# -- the differentiable chain -------------------------------------------------------------------------
def test_sample_with_grad_reproduces_rollout_values():
    policy = tiny_policy()
    sampler = SamplerConfig("ddim", num_steps=3, eta=1.0)
    expected = rollout(policy, ["a red circle", "two blue squares"], sampler, torch.Generator().manual_seed(3))
    sample = sample_with_grad(policy, ["a red circle", "two blue squares"], sampler,
                              torch.Generator().manual_seed(3), grad_from_step=2, checkpointing=True)
    assert torch.allclose(sample.final, expected.states[:, -1], atol=1e-5)
    assert sample.final.requires_grad and sample.grad_steps.tolist() == [1, 1]


def test_full_chain_gradient_matches_the_product_rule():
    # x_T = prod_i c_i(w_i) x_0, so d sum(x_T) / d w_j = sum(x_T) * c_j' / c_j for every step j.
    policy = linear_policy()
    sample = sample_with_grad(policy, ["x"] * 2, DDIM0, torch.Generator().manual_seed(0), grad_from_step=0)
    (-reward_sum(sample.final).mean()).backward()
    total = reward_sum(sample.final.detach().double()).mean()
    for j in range(T):
        c, slope = step_factor(policy, j)
        assert policy.denoiser.w.grad[j].item() == pytest.approx(float(-total * slope / c), rel=1e-4)


def test_draft_k1_credits_only_the_last_step():
    policy = linear_policy()
    sample = sample_with_grad(policy, ["x"] * 3, DDIM0, torch.Generator().manual_seed(1), grad_from_step=T - 1)
    (-reward_sum(sample.final).mean()).backward()
    grad = policy.denoiser.w.grad
    assert grad[: T - 1].abs().max().item() == 0.0  # parameters used only at earlier steps: no credit
    c, slope = step_factor(policy, T - 1)
    assert grad[T - 1].item() == pytest.approx(float(-reward_sum(sample.final.detach().double()).mean() * slope / c),
                                               rel=1e-4)


def test_alignprop_truncation_respects_each_trajectorys_draw():
    policy = linear_policy()
    grad_from = torch.tensor([3, 1, 2, 0])  # K = 1, 3, 2, 4 final steps with gradient
    sample = sample_with_grad(policy, ["x"] * 4, DDIM0, torch.Generator().manual_seed(2), grad_from_step=grad_from,
                              checkpointing=True)
    (-reward_sum(sample.final).mean()).backward()
    per_row = reward_sum(sample.final.detach().double())
    for j in range(T):
        c, slope = step_factor(policy, j)
        credited = per_row[grad_from <= j].sum() / len(grad_from)  # only rows whose truncation reached step j
        assert policy.denoiser.w.grad[j].item() == pytest.approx(float(-credited * slope / c), rel=1e-4, abs=1e-9)


def test_checkpointing_changes_memory_not_gradients():
    grads = []
    for checkpointing in (False, True):
        policy = tiny_policy()
        sample = sample_with_grad(policy, ["a red circle"] * 2, SamplerConfig("ddim", num_steps=3, eta=1.0),
                                  torch.Generator().manual_seed(0), grad_from_step=0, checkpointing=checkpointing)
        sample.final.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.trainable_parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_draw_truncation_is_uniform_over_the_range_and_seeded():
    import numpy as np

    first = draw_truncation(4000, (2, 5), 10, np.random.default_rng(0))
    again = draw_truncation(4000, (2, 5), 10, np.random.default_rng(0))
    assert torch.equal(first, again)
    assert set((10 - first).tolist()) == {2, 3, 4, 5}
    assert abs((10 - first).float().mean().item() - 3.5) < 0.1


# -- ReFL ---------------------------------------------------------------------------------------------
def test_refl_gradient_is_the_reward_gradient_at_x0_hat_through_one_step():
    # x0_hat(x_i) = (x_i - sqrt(1 - a_i) w_i x_i) / sqrt(a_i): d sum(x0_hat) / d w_i = -sqrt((1 - a_i) / a_i) sum(x_i).
    policy = linear_policy()
    i = 2
    sample = sample_with_grad(policy, ["x"] * 2, DDIM0, torch.Generator().manual_seed(4), grad_from_step=i,
                              stop_after=i)
    rewards = reward_sum(sample.predicted_x0)
    loss = refl_loss(rewards, margin=1e6, scale=0.5)  # margin above every reward: the ReLU is active
    loss.backward()
    x_i = rollout(policy, ["x"] * 2, DDIM0, torch.Generator().manual_seed(4)).states[:, i].double()
    a = make_schedule(policy, DDIM0).alpha_bar[i].double()
    expected = 0.5 * ((1 - a) / a).sqrt() * reward_sum(x_i).mean()  # -0.5 * d mean(r) / d w_i
    grad = policy.denoiser.w.grad
    assert grad[i].item() == pytest.approx(float(expected), rel=1e-4)
    assert grad[torch.arange(T) != i].abs().max().item() == 0.0


def test_refl_loss_is_relu_of_margin_minus_reward():
    rewards = torch.tensor([0.2, 0.9, 1.5], requires_grad=True)
    loss = refl_loss(rewards, margin=1.0, scale=2.0)
    assert loss.item() == pytest.approx(2.0 * (0.8 + 0.1 + 0.0) / 3)
    loss.backward()
    assert rewards.grad.tolist() == pytest.approx([-2 / 3, -2 / 3, 0.0])


def test_refl_pretraining_loss_is_the_denoising_mse_and_trains_the_denoiser():
    policy = tiny_policy()
    loss = denoising_loss(policy, ["a red circle", "a blue square"], seed=0, generator=torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and 0.1 < loss.item() < 10
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.trainable_parameters())


# -- DRaFT-LV -----------------------------------------------------------------------------------------
def test_draft_lv_renoises_to_the_last_steps_level_and_credits_only_the_last_step():
    policy = linear_policy()
    n, batch = 3, 2
    sample = sample_with_grad(policy, ["x"] * batch, DDIM0, torch.Generator().manual_seed(5), grad_from_step=T)
    assert not sample.final.requires_grad  # grad_from = T: the chain itself carries no graph
    a = sample.schedule.alpha_bar[T - 1]
    x0 = torch.ones(1, 3, 1, 1)
    assert torch.allclose(renoise_last_step(policy, sample, x0, torch.zeros_like(x0)), a.sqrt() * x0)
    images = low_variance_images(policy, sample, n, torch.Generator().manual_seed(6))
    assert images.shape == (n * batch, 3, 1, 1)
    loss = lv_loss(reward_sum(images), n)
    loss.backward()
    # out = c(w) x1 for each copy, so d mean(sum(out)) / d w_{T-1} = mean(sum(out)) * c' / c.
    c, slope = step_factor(policy, T - 1)
    expected = -reward_sum(images.detach().double()).mean() * slope / c
    grad = policy.denoiser.w.grad
    assert grad[T - 1].item() == pytest.approx(float(expected), rel=1e-4)
    assert grad[: T - 1].abs().max().item() == 0.0


def test_lv_loss_averages_the_copies():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])  # n = 2 copies of B = 2 images
    assert lv_loss(rewards, 2).item() == pytest.approx(-3.0)


# -- the learned reward -------------------------------------------------------------------------------
def test_prompt_features_are_one_hot_per_phrase_and_relation():
    from reference_impls.rewards.learned import PROMPT_FEATURES, criteria_mask, prompt_features

    features = prompt_features(["a red circle left of a blue square", "two small green triangles"])
    assert features.shape == (2, PROMPT_FEATURES)
    assert features[0].sum().item() == 2 * 4 + 1  # colour, shape, count, size per phrase + relation
    assert features[1].sum().item() == 4 + 1  # one phrase + "no relation"
    assert criteria_mask(["a red circle left of a blue square", "two small green triangles"]).tolist() == [
        [1, 1, 1, 0, 1], [1, 1, 1, 1, 0]]


def test_learned_reward_is_bounded_differentiable_deterministic_and_prefers_renders():
    import numpy as np

    from reference_impls.rewards import get_reward
    from reference_impls.worlds import render_batch

    reward = get_reward("shapes-learned")
    assert reward.differentiable
    prompts = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a big yellow square"]
    renders = torch.from_numpy(render_batch(prompts, seed=0)).permute(0, 3, 1, 2).float() / 255
    images = renders.clone().requires_grad_(True)
    values = reward(images, prompts)
    assert values.shape == (4,) and bool(((values >= 0) & (values <= 1)).all())
    values.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert torch.equal(reward(renders, prompts), values.detach())
    blank = torch.ones_like(renders)
    shuffled = renders[torch.tensor([1, 0, 3, 2])]  # another prompt's render
    assert values.mean() > reward(blank, prompts).mean() + 0.3
    assert values.mean() > reward(shuffled, prompts).mean() + 0.2
    del np


def test_learned_reward_provenance_reports_heldout_quality():
    from reference_impls.rewards.learned import CHECKPOINT_DIR

    provenance = json.loads((CHECKPOINT_DIR / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["command"].startswith("python -m reference_impls.rewards.learned")
    assert provenance["quality"]["heldout"]["pearson_r"] > 0.8


# -- smoke runs on the shipped model ------------------------------------------------------------------
@pytest.mark.parametrize("method, reward", [("refl", "prompt-colour"), ("draft-k", "prompt-colour"),
                                            ("draft-lv", "prompt-colour"), ("alignprop", "prompt-colour")])
def test_smoke_run_raises_the_differentiable_reward(tmp_path, method, reward):
    records = run_smoke(method, reward, tmp_path / "run", steps=4, eval_prompts=8)
    assert len(training_rewards(records)) == records[-1]["step"]
    # The held-out evaluation reuses the same prompts and noise before and after training, so its
    # reward is the noise-free measure of progress (batch rewards vary with the prompts drawn).
    before, after = records[0]["eval_reward_mean"], records[-1]["eval_reward_mean"]
    assert after > before + 0.05, (before, after)
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


def test_reward_backprop_is_deterministic(tmp_path):
    first = run_smoke("draft-k", "shapes-learned", tmp_path / "a", steps=2, eval_prompts=4)
    again = run_smoke("draft-k", "shapes-learned", tmp_path / "b", steps=2, eval_prompts=4)
    assert strip_timing(first) == strip_timing(again)


def test_methods_refuse_a_non_differentiable_reward():
    from reference_impls.algorithms import get_method
    from reference_impls.rewards import get_reward
    from reference_impls.training import build_config

    for name in ("refl", "draft-k", "draft-lv", "alignprop"):
        cls = get_method(name)
        config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "reward": "shapes-composition"})
        with pytest.raises(ValueError, match="differentiable"):
            cls(policy=tiny_policy(), reward=get_reward("shapes-composition"), config=config)


def test_chain_kl_is_zero_for_the_same_model_and_quadratic_in_a_first_step_change():
    """Changing only the first step's weight by d changes only that step's mean (the start is shared noise),
    so the chain KL is c * d^2 exactly: doubling d quadruples it."""
    import copy

    from benchmarks.overoptimisation import chain_kl

    base = linear_policy()
    prompts = ["p"] * 64
    assert chain_kl(base, base, prompts, T) == 0.0
    kls = []
    for d in (0.1, 0.2):
        moved = copy.deepcopy(base)
        with torch.no_grad():
            moved.denoiser.w[0] += d
        kls.append(chain_kl(moved, base, prompts, T))
    assert kls[0] > 0 and kls[1] == pytest.approx(4 * kls[0], rel=1e-4)


def test_shapes_reward_training_writes_its_checkpoint_atomically(tmp_path) -> None:
    from reference_impls.rewards.learned import (
        RewardNetConfig,
        RewardTrainConfig,
        load_reward_net,
        train_composition_reward,
    )

    config = RewardTrainConfig(synthetic=16, model_samples=0, heldout_synthetic=8, heldout_model_samples=0,
                               steps=2, batch_size=4)
    network = RewardNetConfig(widths=(4, 4, 4, 4), prompt_hidden=8, head_hidden=8)
    provenance = train_composition_reward(tmp_path / "reward", config, network, command="test", progress=False)
    assert provenance["quality"]["heldout"]["n"] == 8
    assert not (tmp_path / "reward.partial").exists()
    assert load_reward_net(str(tmp_path / "reward")).config.widths == (4, 4, 4, 4)
