r"""D3PO: direct preference optimisation on the denoising steps of sampled pairs (Yang et al., 2024).

Bib key: ``yang2023d3po``.

Online: for each prompt $c$, two trajectories are sampled from the **same initial noise** $x_T$ with the
current model (DDIM with $\eta = 1$); a rater (here the synthetic labeller: the exact evaluator's score
with Bradley-Terry noise) says which final image is better. D3PO assumes that every step of the preferred
trajectory is preferred to the same step of the other, and applies the DPO loss to each step $t$:

$$
L(\theta) = -\,\mathbb E_{c, t}\Big[\log\sigma\Big(\beta \log \bar\rho^w_t - \beta \log \bar\rho^l_t\Big)\Big],
\qquad
\bar\rho^\bullet_t = \mathrm{clip}\Big(\frac{\pi_\theta(x^\bullet_{t-1} \mid x^\bullet_t, c)}{\pi_\text{ref}(x^\bullet_{t-1} \mid x^\bullet_t, c)},\; 1 - \epsilon,\; 1 + \epsilon\Big)
$$

with $\pi_\text{ref}$ the frozen initial model and the step log-densities averaged over pixels (as in the
official code, ``beta = 0.1``, ``eps = 0.1``). The clip bounds the implicit per-step reward
$\beta\log\bar\rho$; outside $[1-\epsilon, 1+\epsilon]$ its gradient is zero. Tied pairs carry no
preference and are skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from reference_impls.models.policy import GenerativePolicy
from reference_impls.rewards.preferences import SyntheticLabeller
from reference_impls.sampling import SamplerConfig, Schedule, apply_step, make_schedule, transition_log_prob
from reference_impls.sampling.rollout import initial_noise
from reference_impls.training.config import TrainConfig
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import collect, minibatch_indices, sampler_from_config


@dataclass
class D3POConfig(TrainConfig):
    """D3PO's settings on top of the shared ones. ``batch_size`` is the number of pairs (prompts) per step."""

    reward: str = "shapes-composition"
    """Score the synthetic labeller (the 'human') judges with; it prefers higher scores, with noise."""
    sampler: str = ""
    """Training sampler: ddim (with eta) or ddpm for diffusion models, sde for flow models ('' = ddim / sde)."""
    eta: float = 1.0
    """DDIM stochasticity of the sampled pairs (D3PO uses 1.0)."""
    noise_level: float = 0.7
    """Flow SDE noise level a (flow models only)."""
    reduction: str = "mean"
    """Reduction of the per-pixel step log-density: mean (the official code's) or sum."""
    beta: float = 0.1
    """DPO temperature on the per-step log-ratios (the official default 0.1)."""
    ratio_clip: float = 0.1
    """epsilon: each ratio pi_theta / pi_ref is clipped to [1 - eps, 1 + eps] (official 0.1)."""
    timestep_fraction: float = 1.0
    """Fraction of the denoising steps each pair trains on (a random subset per pair)."""
    minibatch_size: int = 4
    """Pairs per gradient step (gradients accumulate over the pair's trained steps)."""
    inner_epochs: int = 1
    """Passes over each batch of pairs."""
    labeller_temperature: float = 0.1
    """Bradley-Terry temperature T of the labeller: P(a > b) = sigmoid((s_a - s_b) / T)."""
    tie_margin: float = 0.0
    """Pairs whose exact scores differ by at most this are ties and are skipped."""
    min_step_std: float = 0.05
    """Train only on steps whose noise std is at least this (skips the near-deterministic last DDIM step)."""


PRESETS: dict[str, dict[str, Any]] = {
    # JPEG incompressibility (kB) with a near-noiseless rater: the base draws "a red circle" right every time, so
    # the exact score ties; within a pair the sizes differ by ~0.05 kB, which a temperature of 0.1 turns into
    # coin flips (measured: the reward fell 0.99 -> 0.92 in 6 iterations; with this preset it rises to 1.35).
    "smoke": dict(steps=6, batch_size=6, num_steps=8, minibatch_size=6, timestep_fraction=0.5, learning_rate=3e-4,
                  reward="jpeg-incompressibility", labeller_temperature=0.001, eval_every=0, eval_prompts=8,
                  checkpoint_every=3, prompts="a red circle"),
    "cpu": dict(steps=24, batch_size=12, num_steps=10, minibatch_size=6, timestep_fraction=0.5,
                learning_rate=3e-5, eval_every=12, eval_prompts=64, checkpoint_every=12),
    "gpu": dict(steps=200, batch_size=32, num_steps=20, minibatch_size=4, learning_rate=3e-5, eval_every=20,
                eval_prompts=256, checkpoint_every=20, guidance_scale=5.0),
}


@dataclass
class StepDPOStats:
    """Diagnostics of a step-level DPO loss."""

    implicit_acc: float
    """Fraction of pairs with beta log rho_w > beta log rho_l (after clipping)."""
    log_ratio_w: float
    """Mean unclipped log pi_theta / pi_ref of the preferred steps."""
    log_ratio_l: float
    """Mean unclipped log-ratio of the dispreferred steps."""
    clipfrac: float
    """Fraction of ratios outside [1 - eps, 1 + eps] (no gradient)."""


