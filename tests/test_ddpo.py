"""DDPO-IS and DDPO-SF: losses against hand computations, the ratio at the first inner step, a smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import paired_reward_gain, run_smoke, strip_timing, tiny_policy, training_rewards

from reference_impls.algorithms.ddpo import DDPO, DDPOConfig, draw_prompts
from reference_impls.algorithms.estimators import PerPromptStatTracker, ppo_clip_loss
from reference_impls.rewards import get_reward
from reference_impls.sampling import SamplerConfig, rollout
from reference_impls.training.online import training_steps


def test_ppo_clip_loss_matches_hand_computation():
    # Two samples: ratios e^{0.2} ~ 1.2214 (A = +1) and e^{-0.3} ~ 0.7408 (A = -2), clip 0.1.
    log_prob = torch.tensor([0.2, -0.3])
    old = torch.zeros(2)
    advantages = torch.tensor([1.0, -2.0])
    loss, stats = ppo_clip_loss(log_prob, old, advantages, clip_range=0.1)
    # sample 1: max(-1 * 1.2214, -1 * 1.1) = -1.1 ; sample 2: max(2 * 0.7408, 2 * 0.9) = 1.8
    assert loss.item() == pytest.approx((-1.1 + 1.8) / 2, abs=1e-6)
    assert stats.clipfrac == 1.0
    assert stats.ratio_mean == pytest.approx((math.exp(0.2) + math.exp(-0.3)) / 2, abs=1e-6)
    assert stats.approx_kl == pytest.approx(0.5 * (0.04 + 0.09) / 2, abs=1e-7)


def test_ppo_clip_loss_gradient_vanishes_outside_the_trust_region():
    log_prob = torch.tensor([0.5], requires_grad=True)  # ratio 1.65 > 1.1 with A > 0: clipped, no gradient
    loss, _ = ppo_clip_loss(log_prob, torch.zeros(1), torch.tensor([1.0]), clip_range=0.1)
    loss.backward()
    assert log_prob.grad.item() == 0.0
    inside = torch.tensor([0.05], requires_grad=True)  # ratio 1.05 inside: gradient -A * ratio
    loss, _ = ppo_clip_loss(inside, torch.zeros(1), torch.tensor([1.0]), clip_range=0.1)
    loss.backward()
    assert inside.grad.item() == pytest.approx(-math.exp(0.05), abs=1e-6)


def test_per_prompt_stat_tracker_normalises_per_prompt_and_falls_back_to_batch():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    prompts = ["a", "a", "b"]
    rewards = torch.tensor([1.0, 3.0, 10.0])
    advantages = tracker.update(prompts, rewards)
    # "a" has 2 rewards (>= min_count): mean 2, std 1. "b" has 1: batch mean 14/3, std of the batch.
    assert advantages[:2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    batch = rewards.std(unbiased=False).item()
    assert advantages[2].item() == pytest.approx((10.0 - 14.0 / 3.0) / batch, abs=1e-4)
    # the buffer remembers: a later reward of 2 for "a" is at the mean of (1, 3, 2)
    assert tracker.update(["a"], torch.tensor([2.0])).item() == pytest.approx(0.0, abs=1e-5)


# The smoke presets as they are: the reward is judged paired (same prompt, same noise) on the trained model
# against the base, since the logged batch means of 16 images move by less than their noise.
def test_ddpo_smoke_raises_reward_and_ratio_is_one_at_first_inner_step(tmp_path):
    records = run_smoke("ddpo", "jpeg-compressibility", tmp_path / "run")
    assert len(training_rewards(records)) == 4
    gain = paired_reward_gain(tmp_path / "run", "shapes-diffusion", "jpeg-compressibility", "a red circle")
    assert gain > 0.005, gain  # measured +0.013 on two noise seeds
    assert all(r["ratio_first"] == pytest.approx(1.0, abs=1e-6) for r in records if "ratio_first" in r)
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


CHEAP = dict(batch_size=4, minibatch_size=2, num_steps=4, inner_epochs=2, eval_prompts=4)


def test_ddpo_is_deterministic_and_resumes_exactly(tmp_path):
    straight = run_smoke("ddpo", "jpeg-compressibility", tmp_path / "a", steps=4, checkpoint_every=2, **CHEAP)
    again = run_smoke("ddpo", "jpeg-compressibility", tmp_path / "b", steps=4, checkpoint_every=2, **CHEAP)
    assert strip_timing(straight) == strip_timing(again)
    # A run stopped after 2 steps and resumed to 4 logs the same metrics as the straight run.
    run_smoke("ddpo", "jpeg-compressibility", tmp_path / "c", steps=2, checkpoint_every=2, **CHEAP)
    from helpers import get_method, get_reward, load_policy  # noqa: F401 - same objects the CLI uses

    from reference_impls.training import build_config, train

    cls = get_method("ddpo")
    config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "reward": "jpeg-compressibility",
                                                           "steps": 4, "checkpoint_every": 2, **CHEAP})
    resumed = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config),
                    tmp_path / "c", resume=True, progress=False)
    # The 2-step run also evaluated at its last step (step 2); compare the training metrics.
    def training_only(records):  # noqa: ANN001, ANN202
        return [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in strip_timing(records)]

    assert training_only(resumed) == training_only(straight)


def test_ddpo_sf_smoke_raises_reward_judged_paired(tmp_path):
    # paired with the base (same prompt and initial noise): measured +0.124 and +0.145 on two noise seeds
    records = run_smoke("ddpo-sf", "jpeg-compressibility", tmp_path / "run")
    assert len(training_rewards(records)) == records[-1]["step"]
    gain = paired_reward_gain(tmp_path / "run", "shapes-diffusion", "jpeg-compressibility", "a red circle")
    assert gain > 0.03, gain


def _step(mean: torch.Tensor, output: torch.Tensor):
    from reference_impls.sampling.steps import StepOutput

    return StepOutput(mean, mean, torch.tensor(0.5), None, mean, model_output=output)


def test_dpok_loss_is_weighted_surrogate_plus_gaussian_kl():
    from reference_impls.algorithms.dpok import DPOKConfig, dpok_loss, dpok_regulariser

    config = DPOKConfig(reward_weight=2.0, kl_coef=0.5, clip_range=0.1)
    zeros = torch.zeros(2)
    mean = torch.zeros(2, 1, 1, 2)
    reference = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 2.0]]]])
    regulariser = dpok_regulariser(_step(mean, mean), _step(reference, reference), config)
    loss, stats, kl = dpok_loss(zeros, zeros, torch.tensor([1.0, -1.0]), regulariser, config)
    # surrogate: ratios 1 -> mean(-A) = 0 ; KL per sample (mean over 2 dims): (1+1)/2/(2*0.25)=2 and (0+4)/2/0.5=4
    assert kl.item() == pytest.approx(3.0)
    assert loss.item() == pytest.approx(2.0 * 0.0 + 0.5 * 3.0)
    assert stats.ratio_mean == 1.0


def test_dpok_official_eps_mse_form_compares_noise_predictions():
    from reference_impls.algorithms.dpok import DPOKConfig, dpok_regulariser

    config = DPOKConfig(kl_form="eps-mse")
    mean = torch.zeros(1, 1, 1, 2)
    eps = torch.tensor([[[[1.0, 3.0]]]])
    # (1 - 0)^2 and (3 - 0)^2 averaged over 2 dims = 5, whatever the step means and std
    assert dpok_regulariser(_step(mean, eps), _step(mean + 7, torch.zeros_like(eps)), config).item() == 5.0
    with pytest.raises(ValueError, match="kl-form"):
        DPOKConfig(kl_form="forward").validate()


def _dpok_or_ddpo(method_name: str, kl_coef: float, steps: int):
    from reference_impls.algorithms.dpok import DPOK, DPOKConfig
    from reference_impls.training.method import step_context

    settings = dict(batch_size=8, minibatch_size=4, num_steps=4, learning_rate=1e-3, prompts="a red circle",
                    per_prompt_stat_tracking=False, min_step_std=0.0)
    reward = get_reward("jpeg-compressibility")
    if method_name == "ddpo":
        method = DDPO(policy=tiny_policy(), reward=reward, config=DDPOConfig(**settings))
    else:
        method = DPOK(policy=tiny_policy(), reward=reward,
                      config=DPOKConfig(**settings, kl_coef=kl_coef, reward_weight=1.0))
    records = [method.train_step(step_context(0, step)) for step in range(steps)]
    return method, records


def test_dpok_kl_acts_from_the_first_iteration():
    """Two optimiser steps per iteration: the second sees a nonzero KL, so beta changes the first update."""
    ddpo, _ = _dpok_or_ddpo("ddpo", 0.0, 1)
    inert, _ = _dpok_or_ddpo("dpok", 0.0, 1)
    anchored, records = _dpok_or_ddpo("dpok", 1e4, 1)
    weights = [dict(m.policy.denoiser.named_parameters()) for m in (ddpo, inert, anchored)]
    moved = [max(float((w[k] - weights[0][k]).detach().abs().max()) for k in w) for w in weights[1:]]
    assert moved[0] < 1e-6, "with beta = 0 DPOK's update is DDPO's (reward weight 1)"
    assert moved[1] > 1e-5, "with beta > 0 the KL must change the first iteration's update"
    assert records[0]["kl_to_pretrained"] > 0


def test_dpok_kl_keeps_the_policy_closer_to_the_pretrained_model():
    free, free_records = _dpok_or_ddpo("dpok", 0.0, 3)
    anchored, anchored_records = _dpok_or_ddpo("dpok", 1e4, 3)
    assert anchored_records[-1]["kl_to_pretrained"] < 0.5 * free_records[-1]["kl_to_pretrained"]


def test_dpok_smoke_raises_reward(tmp_path):
    records = run_smoke("dpok", "jpeg-compressibility", tmp_path / "run")
    gain = paired_reward_gain(tmp_path / "run", "shapes-diffusion", "jpeg-compressibility", "a red circle")
    assert gain > 0.005, gain  # measured +0.013 on two noise seeds
    assert all(r["kl_to_pretrained"] >= 0 for r in records if "kl_to_pretrained" in r)


def test_draw_prompts_repeats_each_prompt_so_the_tracker_has_statistics():
    config = DDPOConfig(batch_size=8, samples_per_prompt=4, prompts="train")
    method = DDPO(policy=tiny_policy(), reward=get_reward("jpeg-compressibility"), config=config)
    prompts = draw_prompts(method, config, np.random.default_rng(0))
    assert len(prompts) == 8 and prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    with pytest.raises(ValueError, match="multiple of --samples-per-prompt"):
        draw_prompts(method, DDPOConfig(batch_size=6, samples_per_prompt=4), np.random.default_rng(0))


def test_near_deterministic_last_ddim_step_is_left_out_of_training():
    trajectory = rollout(tiny_policy(), ["a red circle"] * 2, SamplerConfig("ddim", num_steps=6),
                         torch.Generator().manual_seed(0))
    stds = trajectory.step_stds
    assert stds is not None and stds[-1] < 0.01 < 0.1 < float(stds[:-1].min())
    every = training_steps(trajectory, 1.0, np.random.default_rng(0))
    kept = training_steps(trajectory, 1.0, np.random.default_rng(0), min_std=0.05)
    assert sorted(every[0].tolist()) == list(range(6))
    assert sorted(kept[0].tolist()) == list(range(5))
    with pytest.raises(ValueError, match="no sampler step"):
        training_steps(trajectory, 1.0, np.random.default_rng(0), min_std=5.0)


def test_stochastic_steps_sample_and_train_only_the_first_steps():
    from reference_impls.training.online import sampler_from_config

    config = DDPOConfig(num_steps=6, stochastic_steps=2)
    method = DDPO(policy=tiny_policy(), reward=get_reward("jpeg-compressibility"), config=config)
    sampler = sampler_from_config(method)
    assert sampler.stochastic_window == (0, 2)
    trajectory = rollout(method.policy, ["a red circle"] * 2, sampler, torch.Generator().manual_seed(0))
    assert trajectory.schedule.stochastic.tolist() == [True, True, False, False, False, False]
    # Only the first two steps drew noise and have a log-probability; the rest are eta = 0 DDIM steps.
    assert bool((trajectory.step_stds[:2] > 0.1).all()) and trajectory.step_stds[2:].tolist() == [0.0] * 4
    assert bool((trajectory.log_probs[:, 2:] == 0).all()) and bool((trajectory.log_probs[:, :2] != 0).all())
    steps = training_steps(trajectory, 1.0, np.random.default_rng(0), min_std=config.min_step_std)
    assert sorted(steps[0].tolist()) == [0, 1]
    with pytest.raises(ValueError, match="--stochastic-steps"):
        DDPOConfig(num_steps=6, stochastic_steps=7).validate()
