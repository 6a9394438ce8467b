"""The GRPO family (Flow-GRPO, DanceGRPO, MixGRPO, TempFlow-GRPO): estimators against hand computations,
each method's sampling structure on a tiny random policy, and a smoke run per method on a shipped model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import paired_reward_gain, run_smoke, tiny_policy, training_rewards

from reference_impls.algorithms.dance_grpo import DanceGRPO, DanceGRPOConfig
from reference_impls.algorithms.estimators import gaussian_mean_kl, group_advantages, ppo_clip_loss
from reference_impls.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig
from reference_impls.algorithms.grpo_common import (
    grouped_prompts,
    grpo_advantages,
    grpo_step_loss,
    shared_initial_noise,
)
from reference_impls.algorithms.mix_grpo import MixGRPO, MixGRPOConfig, window_sampler, window_start
from reference_impls.algorithms.tempflow_grpo import (
    TempFlowGRPO,
    TempFlowGRPOConfig,
    branched_rollout,
    noise_aware_weights,
)
from reference_impls.rewards import get_reward
from reference_impls.sampling import rollout, transition_log_prob
from reference_impls.training.method import step_context
from reference_impls.training.online import training_steps


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _method(cls, config_cls, kind: str = "flow", **settings):  # noqa: ANN001, ANN202
    config = config_cls(**{"reward": "jpeg-compressibility", "batch_size": 4, "group_size": 2, "num_steps": 4,
                           "minibatch_size": 4, "prompts": "easy", **settings})
    config.validate()
    return cls(policy=tiny_policy(kind), reward=get_reward(config.reward), config=config)


# --------------------------------------------------------------------------------------------------------
# Group-relative advantages
# --------------------------------------------------------------------------------------------------------

def test_group_advantages_match_hand_computation_and_zero_variance_groups_give_zero():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    advantages = group_advantages(rewards, group_size=4, std_scope="group")
    # group 1: mean 2.5, population std sqrt(1.25); group 2: all equal -> exactly zero, not 0/0
    std = math.sqrt(1.25)
    assert advantages[:4].tolist() == pytest.approx([-1.5 / (std + 1e-4), -0.5 / (std + 1e-4),
                                                     0.5 / (std + 1e-4), 1.5 / (std + 1e-4)], abs=1e-6)
    assert advantages[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_per_group_and_batch_std_differ_as_computed_by_hand():
    rewards = torch.tensor([0.0, 2.0, 10.0, 30.0])  # two groups of 2
    per_group = group_advantages(rewards, group_size=2, std_scope="group")
    batch = group_advantages(rewards, group_size=2, std_scope="batch")
    none = group_advantages(rewards, group_size=2, std_scope="none")
    # per group: each group becomes (-1, +1) whatever its spread (stds 1 and 10)
    assert per_group.tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001, -10 / 10.0001, 10 / 10.0001], abs=1e-6)
    # batch: one divisor for all, the population std of (0, 2, 10, 30) = sqrt(139)
    scale = math.sqrt(((0 - 10.5) ** 2 + (2 - 10.5) ** 2 + (10 - 10.5) ** 2 + (30 - 10.5) ** 2) / 4) + 1e-4
    assert batch.tolist() == pytest.approx([-1 / scale, 1 / scale, -10 / scale, 10 / scale], abs=1e-6)
    assert none.tolist() == [-1.0, 1.0, -10.0, 10.0]


def test_grpo_advantages_are_clipped():
    config = FlowGRPOConfig(group_size=4, batch_size=8, adv_clip_max=1.0)
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 3.0, 4.0])
    advantages = grpo_advantages(rewards, config)
    # group 1: (-0.25, -0.25, -0.25, 0.75) / sqrt(3)/4 = (-0.577, .., 1.732) -> the last is clipped to 1
    assert advantages[3].item() == pytest.approx(1.0)
    assert advantages[0].item() == pytest.approx(-0.25 / (math.sqrt(3) / 4 + 1e-4), abs=1e-5)
    assert advantages.abs().max().item() <= 1.0


def test_grouped_prompts_repeat_each_prompt_group_size_times():
    method = _method(FlowGRPO, FlowGRPOConfig, kl_coef=0.0)
    prompts = grouped_prompts(method, 6, 3, np.random.default_rng(0))
    assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5]


# --------------------------------------------------------------------------------------------------------
# Clipping, weights and the KL on step means
# --------------------------------------------------------------------------------------------------------

def test_clipped_surrogate_with_positive_weights_equals_weighted_loss():
    # TempFlow's noise-aware weights scale the advantage; for w > 0 that is the weighted clipped loss.
    log_prob = torch.tensor([0.2, -0.3, 0.01])
    old = torch.zeros(3)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    weights = torch.tensor([0.5, 2.0, 1.5])
    weighted, _ = ppo_clip_loss(log_prob, old, advantages * weights, clip_range=0.1)
    # by hand: sample 1 clipped at 1.1 -> -0.5 * 1.1; sample 2 clipped at 0.9 -> 2 * 2 * 0.9;
    # sample 3 inside the range -> -1.5 * 0.5 * e^{0.01}
    expected = (-0.5 * 1.1 + 4.0 * 0.9 - 0.75 * math.exp(0.01)) / 3
    assert weighted.item() == pytest.approx(expected, abs=1e-6)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    log_prob = torch.tensor([0.5, 0.5], requires_grad=True)  # ratio 1.65
    loss, stats = ppo_clip_loss(log_prob, torch.zeros(2), torch.tensor([1.0, -1.0]), clip_range=1e-4)
    loss.backward()
    # A > 0 and ratio above 1 + eps: clipped, no gradient. A < 0: the unclipped term is the max, gradient flows.
    assert log_prob.grad[0].item() == 0.0
    assert log_prob.grad[1].item() == pytest.approx(math.exp(0.5) / 2, abs=1e-6)
    assert stats.clipfrac == 1.0


def test_gaussian_mean_kl_matches_the_closed_form():
    torch.manual_seed(0)
    mean_p, mean_q = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    std = torch.tensor([0.3, 0.7]).view(2, 1, 1, 1)
    closed = torch.distributions.kl_divergence(torch.distributions.Normal(mean_p, std.expand_as(mean_p)),
                                               torch.distributions.Normal(mean_q, std.expand_as(mean_q)))
    assert torch.allclose(gaussian_mean_kl(mean_p, mean_q, std, "mean"), closed.flatten(1).mean(1), atol=1e-6)
    assert torch.allclose(gaussian_mean_kl(mean_p, mean_q, std, "sum"), closed.flatten(1).sum(1), atol=1e-4)


def test_kl_term_is_zero_for_the_same_weights_and_the_closed_form_after_a_change():
    method = _method(FlowGRPO, FlowGRPOConfig, kl_coef=0.5, kl_form="exact")
    trajectory = rollout(method.policy, ["a red circle"] * 4, method.sampler(), torch.Generator().manual_seed(0))
    steps = torch.tensor([0, 1, 2, 3])
    advantages = torch.zeros(4)
    loss, stats, kl = grpo_step_loss(method, trajectory, steps, advantages, method.config, method.reference)
    assert kl == pytest.approx(0.0, abs=1e-10) and stats.ratio_mean == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        for parameter in method.policy.denoiser.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    loss, _, kl = grpo_step_loss(method, trajectory, steps, advantages, method.config, method.reference)
    new = transition_log_prob(method.policy, trajectory, steps)
    ref = transition_log_prob(method.reference, trajectory, steps)
    by_hand = (((new.mean - ref.mean) ** 2) / (2 * new.std**2)).flatten(1).mean(1).mean().detach()
    assert kl == pytest.approx(float(by_hand), rel=1e-5) and kl > 0
    assert loss.item() == pytest.approx(0.5 * float(by_hand), rel=1e-5)  # A = 0: the loss is beta * KL
    # The official scaling divides by 2 sigma_t^2 instead of 2 sigma_t^2 dt: the exact KL times each step's dt.
    method.config.kl_form = "official"
    per_sample = (((new.mean - ref.mean) ** 2) / (2 * new.std**2)).flatten(1).mean(1).detach()
    schedule = trajectory.schedule
    dt = (schedule.sigma - schedule.sigma_next)[steps]
    _, _, official = grpo_step_loss(method, trajectory, steps, advantages, method.config, method.reference)
    assert official == pytest.approx(float((per_sample * dt).mean()), rel=1e-5)
    assert official == pytest.approx(kl / 4, rel=1e-5)  # 4 uniform steps: dt = 1/4 everywhere


# --------------------------------------------------------------------------------------------------------
# Flow-GRPO and the ratio at the first inner step
# --------------------------------------------------------------------------------------------------------

def test_flow_grpo_step_has_ratio_one_first_and_skips_the_last_step_as_the_public_configs():
    method = _method(FlowGRPO, FlowGRPOConfig, kl_coef=0.04, minibatch_size=2)
    metrics = method.train_step(step_context(0, 0))
    assert metrics["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["trained_steps"] == 3.0
    assert metrics["kl_to_reference"] >= 0.0
    every = _method(FlowGRPO, FlowGRPOConfig, train_last_step=True).train_step(step_context(0, 0))
    assert every["trained_steps"] == 4.0
    with pytest.raises(ValueError, match="flow"):
        _method(FlowGRPO, FlowGRPOConfig, kind="diffusion")


def test_flow_grpo_sde_steps_sample_and_train_only_the_first_steps():
    method = _method(FlowGRPO, FlowGRPOConfig, sde_steps=2, min_step_std=0.0)
    trajectory = rollout(method.policy, ["a red circle"] * 4, method.sampler(), torch.Generator().manual_seed(0))
    assert trajectory.schedule.stochastic.tolist() == [True, True, False, False]
    steps = training_steps(trajectory, 1.0, np.random.default_rng(0))
    assert sorted(set(steps.flatten().tolist())) == [0, 1]
    assert method.train_step(step_context(0, 0))["trained_steps"] == 2.0
    with pytest.raises(ValueError, match="sde-steps"):
        _method(FlowGRPO, FlowGRPOConfig, sde_steps=9)


def test_flow_grpo_shared_noise_starts_each_group_from_one_noise_and_branches_only_in_the_sde_steps(monkeypatch):
    import reference_impls.algorithms.flow_grpo as flow_grpo

    seen = {}
    original = flow_grpo.collect

    def spy(method, ctx, prompts, sampler=None, noise=None):  # noqa: ANN001, ANN202
        batch = original(method, ctx, prompts, sampler, noise=noise)
        seen.update(noise=noise, states=batch.trajectory.states)
        return batch

    monkeypatch.setattr(flow_grpo, "collect", spy)
    _method(FlowGRPO, FlowGRPOConfig, sde_steps=2).train_step(step_context(0, 0))
    assert seen["noise"] is None  # the paper's default: one initial noise per image
    _method(FlowGRPO, FlowGRPOConfig, sde_steps=2, shared_noise=True).train_step(step_context(0, 0))
    noise, states = seen["noise"], seen["states"]
    assert torch.equal(states[:, 0], noise)
    assert torch.equal(states[0, 0], states[1, 0]) and not torch.allclose(states[0, 0], states[2, 0])
    assert not torch.allclose(states[0, 1], states[1, 1])  # the first SDE step separates the members


def test_min_step_std_leaves_out_the_quiet_late_steps():
    method = _method(FlowGRPO, FlowGRPOConfig, num_steps=8, batch_size=2, minibatch_size=2)
    trajectory = rollout(method.policy, ["a red circle"] * 2, method.sampler(), torch.Generator().manual_seed(0))
    stds = trajectory.step_stds
    kept = training_steps(trajectory, 1.0, np.random.default_rng(0), min_std=0.3)
    assert sorted(kept[0].tolist()) == [i for i in range(8) if stds[i] >= 0.3]
    assert 0 < kept.shape[1] < 8


# --------------------------------------------------------------------------------------------------------
# DanceGRPO: shared initial noise
# --------------------------------------------------------------------------------------------------------

def test_shared_initial_noise_is_identical_within_groups_and_differs_across():
    noise = shared_initial_noise(tiny_policy("flow"), 6, 3, torch.Generator().manual_seed(0))
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[1], noise[2])
    assert torch.equal(noise[3], noise[4]) and torch.equal(noise[4], noise[5])
    assert not torch.allclose(noise[0], noise[3])


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_dance_grpo_rolls_out_groups_from_shared_noise_on_both_model_kinds(kind: str, monkeypatch):
    import reference_impls.algorithms.dance_grpo as dance

    seen = {}
    original = dance.collect

    def spy(method, ctx, prompts, sampler=None, noise=None):  # noqa: ANN001, ANN202
        seen.update(noise=noise, sampler=sampler, prompts=prompts)
        batch = original(method, ctx, prompts, sampler, noise=noise)
        seen["states"] = batch.trajectory.states
        return batch

    monkeypatch.setattr(dance, "collect", spy)
    method = _method(DanceGRPO, DanceGRPOConfig, kind=kind, timestep_fraction=0.5)
    metrics = method.train_step(step_context(0, 0))
    noise, states = seen["noise"], seen["states"]
    assert seen["sampler"].name == ("ddim" if kind == "diffusion" else "sde")
    assert torch.equal(noise[0], noise[1]) and not torch.allclose(noise[0], noise[2])
    assert torch.equal(states[:, 0], noise)  # the rollout started from it
    assert not torch.allclose(states[0, -1], states[1, -1])  # the sampler's noise still separates members
    assert metrics["trained_steps"] == 2.0 and metrics["ratio_first"] == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# MixGRPO: the sliding window
# --------------------------------------------------------------------------------------------------------

def test_mix_grpo_window_moves_progressively_then_stays_at_the_end():
    config = MixGRPOConfig(num_steps=6, window_size=2, window_stride=1, shift_interval=3)
    # every 3 iterations the left edge moves by 1, up to T - w = 4
    assert [window_start(i, config) for i in range(16)] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3 + [4] * 4
    stride = MixGRPOConfig(num_steps=6, window_size=2, window_stride=3, shift_interval=2)
    assert [window_start(i, stride) for i in range(6)] == [0, 0, 3, 3, 4, 4]
    # exponential decay: tau(l) = ceil(4 exp(-ln 2 * max(0, l - 1))) = 4, 4, 2, 1, ...
    decay = MixGRPOConfig(num_steps=8, window_size=2, shift_interval=4, interval_decay=math.log(2), decay_after=1)
    assert [window_start(i, decay) for i in range(13)] == [0] * 4 + [1] * 4 + [2] * 2 + [3, 4, 5]


def test_mix_grpo_samples_and_trains_exactly_the_window_steps():
    config = MixGRPOConfig(num_steps=6, window_size=2)
    policy = tiny_policy("flow")
    prompts = ["a red circle", "a blue square"]
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    a = rollout(policy, prompts, window_sampler(config, 2), torch.Generator().manual_seed(2), noise=noise)
    b = rollout(policy, prompts, window_sampler(config, 2), torch.Generator().manual_seed(3), noise=noise)
    assert a.schedule.stochastic.tolist() == [False, False, True, True, False, False]
    assert (a.log_probs[:, [2, 3]] != 0).all() and (a.log_probs[:, [0, 1, 4, 5]] == 0).all()
    # ODE before the window: the states up to its start do not depend on the sampler's noise
    assert torch.equal(a.states[:, :3], b.states[:, :3]) and not torch.allclose(a.states[:, 3], b.states[:, 3])
    steps = training_steps(a, 1.0, np.random.default_rng(0))
    assert sorted(steps[0].tolist()) == [2, 3] and sorted(steps[1].tolist()) == [2, 3]


def test_mix_grpo_step_reports_window_and_cost():
    method = _method(MixGRPO, MixGRPOConfig, num_steps=4, window_size=2, shift_interval=1)
    first = method.train_step(step_context(0, 0))
    later = method.train_step(step_context(0, 1))
    assert (first["window_start"], later["window_start"]) == (0.0, 1.0)
    assert first["sde_steps"] == first["trained_steps"] == 2.0
    assert first["ratio_first"] == pytest.approx(1.0, abs=1e-6) and first["time_update_s"] > 0


# --------------------------------------------------------------------------------------------------------
# TempFlow-GRPO: branching and noise-aware weights
# --------------------------------------------------------------------------------------------------------

def test_tempflow_branching_only_the_branch_step_has_a_log_prob():
    method = _method(TempFlowGRPO, TempFlowGRPOConfig, num_steps=5, kl_coef=0.0)
    policy = method.policy
    noise = shared_initial_noise(policy, 4, 2, torch.Generator().manual_seed(0))
    branch = torch.tensor([1, 1, 3, 3])
    traj = branched_rollout(policy, ["a red circle"] * 2 + ["a blue square"] * 2, method.sampler(), branch, noise,
                            torch.Generator().manual_seed(1))
    nonzero = traj.log_probs != 0
    assert nonzero.tolist() == [[False, True, False, False, False]] * 2 + [[False, False, False, True, False]] * 2
    assert traj.schedule.stochastic.tolist() == [False, True, False, True, False]
    # members of a group share the ODE path up to and including x_k, and differ after the branch step
    assert torch.equal(traj.states[0, :2], traj.states[1, :2]) and not torch.allclose(traj.states[0, 2],
                                                                                          traj.states[1, 2])
    assert torch.equal(traj.states[2, :4], traj.states[3, :4]) and not torch.allclose(traj.states[2, 4],
                                                                                          traj.states[3, 4])
    # the stored log-prob is recomputed exactly (ratio 1) at each sample's branch step
    recomputed = transition_log_prob(policy, traj, branch)
    assert torch.allclose(recomputed.log_prob, traj.log_probs[torch.arange(4), branch], atol=1e-5)


def test_noise_aware_weights_follow_the_step_noise_std_and_average_one():
    method = _method(TempFlowGRPO, TempFlowGRPOConfig, num_steps=8, branch_end=6, noise_level=0.7)
    from reference_impls.sampling import make_schedule

    schedule = make_schedule(method.policy, method.sampler())
    weights = noise_aware_weights(schedule, 0.7, range(0, 6))
    assert weights[:6].mean().item() == pytest.approx(1.0, abs=1e-6)
    assert all(weights[i] >= weights[i + 1] - 1e-7 for i in range(7))  # early (noisy) steps weigh more
    # by hand: std_k = a sqrt(s / (1 - s)) sqrt(sigma_k - sigma_{k+1}), with s = sigma_1 at the first step (sigma = 1)
    sigma, nxt = schedule.sigma.tolist(), schedule.sigma_next.tolist()
    stds = []
    for k in range(6):
        s = sigma[1] if sigma[k] >= 1 else sigma[k]
        stds.append(0.7 * math.sqrt(s / (1 - s)) * math.sqrt(sigma[k] - nxt[k]))
    assert weights[:6].tolist() == pytest.approx([x / (sum(stds) / 6) for x in stds], rel=1e-5)


def test_tempflow_step_trains_one_branch_step_per_sample_with_ratio_one_first():
    method = _method(TempFlowGRPO, TempFlowGRPOConfig, num_steps=4, branch_end=3, kl_coef=0.04)
    metrics = method.train_step(step_context(0, 0))
    assert metrics["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert 0 <= metrics["branch_step_mean"] < 3 and metrics["weight_mean"] > 0


# --------------------------------------------------------------------------------------------------------
# Smoke runs on the shipped models: JPEG incompressibility (one of DDPO's tasks) rises within the smoke preset,
# and the same seed gives the same metrics. (The stage-2 base draws clean flat shapes on white, already close to
# the most compressible image; incompressibility has room to rise in a few iterations.)
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["flow-grpo", "dance-grpo", "mix-grpo", "tempflow-grpo"])
def test_smoke_run_raises_the_reward_judged_paired_with_ratio_one_at_the_first_inner_step(method: str, tmp_path):
    # Judged on the trained model against the base, same prompt and same initial noise (6-step ODE, 32 images),
    # not on the logged batch means, whose batch-to-batch noise is as large as a smoke run's effect. Measured on
    # two noise seeds: flow-grpo +0.074 / +0.100 kB, dance-grpo +0.074 / +0.079, mix-grpo +0.273 / +0.247,
    # tempflow-grpo +0.293 / +0.258; a model compared with itself gives exactly 0.
    records = run_smoke(method, "jpeg-incompressibility", tmp_path / "run")
    assert len(training_rewards(records)) >= 4
    gain = paired_reward_gain(tmp_path / "run", "shapes-flow", "jpeg-incompressibility", "a red circle",
                              sampler="ode")
    assert gain > 0.03, gain
    assert all(r["ratio_first"] == pytest.approx(1.0, abs=1e-6) for r in records if "ratio_first" in r)
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


def test_same_seed_same_metrics(tmp_path):
    first = run_smoke("tempflow-grpo", "jpeg-compressibility", tmp_path / "a", steps=2, eval_prompts=4)
    second = run_smoke("tempflow-grpo", "jpeg-compressibility", tmp_path / "b", steps=2, eval_prompts=4)
    untimed = [{k: v for k, v in r.items() if k != "wall_s" and not k.startswith("time_")} for r in first]
    assert untimed == [{k: v for k, v in r.items() if k != "wall_s" and not k.startswith("time_")} for r in second]