# --8<-- [start:loss]
def step_dpo_loss(log_prob_w: torch.Tensor, ref_log_prob_w: torch.Tensor, log_prob_l: torch.Tensor,
                  ref_log_prob_l: torch.Tensor, beta: float, ratio_clip: float) -> tuple[torch.Tensor, StepDPOStats]:
    """-mean log sigmoid(beta log clip(rho_w) - beta log clip(rho_l)),  rho = pi_theta / pi_ref of one step.

    Clipping the ratio to [1 - eps, 1 + eps] is clipping the log-ratio to [log(1 - eps), log(1 + eps)].
    """
    log_ratio_w = log_prob_w - ref_log_prob_w
    log_ratio_l = log_prob_l - ref_log_prob_l
    low, high = math.log(1 - ratio_clip), math.log(1 + ratio_clip)
    inside = beta * (log_ratio_w.clamp(low, high) - log_ratio_l.clamp(low, high))
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        both = torch.cat([log_ratio_w, log_ratio_l])
        stats = StepDPOStats(float((inside > 0).float().mean()), float(log_ratio_w.mean()), float(log_ratio_l.mean()),
                             float(((both < low) | (both > high)).float().mean()))
    return loss, stats
# --8<-- [end:loss]


def step_stds(policy: GenerativePolicy, sampler: SamplerConfig, schedule: Schedule) -> torch.Tensor:
    """(T,) noise std of every sampler step (0 for deterministic steps)."""
    x = torch.zeros((1, *policy.latent_shape), device=policy.device)
    stds = []
    for i in range(schedule.num_steps):
        index = torch.tensor([i])
        stds.append(float(apply_step(policy, sampler, schedule, index, x, x, next_state=x).std.max()))
    return torch.tensor(stds)


def eligible_steps(policy: GenerativePolicy, sampler: SamplerConfig, schedule: Schedule, min_std: float) -> list[int]:
    """Stochastic steps whose noise std is at least ``min_std``.

    On our cosine schedule the last DDIM step has std 0.006 (it targets alpha_bar_0 = 0.999959): its
    log-probability gradient, proportional to 1/std, would outweigh every other step's a hundredfold
    while the step changes nothing visible.
    """
    stds = step_stds(policy, sampler, schedule)
    return [i for i in range(schedule.num_steps) if bool(schedule.stochastic[i]) and stds[i] >= min_std]


def pair_steps(steps: list[int], fraction: float, n: int, rng) -> torch.Tensor:  # noqa: ANN001
    """(n, K) step indices per pair: a random subset of ``steps`` of size round(fraction * len)."""
    keep = max(1, int(round(fraction * len(steps))))
    return torch.as_tensor(np.stack([rng.permutation(steps)[:keep] for _ in range(n)]), dtype=torch.long)


class D3PO(Method):
    """D3PO: pairs from a shared initial noise, labelled by the synthetic rater, DPO on every step."""

    name: ClassVar[str] = "d3po"
    bib_key: ClassVar[str] = "yang2023d3po"
    config_class: ClassVar[type] = D3POConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    config: D3POConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference = self.frozen_copy()
        self.labeller = SyntheticLabeller(self.config.reward, self.config.labeller_temperature, self.config.tie_margin,
                                          seed=self.config.seed)
        sampler = sampler_from_config(self)
        self.steps = eligible_steps(self.policy, sampler, make_schedule(self.policy, sampler), self.config.min_step_std)
        if not self.steps:
            raise ValueError(f"no sampler step has a noise std >= --min-step-std {self.config.min_step_std}")

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config, n = self.config, self.config.batch_size
        # 1. Two trajectories per prompt from the same initial noise: rows i and n + i form pair i.
        prompts = self.sample_prompts(n, ctx.rng)
        noise = initial_noise(self.policy, n, ctx.generator)
        batch = collect(self, ctx, prompts + prompts, noise=torch.cat([noise, noise]))
        # 2. The rater compares the two final images of each pair (ties carry no preference).
        verdict = self.labeller.compare_scores(batch.rewards[:n], batch.rewards[n:], key=ctx.step)
        pairs = torch.nonzero(~verdict.tie).flatten()
        first_wins = verdict.prefer_a[pairs]
        winners = torch.where(first_wins, pairs, pairs + n)
        losers = torch.where(first_wins, pairs + n, pairs)
        # 3. DPO on the same steps of the preferred and dispreferred trajectories.
        losses, stats = [], []
        for _ in range(config.inner_epochs if len(pairs) else 0):
            steps = pair_steps(self.steps, config.timestep_fraction, len(pairs), ctx.rng)
            for rows in minibatch_indices(len(pairs), config.minibatch_size, ctx.rng):
                rows = torch.as_tensor(rows)
                m = len(rows)
                sub = batch.trajectory.subset(torch.cat([winners[rows], losers[rows]]))
                for k in range(steps.shape[1]):
                    step = steps[rows, k].repeat(2)  # the same step index for both members of a pair
                    new = transition_log_prob(self.policy, sub, step)
                    with torch.no_grad():
                        ref = transition_log_prob(self.reference, sub, step)
                    loss, stat = step_dpo_loss(new.log_prob[:m], ref.log_prob[:m], new.log_prob[m:],
                                               ref.log_prob[m:], config.beta, config.ratio_clip)
                    (loss / steps.shape[1]).backward()
                    losses.append(float(loss.detach()))
                    stats.append(stat)
                self.apply_gradients()
        # --8<-- [end:train_step]
        mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
        return {
            "reward_mean": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std(unbiased=False)),
            "loss": mean(losses) if losses else math.log(2),
            "implicit_acc": mean([s.implicit_acc for s in stats]) if stats else 0.5,
            "log_ratio_w": mean([s.log_ratio_w for s in stats]),
            "log_ratio_l": mean([s.log_ratio_l for s in stats]),
            "clipfrac": mean([s.clipfrac for s in stats]),
            "pair_fraction": len(pairs) / n,
            "label_agreement": verdict.agreement if len(pairs) else 1.0,
            "samples": 2 * n,
        }
