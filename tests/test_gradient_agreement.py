"""The gradient-agreement benchmark: its statistics on gradients of known signal share, and its gradient capture
(the method's own train_step, no optimiser step)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_policy

from benchmarks.gradient_agreement import batch_gradient, describe, parse_row, row_label, summarise
from reference_impls.algorithms.diffusion_nft import DiffusionNFT, DiffusionNFTConfig
from reference_impls.rewards import get_reward


def _gradients(signal_share: float, batches: int = 40, size: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Rows mu + n_k with |mu|^2 = signal_share and E|n_k|^2 = 1 - signal_share."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(size, generator=generator, dtype=torch.float64)
    mu = direction / direction.norm() * signal_share ** 0.5
    noise = torch.randn(batches, size, generator=generator, dtype=torch.float64) * ((1 - signal_share) / size) ** 0.5
    return mu + noise


def test_pairwise_cosine_recovers_the_signal_share_and_the_data_it_implies():
    half = summarise(_gradients(0.5), seed=0)
    assert half["pairwise_cosine"] == pytest.approx(0.5, abs=0.02)
    assert half["ci_low"] < 0.5 < half["ci_high"]
    # s = 0.5 / 0.5 = 1: one batch (32 images) more gives two estimates that agree with cosine 0.5
    assert half["images_for_cosine_half"] == pytest.approx(32, rel=0.1)
    assert half["images_for_cosine_half_low"] < half["images_for_cosine_half"] < half["images_for_cosine_half_high"]
    fifth = summarise(_gradients(0.2), seed=0)
    assert fifth["pairwise_cosine"] == pytest.approx(0.2, abs=0.02)
    assert fifth["images_for_cosine_half"] == pytest.approx(32 * 4, rel=0.15)  # s = 0.2 / 0.8


def test_pure_noise_has_no_signal_and_an_interval_across_zero():
    noise = summarise(_gradients(0.0), seed=0)
    assert abs(noise["pairwise_cosine"]) < 0.01
    assert noise["ci_low"] < 0 < noise["ci_high"]
    assert noise["images_for_cosine_half_high"] is None and "no signal detected" in describe(noise)


def test_rows_are_parsed_and_labelled_and_unknown_ones_refused_with_the_valid_names():
    assert parse_row("flow-grpo:random") == ("flow-grpo", True)
    assert row_label("flow-grpo", {"noise_level": 1.0, "group_size": 16}) == "flow-grpo [group_size=16] [noise_level=1.0]"
    assert row_label("flow-grpo", {"sde_steps": 2}, seed=1) == "flow-grpo [sde_steps=2] [seed=1]"
    assert row_label("flow-grpo", {}, seed=0) == "flow-grpo"
    with pytest.raises(SystemExit, match="valid rows: flow-grpo, flow-grpo-shared"):
        parse_row("flow-grpo:shuffled")


def test_batch_gradient_is_the_train_steps_gradient_and_moves_no_weight():
    torch.set_num_threads(1)
    config = DiffusionNFTConfig(reward="jpeg-compressibility", batch_size=4, group_size=2, num_steps=3,
                                minibatch_size=2, prompts="easy", lora_rank=2)
    config.validate()
    method = DiffusionNFT(policy=tiny_policy("flow"), reward=get_reward(config.reward), config=config)
    before = [p.detach().clone() for p in method.policy.trainable_parameters()]
    first, again = batch_gradient(method, 5), batch_gradient(method, 5)
    other = batch_gradient(method, 6)
    assert all(torch.equal(b, p) for b, p in zip(before, method.policy.trainable_parameters()))
    assert first.norm() > 0 and torch.equal(first, again)  # same batch at the same weights: the same gradient
    assert not torch.allclose(first, other)


def test_weight_displacement_measures_distance_and_shared_direction():
    from benchmarks.weight_displacement import displacement_summary

    base = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # |theta_0| = 5
    # Run 1 moves a by (1, 0); run 2 moves a by (1, 1): cosine 1 / sqrt(2). Run 3 moves only b, orthogonally.
    runs = [{"a": torch.tensor([4.0, 0.0]), "b": torch.tensor([4.0])},
            {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0])},
            {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([6.0])}]
    summary = displacement_summary(base, runs)
    assert summary["norms"] == pytest.approx([1.0, 2 ** 0.5, 2.0])
    assert summary["relative_norms"] == pytest.approx([0.2, 2 ** 0.5 / 5, 0.4])
    assert summary["pairwise_cosines"] == pytest.approx([2 ** -0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="lacks 1 of the base's weights"):
        displacement_summary(base, [{"a": torch.zeros(2)}])
