r"""TempFlow-GRPO: step-level credit by trajectory branching and noise-aware weighting (He et al., 2025).

Bib key: ``he2025tempflowgrpo``.

Flow-GRPO gives every step of an image the same advantage, although a step's influence on the final
image varies along the trajectory. TempFlow-GRPO makes the credit step-specific. For a prompt $c$ and
a **branching step** $k$, the $G$ members of a group share their initial noise (a *seed group*) and
follow the deterministic ODE to the same $x_k$; at step $k$ each takes its own stochastic SDE step
$x^i_{k+1} \sim \pi_\theta(\cdot \mid x_k, c)$; then the ODE again to $x^i_0$. Every difference between the
group's rewards is caused by the action at step $k$, so the group-normalised reward is a *process
reward* for that one step,

$$
A^{(k)}_i = \frac{r(x^i_0, c) - \mathrm{mean}_G\, r}{\mathrm{std}_G\, r},
\qquad
\mathcal J(\theta) = \mathbb E_{c,\,k}\Big[\frac1G\sum_{i=1}^G w_k
\min\big(\rho_{i,k} A^{(k)}_i,\ \mathrm{clip}(\rho_{i,k}, 1-\epsilon, 1+\epsilon) A^{(k)}_i\big)\Big].
$$

**Noise-aware weighting.** The step's exploration potential is its noise standard deviation
$\sigma_k\sqrt{\Delta t_k}$, largest at the early, layout-deciding steps. The policy-gradient term of
step $k$ is weighted by it, normalised to mean one over the steps that can branch,

$$
w_k = \frac{\sigma_k \sqrt{\Delta t_k}}{\frac{1}{|\mathcal K|}\sum_{j \in \mathcal K} \sigma_j \sqrt{\Delta t_j}},
$$

which counteracts the $\nabla_\theta \log\pi \propto 1/(\sigma_k\sqrt{\Delta t_k})$ scaling that otherwise
makes the late, nearly deterministic steps dominate the update. The public code branches every seed at
every step but the last and sums the weighted terms over steps; here each group draws one branching step
per iteration (a sample of that sum, one trajectory per image), so one update still mixes several steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
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
from reference_impls.models.policy import GenerativePolicy
from reference_impls.sampling import (
    SamplerConfig,
    Schedule,
    Trajectory,
    apply_step,
    encode_prompts,
    guided_prediction,
    make_schedule,
)
from reference_impls.sampling.steps import flow_sde_std
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import reward_metrics


@dataclass
class TempFlowGRPOConfig(GRPOConfig):
    """TempFlow-GRPO's settings on top of the shared GRPO ones."""

    model: str = "shapes-flow"
    """Shipped model name (shapes-flow) or a local flow checkpoint/pipeline folder."""
    kl_coef: float = 0.04
    """beta: weight of the exact KL to the frozen reference at the branch step (Flow-GRPO's 0.04)."""
    branch_start: int = 0
    """First step a group may branch at (0 = the noisiest step)."""
    branch_end: int = 9
    """Groups branch at a step drawn uniformly from [branch_start, branch_end); the last step, whose noise is
    tiny, is never a branch point (as in the public code)."""
    noise_aware: bool = True
    """Weight each branch step's loss by its normalised noise std (False: all steps weigh 1)."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.branch_start < min(self.branch_end, self.num_steps - 1):
            raise ValueError(f"[--branch-start, --branch-end) = [{self.branch_start}, {self.branch_end}) holds no "
                             f"step of a {self.num_steps}-step sampler")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=6, batch_size=16, group_size=4, num_steps=8, branch_end=7, minibatch_size=16,
                  learning_rate=1e-4, eval_every=0, eval_prompts=16, checkpoint_every=3, prompts="easy"),
    "cpu": dict(steps=20, batch_size=64, group_size=8, num_steps=10, branch_end=9, minibatch_size=32,
                learning_rate=5e-5, eval_every=10, eval_prompts=128, checkpoint_every=10),
    "gpu": dict(steps=200, batch_size=96, group_size=24, num_steps=10, branch_end=9, minibatch_size=48,
                learning_rate=3e-4, eval_every=20, eval_prompts=256, checkpoint_every=20, guidance_scale=4.5),
}


# --8<-- [start:branching]
@torch.no_grad()
def branched_rollout(policy: GenerativePolicy, prompts: list[str], sampler: SamplerConfig, branch: torch.Tensor,
                     noise: torch.Tensor, generator: torch.Generator | None = None) -> Trajectory:
    """ODE at every step except ``branch[i]``, where sample i takes a stochastic SDE step.

    ``branch``: (B,) step index per sample. Only the branch step has a log-probability; the returned
    trajectory's schedule marks the branch steps stochastic so ``transition_log_prob`` can recompute it.
    """
    ode = make_schedule(policy, replace(sampler, stochastic_window=(0, 0)))  # no stochastic step
    sde = replace(ode, stochastic=torch.ones_like(ode.stochastic))           # every step stochastic
    cond, uncond = encode_prompts(policy, prompts, sampler)
    x = noise.to(policy.device)
    states, log_probs = [x], torch.zeros(len(prompts), ode.num_steps, device=x.device)
    for i in range(ode.num_steps):
        index = torch.full((len(prompts),), i, dtype=torch.long)
        velocity = guided_prediction(policy, x, ode.model_timesteps[i].to(x.device), cond, uncond,
                                     sampler.guidance_scale)
        next_x = apply_step(policy, sampler, ode, index, x, velocity).next_state.clone()
        rows = torch.nonzero(branch == i).flatten()
        if len(rows):  # the branching samples replace their ODE step by an SDE step
            step = apply_step(policy, sampler, sde, index[rows], x[rows], velocity[rows], generator=generator)
            next_x[rows] = step.next_state
            log_probs[rows, i] = step.log_prob
        x = next_x
        states.append(x)
    stochastic = torch.zeros_like(ode.stochastic)
    stochastic[branch.unique()] = True
    return Trajectory(list(prompts), torch.stack(states, dim=1), log_probs, replace(ode, stochastic=stochastic),
                      sampler, cond, uncond, policy.decode(x))
# --8<-- [end:branching]


# --8<-- [start:weights]
def noise_aware_weights(schedule: Schedule, noise_level: float, candidates: range) -> torch.Tensor:
    """(T,) weight of each step: its SDE noise std sigma_k sqrt(dt_k) over the mean of the candidates'."""
    std = flow_sde_std(schedule.sigma, schedule.sigma_next, noise_level, schedule.sigma_cap)
    return std / std[list(candidates)].mean()
