"""The preference family: Diffusion-DPO, D3PO, Diffusion-KTO, SPO and the synthetic labeller behind them.

Losses are checked against hand computations on small tensors; the labeller's noise model against its
Bradley-Terry / Plackett-Luce rates on many draws; the preference bank for determinism and caching; each
method by a smoke run on the shipped model that raises the reward from a fixed seed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import paired_reward_gain, run_smoke, tiny_policy, training_rewards

from reference_impls.algorithms.d3po import step_dpo_loss
from reference_impls.algorithms.diffusion_dpo import diffusion_dpo_loss, noised
from reference_impls.algorithms.diffusion_kto import (
    class_draw_weights,
    diffusion_kto_loss,
    kto_reference_point,
)
from reference_impls.algorithms.spo import select_pair
from reference_impls.rewards.preferences import SyntheticLabeller, build_preference_bank, load_bank
from reference_impls.sampling import SamplerConfig


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny tensors on a shared machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _logsig_loss(inside: float) -> float:
    return math.log1p(math.exp(-inside))


# -- Diffusion-DPO ---------------------------------------------------------------------------------
def test_diffusion_dpo_loss_is_log2_at_equal_errors_and_matches_hand_computation():
    same = torch.tensor([0.3, 0.7])
    loss, stats = diffusion_dpo_loss(same, same, same, same, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats.implicit_acc == 0.0  # inside term exactly 0 is not counted as ranking the winner first
    # Winner denoised 0.01 better than the reference, loser unchanged: inside = -beta/2 (-0.01 - 0) = 0.5 at beta 100.
    err_w, ref_w = torch.tensor([0.19]), torch.tensor([0.2])
    err_l, ref_l = torch.tensor([0.3]), torch.tensor([0.3])
    loss, stats = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=100.0)
    assert loss.item() == pytest.approx(_logsig_loss(0.5), abs=1e-5)
    assert stats.implicit_acc == 1.0 and stats.implicit_margin == pytest.approx(0.5, abs=1e-5)
    assert loss.item() < math.log(2)


def test_diffusion_dpo_gradient_lowers_the_winners_error_and_raises_the_losers():
    err_w = torch.tensor([0.2], requires_grad=True)
    err_l = torch.tensor([0.2], requires_grad=True)
    loss, _ = diffusion_dpo_loss(err_w, err_l, torch.tensor([0.2]), torch.tensor([0.2]), beta=10.0)
    loss.backward()
    # d/d err_w of -log sigmoid(-beta/2 (dw - dl)) at 0: sigmoid(0) * beta/2 = 2.5 > 0 (descent lowers err_w)
    assert err_w.grad.item() == pytest.approx(2.5, abs=1e-6)
    assert err_l.grad.item() == pytest.approx(-2.5, abs=1e-6)
    # Beta is the official code's: doubling beta doubles the inside term.
    loss_small, s1 = diffusion_dpo_loss(torch.tensor([0.19]), torch.tensor([0.3]), torch.tensor([0.2]),
                                        torch.tensor([0.3]), beta=100.0)
    loss_big, s2 = diffusion_dpo_loss(torch.tensor([0.19]), torch.tensor([0.3]), torch.tensor([0.2]),
                                      torch.tensor([0.3]), beta=200.0)
    assert s2.implicit_margin == pytest.approx(2 * s1.implicit_margin, rel=1e-5)
    assert loss_big.item() < loss_small.item()


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_noising_matches_the_pretraining_objective(kind):
    policy = tiny_policy(kind)
    x0, noise = torch.full((2, 3, 4, 4), 0.5), torch.full((2, 3, 4, 4), -1.0)
    if kind == "diffusion":
        level = torch.tensor([0, 999])
        x_t, timestep, target = noised(policy, x0, noise, level)
        a = policy.scheduler.alphas_cumprod[level].float()
        assert torch.allclose(x_t[:, 0, 0, 0], a.sqrt() * 0.5 - (1 - a).sqrt(), atol=1e-6)
        assert torch.equal(target, noise) and timestep.tolist() == [0, 999]
    else:
        level = torch.tensor([0.25, 1.0])
        x_t, timestep, target = noised(policy, x0, noise, level)
        assert x_t[:, 0, 0, 0].tolist() == pytest.approx([0.75 * 0.5 - 0.25, -1.0])
        assert torch.allclose(target, noise - x0) and timestep.tolist() == pytest.approx([250.0, 1000.0])


# -- D3PO / SPO step loss ----------------------------------------------------------------------------
def test_step_dpo_loss_matches_hand_computation_and_clips():
    # log-ratios +0.05 (winner) and -0.05 (loser), inside their clip range log(0.9) .. log(1.1)
    loss, stats = step_dpo_loss(torch.tensor([0.05]), torch.tensor([0.0]), torch.tensor([-0.05]),
                                torch.tensor([0.0]), beta=10.0, ratio_clip=0.1)
    assert loss.item() == pytest.approx(_logsig_loss(10 * 0.1), abs=1e-6)
    assert stats.implicit_acc == 1.0 and stats.clipfrac == 0.0
    equal, _ = step_dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), 0.1, 0.1)
    assert equal.item() == pytest.approx(math.log(2), abs=1e-7)
    # A winner ratio of e^0.5 > 1.1 is clipped: the loss uses log(1.1) and its gradient is zero.
    log_prob = torch.tensor([0.5], requires_grad=True)
    loss, stats = step_dpo_loss(log_prob, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                                beta=10.0, ratio_clip=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(_logsig_loss(10 * math.log(1.1)), abs=1e-6)
    assert log_prob.grad.item() == 0.0 and stats.clipfrac == 0.5
    # Inside the range, raising the winner's log-prob lowers the loss.
    inside = torch.tensor([0.0], requires_grad=True)
    loss, _ = step_dpo_loss(inside, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 10.0, 0.1)
    loss.backward()
    assert inside.grad.item() == pytest.approx(-10 * 0.5, abs=1e-6)


# -- Diffusion-KTO -------------------------------------------------------------------------------------
def test_kto_utility_values_and_reference_point():
    err = torch.tensor([0.1, 0.3])
    ref_err = torch.tensor([0.2, 0.2])  # g = +0.1 (desirable image), -0.1 (undesirable image)
    desirable = torch.tensor([True, False])
    loss, stats = diffusion_kto_loss(err, ref_err, desirable, beta=10.0, reference_point=0.0)
    h = 1 / (1 + math.exp(-1.0))  # both images on their right side by beta * 0.1 = 1
    assert loss.item() == pytest.approx(1 - h, abs=1e-6)
    assert stats.utility == pytest.approx(h, abs=1e-6) and stats.accuracy == 1.0
    # lambda weights and a reference point z0 = 0.05: desirable inside = 0.5, undesirable inside = 1.5
    loss, _ = diffusion_kto_loss(err, ref_err, desirable, 10.0, 0.05, lambda_desirable=2.0, lambda_undesirable=1.0)
    expected = (2.0 * (1 - 1 / (1 + math.exp(-0.5))) + 1.0 * (1 - 1 / (1 + math.exp(-1.5)))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # z0 = max(0, mean g), detached
    g = torch.tensor([0.3, -0.1], requires_grad=True)
    z0 = kto_reference_point(g)
    assert z0.item() == pytest.approx(0.1) and not z0.requires_grad
    assert kto_reference_point(torch.tensor([-0.3, 0.1])).item() == 0.0
    # The gradient pushes a desirable image's error down and an undesirable one's up.
    err = torch.tensor([0.2, 0.2], requires_grad=True)
    loss, _ = diffusion_kto_loss(err, torch.tensor([0.2, 0.2]), desirable, 10.0, 0.0)
    loss.backward()
    assert err.grad[0].item() > 0 and err.grad[1].item() < 0


def test_kto_draws_desirable_images_with_the_asked_probability():
    desirable = np.array([True, False, False, False, True, False])  # 2 liked, 4 disliked
    weights = class_draw_weights(desirable, 0.8)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[desirable].sum() == pytest.approx(0.8) and weights[0] == pytest.approx(0.4)
    assert weights[~desirable] == pytest.approx(np.full(4, 0.05))
    # 0.5 balances the classes whatever the bank's like rate; one class alone is drawn uniformly.
    assert class_draw_weights(desirable, 0.5)[desirable].sum() == pytest.approx(0.5)
    assert class_draw_weights(np.array([True, True]), 0.8) == pytest.approx(np.array([0.5, 0.5]))


# -- the synthetic labeller --------------------------------------------------------------------------
def test_labeller_is_deterministic_and_follows_bradley_terry():
    labeller = SyntheticLabeller(temperature=0.1, seed=3)
    n = 20_000
    a, b = torch.full((n,), 0.6), torch.full((n,), 0.5)
    first = labeller.compare_scores(a, b, key=7)
    again = labeller.compare_scores(a, b, key=7)
    assert torch.equal(first.prefer_a, again.prefer_a)
    assert not torch.equal(first.prefer_a, labeller.compare_scores(a, b, key=8).prefer_a)
    expected = 1 / (1 + math.exp(-0.1 / 0.1))  # sigmoid((0.6 - 0.5) / 0.1) = 0.731
    assert first.prefer_a.float().mean().item() == pytest.approx(expected, abs=0.015)
    assert first.probability_a[0].item() == pytest.approx(expected, abs=1e-6)
    assert first.agreement == pytest.approx(expected, abs=0.015)
    # Equal exact scores are ties; a noiseless labeller always prefers the higher score.
    assert labeller.compare_scores(torch.tensor([0.5]), torch.tensor([0.5]), key=0).tie.item()
    exact = SyntheticLabeller(temperature=0.0).compare_scores(torch.tensor([0.2, 0.9]), torch.tensor([0.4, 0.1]), 0)
    assert exact.prefer_a.tolist() == [False, True] and exact.agreement == 1.0


def test_like_labels_follow_their_rate():
    labeller = SyntheticLabeller(temperature=0.05, like_threshold=0.9, seed=1)
    scores = torch.full((20_000,), 1.0)
    rate = labeller.like(scores, key=0).float().mean().item()
    assert rate == pytest.approx(1 / (1 + math.exp(-0.1 / 0.05)), abs=0.015)
    assert torch.equal(labeller.like(scores, key=0), labeller.like(scores, key=0))


def test_spo_candidate_selection():
    scores = torch.tensor([[0.5, 1.0, 0.2],
                           [1.0, 1.0, 0.2],
                           [0.0, 1.0, 0.6]])  # (k=3 candidates, B=3 chains)
    chosen, rejected, valid = select_pair(scores, SyntheticLabeller(temperature=0.0), key=(0, 0))
    assert chosen.tolist()[0] == 1 and rejected.tolist()[0] == 2
    assert chosen[2].item() == 2 and rejected[2].item() in (0, 1)
    assert valid.tolist() == [True, False, True]  # chain 1: all candidates tie
    # With noise, the choice between two candidates follows Bradley-Terry (Gumbel-max = Plackett-Luce).
    n = 20_000
    two = torch.stack([torch.full((n,), 0.6), torch.full((n,), 0.5)])
    chosen, rejected, valid = select_pair(two, SyntheticLabeller(temperature=0.1, seed=2), key=(1, 2))
    assert (chosen == 0).float().mean().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.015)
    assert bool(valid.all()) and bool((chosen != rejected).all())


# -- the preference bank -----------------------------------------------------------------------------
def test_preference_bank_is_deterministic_and_cached(tmp_path, monkeypatch):
    policy = tiny_policy("diffusion")
    prompts = ["a red circle", "two blue squares", "a green triangle", "a yellow square"]
    sampler = SamplerConfig("ddim", num_steps=2, eta=0.0)
    bank = build_preference_bank(policy, prompts, sampler, seed=5, reward="jpeg-compressibility",
                                 cache_dir=tmp_path / "a")
    assert bank.states.shape == (4, 2, 3, 32, 32) and bank.images.dtype == torch.uint8
    assert not torch.equal(bank.states[:, 0], bank.states[:, 1])  # two different seeds per prompt
    other = build_preference_bank(policy, prompts, sampler, seed=5, reward="jpeg-compressibility",
                                  cache_dir=tmp_path / "b")
    assert torch.equal(bank.states, other.states) and torch.equal(bank.scores, other.scores)
    # A second call finds the cache and samples nothing.
    import reference_impls.sampling as sampling

    monkeypatch.setattr(sampling, "rollout", lambda *a, **k: pytest.fail("rebuilt a cached bank"))
    cached = build_preference_bank(policy, prompts, sampler, seed=5, reward="jpeg-compressibility",
                                   cache_dir=tmp_path / "a")
    assert torch.equal(cached.states, bank.states) and cached.prompts == prompts
    assert load_bank(bank.folder).meta["seed"] == 5
    # Labels: deterministic, ties dropped, written beside the images.
    labeller = SyntheticLabeller(reward="jpeg-compressibility", temperature=0.0)
    pairs = bank.pairs(labeller)
    assert len(pairs) + pairs.ties_dropped == 4
    assert bool((pairs.winner_scores >= pairs.loser_scores).all())
    assert list(bank.folder.glob("labels-*.json"))
    likes = bank.likes(SyntheticLabeller(reward="jpeg-compressibility", like_threshold=-1e9))
    assert len(likes) == 8 and bool(likes.desirable.all())


def test_a_reward_redefined_under_its_name_does_not_reuse_banks_scored_before(monkeypatch):
    """shapes-composition changed meaning; a bank scored with the old definition must not be loaded."""
    import dataclasses

    from reference_impls.rewards import REWARDS
    from reference_impls.rewards.preferences import bank_key

    sampler = SamplerConfig("ddim", num_steps=2, eta=0.0)
    key = bank_key("weights", ["a red circle"], sampler, 0, "shapes-composition")
    assert key == bank_key("weights", ["a red circle"], sampler, 0, "shapes-composition")
    redefined = dataclasses.replace(REWARDS["shapes-composition"], description="the matched score alone")
    monkeypatch.setitem(REWARDS, "shapes-composition", redefined)
    assert bank_key("weights", ["a red circle"], sampler, 0, "shapes-composition") != key


# -- smoke runs on the shipped model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bank_cache(tmp_path_factory):
    """One preference-bank cache for the module's smoke runs (a bank is keyed by weights, prompts, sampler,
    seed and reward, so each reward's bank is built once)."""
    return str(tmp_path_factory.mktemp("preference-banks"))


