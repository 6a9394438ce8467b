r"""DanceGRPO: one GRPO recipe for diffusion and rectified-flow generators (Xue et al., 2025).

Bib key: ``xue2025dancegrpo``.

DanceGRPO casts sampling as an MDP for both families: a DDIM step with $\eta > 0$ for diffusion models
and the marginal-preserving SDE step for rectified flows are Gaussian policies
$\pi_\theta(x_{t-1} \mid x_t, c)$ with closed-form log-densities. Its objective is GRPO's clipped
surrogate with group-normalised advantages and no KL term,

$$
\mathcal J(\theta) = \mathbb E\Big[\frac1G\sum_{i=1}^G \frac{1}{|K_i|}\sum_{t \in K_i}
\min\big(\rho_{i,t} A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\epsilon, 1+\epsilon) A_i\big)\Big],\qquad
A_i = \frac{r_i - \mathrm{mean}_G\, r}{\mathrm{std}_G\, r},
$$

with two practical changes: the $G$ members of a group start from **the same initial noise** $x_T$
(so they differ only by the sampler's noise and the group compares the policy's choices, not starting
points), and each sample trains on a **random subset** $K_i$ of its steps, a fraction
``timestep_fraction`` of them (0.6 in the public scripts, never the last, least noisy step), which cuts
the update cost with little loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from reference_impls.algorithms.grpo_common import (
    GRPOConfig,
    group_metrics,
    grouped_prompts,
    grpo_advantages,
    grpo_update,
    shared_initial_noise,
)
from reference_impls.sampling import Trajectory
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import collect, reward_metrics, sampler_from_config


@dataclass
class DanceGRPOConfig(GRPOConfig):
    """DanceGRPO's settings on top of the shared GRPO ones."""

    model: str = "shapes-flow"
    """Shipped model name (shapes-flow, shapes-diffusion) or a local checkpoint/pipeline folder."""
    sampler: str = ""
    """Training sampler: ddim (with eta) or ddpm for diffusion models, sde for flow models; empty picks
    ddim or sde from the model."""
    eta: float = 1.0
    """DDIM stochasticity of training rollouts on diffusion models."""
    shared_noise: bool = True
    """All members of a group start from the same initial noise (the paper's recommendation)."""
    timestep_fraction: float = 0.6
    """Fraction of each sample's denoising steps, drawn at random, that it trains on."""
    ignore_last: bool = True
    """Never train on the last denoising step, the least noisy one (the public scripts' --ignore_last)."""


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=6, batch_size=16, group_size=4, num_steps=8, minibatch_size=16, learning_rate=1e-4,
                  eval_every=0, eval_prompts=16, checkpoint_every=3, prompts="easy"),
    "cpu": dict(steps=20, batch_size=48, group_size=8, num_steps=10, minibatch_size=24, learning_rate=5e-5,
                eval_every=10, eval_prompts=128, checkpoint_every=10),
    "gpu": dict(steps=300, batch_size=48, group_size=12, num_steps=16, minibatch_size=12, learning_rate=1e-5,
                eval_every=20, eval_prompts=256, checkpoint_every=20),
}

VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    # A clip costs about nine images (benchmarks/video_cost.py): fewer, smaller groups in the same budget.
    "smoke": dict(steps=4, batch_size=8, group_size=4, num_steps=6, minibatch_size=8, eval_prompts=4,
                  prompts="easy"),
    "cpu": dict(steps=16, batch_size=16, group_size=8, num_steps=8, minibatch_size=8, eval_every=8,
                eval_prompts=48, checkpoint_every=8),
}


# --8<-- [start:subsample]
def subsample_steps(trajectory: Trajectory, fraction: float, ignore_last: bool, rng: np.random.Generator
                    ) -> torch.Tensor:
    """(B, K) steps to train on: per sample, a random K = round(fraction * n) of its n candidate steps
    (the stochastic steps, without the last one if ``ignore_last``)."""
    candidates = torch.nonzero(trajectory.schedule.stochastic).flatten().numpy()
    if ignore_last and len(candidates) > 1:
        candidates = candidates[candidates != trajectory.num_steps - 1]
    keep = max(1, int(round(fraction * len(candidates))))
    rows = [rng.permutation(candidates)[:keep] for _ in range(trajectory.batch_size)]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)
# --8<-- [end:subsample]


class DanceGRPO(Method):
    """DanceGRPO: GRPO with shared initial noise per group and timestep subsampling."""

    name: ClassVar[str] = "dance-grpo"
    bib_key: ClassVar[str] = "xue2025dancegrpo"
    supports_distributed: ClassVar[bool] = True
    config_class: ClassVar[type] = DanceGRPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    video_presets: ClassVar[dict[str, dict[str, Any]]] = VIDEO_PRESETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("diffusion", "flow")
    config: DanceGRPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        # DanceGRPO trains without a KL term (kl_coef = 0); a reference is kept only if one is asked for.
        self.reference = self.frozen_copy() if self.config.kl_coef > 0 else None

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        # 1. Collect: one initial noise per group, then a stochastic sampler (DDIM eta > 0 or the flow SDE).
        started = time.perf_counter()
        prompts = grouped_prompts(self, config.batch_size, config.group_size, ctx.rng)
        noise = (shared_initial_noise(self.policy, config.batch_size, config.group_size, ctx.generator)
                 if config.shared_noise else None)
        batch = collect(self, ctx, prompts, sampler_from_config(self), noise=noise)
        rollout_s = time.perf_counter() - started
        # 2. Group-relative advantages.
        advantages = grpo_advantages(batch.rewards, config)
        # 3. Update on a random subset of each sample's steps (timestep subsampling).
        steps = subsample_steps(batch.trajectory, config.timestep_fraction, config.ignore_last, ctx.rng)
        update = grpo_update(self, batch.trajectory, advantages, steps, config, ctx.rng, self.reference)
        # --8<-- [end:train_step]
        return {
            **reward_metrics(batch.rewards),
            **group_metrics(batch.rewards, config.group_size),
            **update.metrics(),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "trained_steps": float(steps.shape[1]),
            "time_rollout_s": rollout_s,
        }