# --8<-- [end:weights]


def draw_branch_steps(n_groups: int, group_size: int, candidates: range, rng: np.random.Generator) -> torch.Tensor:
    """One branch step per group, uniform over the candidates, repeated for the group's members."""
    per_group = rng.integers(candidates.start, candidates.stop, size=n_groups)
    return torch.as_tensor(per_group, dtype=torch.long).repeat_interleave(group_size)


class TempFlowGRPO(Method):
    """TempFlow-GRPO: one SDE branch step per group, credited with the group's rewards, noise-weighted."""

    name: ClassVar[str] = "tempflow-grpo"
    bib_key: ClassVar[str] = "he2025tempflowgrpo"
    config_class: ClassVar[type] = TempFlowGRPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("flow",)
    config: TempFlowGRPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference = self.frozen_copy() if self.config.kl_coef > 0 else None

    def sampler(self) -> SamplerConfig:
        config = self.config
        return SamplerConfig("sde", num_steps=config.num_steps, noise_level=config.noise_level,
                             guidance_scale=config.guidance_scale, reduction=config.reduction)  # type: ignore[arg-type]

    def candidates(self) -> range:
        return range(self.config.branch_start, min(self.config.branch_end, self.config.num_steps - 1))

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        n_groups = config.batch_size // config.group_size
        # 1. Collect: per group a shared seed and a branch step k; ODE to x_k, one SDE step, ODE to x_0.
        started = time.perf_counter()
        prompts = grouped_prompts(self, config.batch_size, config.group_size, ctx.rng)
        branch = draw_branch_steps(n_groups, config.group_size, self.candidates(), ctx.rng)
        noise = shared_initial_noise(self.policy, config.batch_size, config.group_size, ctx.generator)
        self.policy.denoiser.eval()
        trajectory = branched_rollout(self.policy, prompts, self.sampler(), branch, noise, ctx.generator)
        self.policy.denoiser.train()
        rewards = self.reward(trajectory.images, prompts).float()
        rollout_s = time.perf_counter() - started
        # 2. Process reward: the group's normalised rewards credit its branch step alone.
        advantages = grpo_advantages(rewards, config)
        # 3. Update the branch step of each sample, weighted by that step's noise level.
        weights = None
        if config.noise_aware:
            weights = noise_aware_weights(trajectory.schedule, config.noise_level, self.candidates())[branch]
            weights = weights.unsqueeze(1)
        update = grpo_update(self, trajectory, advantages, branch.unsqueeze(1), config, ctx.rng, self.reference,
                             weights)
        # --8<-- [end:train_step]
        return {
            **reward_metrics(rewards),
            **group_metrics(rewards, config.group_size),
            **update.metrics(),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "branch_step_mean": float(branch.float().mean()),
            "weight_mean": 1.0 if weights is None else float(weights.mean()),
            "trained_steps": 1.0,  # the branch step: the only stochastic step of a trajectory
            "time_rollout_s": rollout_s,
        }