def _first_last(values: list[float], k: int = 2) -> tuple[float, float]:
    return sum(values[:k]) / k, sum(values[-k:]) / k


def test_diffusion_dpo_smoke_raises_the_monitored_reward_and_learns_the_preference(tmp_path, bank_cache):
    # smoke preset: JPEG incompressibility as the rater's score (the stage-2 base draws flat shapes on white,
    # already near the most compressible image), a bank of 32 easy prompts, 8 updates
    records = run_smoke("diffusion-dpo", "jpeg-incompressibility", tmp_path / "run", cache_dir=bank_cache)
    rewards = training_rewards(records)
    first, last = _first_last(rewards)
    assert last > first, rewards  # fresh samples on fixed prompts and noise get less compressible
    later = [r["implicit_acc"] for r in records[len(records) // 2 :] if "implicit_acc" in r]
    assert sum(later) / len(later) > 0.5  # the implicit reward ranks most winners first
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


def test_diffusion_kto_smoke_raises_its_reward_judged_paired(tmp_path, bank_cache):
    # The logged batch means of fresh samples move less than their noise in 8 updates, so the reward is judged
    # on the trained model against the base, same prompt and same initial noise (measured +0.060 and +0.056 on
    # two noise seeds at the preset's lr 1e-4; +0.009 and +0.015 at the former 3e-5).
    records = run_smoke("diffusion-kto", "jpeg-compressibility", tmp_path / "run", cache_dir=bank_cache)
    gain = paired_reward_gain(tmp_path / "run", "shapes-diffusion", "jpeg-compressibility", "a red circle")
    assert gain > 0.02, gain
    assert len(training_rewards(records)) == records[-1]["step"]
    assert all(r["reference_point"] >= 0 for r in records if "reference_point" in r)
    assert all(0 <= r["kto_accuracy"] <= 1 for r in records if "kto_accuracy" in r)
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


def test_d3po_smoke_raises_the_reward_its_rater_prefers(tmp_path):
    records = run_smoke("d3po", "jpeg-incompressibility", tmp_path / "run")
    rewards = training_rewards(records)
    first, last = _first_last(rewards)
    assert last > first + 0.1, rewards  # measured 0.99 -> 1.35 kB
    assert all(0 <= r["pair_fraction"] <= 1 for r in records if "pair_fraction" in r)
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


def test_spo_smoke_raises_the_reward_its_rater_prefers(tmp_path):
    records = run_smoke("spo", "jpeg-incompressibility", tmp_path / "run")
    rewards = training_rewards(records)
    first, last = _first_last(rewards)
    assert last > first + 0.1, rewards  # measured 1.00 -> 1.34 kB
    assert all(r["pairs"] > 0 for r in records if "pairs" in r)
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


# -- every method on a tiny flow model (velocity errors, SDE steps), deterministically ------------------
@pytest.mark.parametrize("name", ["diffusion-dpo", "diffusion-kto", "d3po", "spo"])
def test_method_takes_a_step_on_a_flow_model(name, tmp_path):
    from reference_impls.algorithms import get_method
    from reference_impls.rewards import get_reward
    from reference_impls.training import build_config, step_context

    cls = get_method(name)
    settings = {"preset": "smoke", "reward": "jpeg-compressibility", "prompts": "easy", "batch_size": 2,
                "num_steps": 3}
    if name.startswith("diffusion"):
        settings.update(num_pairs=6, bank_steps=2, monitor_samples=2, cache_dir=str(tmp_path),
                        labeller_temperature=0.0)
    if name == "diffusion-kto":
        settings.update(like_threshold=-1e9)  # every image liked: the batch still trains
    if name == "spo":
        settings.update(num_candidates=2, divert_start_step=1, minibatch_size=4)
    config = build_config(cls.config_class, cls.presets, settings)
    method = cls(policy=tiny_policy("flow"), reward=get_reward(config.reward), config=config)
    before = [p.detach().clone() for p in method.policy.trainable_parameters()]
    metrics = method.train_step(step_context(0, 0))
    again = cls(policy=tiny_policy("flow"), reward=get_reward(config.reward), config=config).train_step(step_context(0, 0))
    assert again == metrics  # the same seed and step give the same update
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    assert "reward_mean" in metrics and "loss" in metrics
    moved = any(not torch.equal(a, b) for a, b in zip(before, method.policy.trainable_parameters()))
    assert moved, "the first update left every weight unchanged"
