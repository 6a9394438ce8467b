r"""Flow-GRPO: online GRPO for flow-matching models through an ODE-to-SDE conversion (Liu et al., 2025).

Bib key: ``liu2025flowgrpo``.

A flow model samples with the ODE $dx_t = v_\theta(x_t, t, c)\,dt$ (time runs from noise, $t = 1$, to
data, $t = 0$), a point mass with no density. Flow-GRPO samples instead with the reverse SDE that has
the same marginals; one Euler-Maruyama step of size $\Delta t$ is a Gaussian policy

$$
\pi_\theta(x_{t-\Delta t} \mid x_t, c) = \mathcal N\big(\mu_\theta,\ \sigma_t^2 \Delta t\, I\big),\qquad
\mu_\theta = x_t - \Delta t\Big[v_\theta + \frac{\sigma_t^2}{2t}\big(x_t + (1 - t)\, v_\theta\big)\Big],\qquad
\sigma_t = a\sqrt{\frac{t}{1-t}},
$$

with noise level $a$. For each prompt $c$ it samples a group of $G$ images, normalises their rewards
within the group, and maximises the clipped surrogate over every step with a KL anchor:

$$
\mathcal J(\theta) = \mathbb E\Big[\frac1G\sum_{i=1}^G \frac1T\sum_{t}\Big(
\min\big(\rho_{i,t} A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\epsilon, 1+\epsilon) A_i\big)
- \beta\, D_\mathrm{KL}\big(\pi_\theta(\cdot \mid x^i_t, c) \,\|\, \pi_\text{ref}(\cdot \mid x^i_t, c)\big)\Big)\Big],
$$

$A_i = (r_i - \mathrm{mean}_G\, r) / \mathrm{std}_G\, r$. The KL between the two Gaussian steps is
$\lVert\mu_\theta - \mu_\text{ref}\rVert^2 / (2\sigma_t^2\Delta t)$ exactly; the public code (and our default,
``kl_form = "official"``) divides by $2\sigma_t^2$ only, i.e. weighs the exact KL by $\Delta t$. As in the public
configs the last step is not trained (``train_last_step``). *Denoising reduction*: training samples
use few steps (here ``num_steps``, e.g. 8-10) while evaluation keeps the deterministic ODE with more
(20 in the training loop's evaluation), since the reward only has to rank the group's images.

*Hierarchical reward* (``--hierarchical``, after AR3D-R1's Hi-GRPO; Tang et al., 2025, ``tang2025ar3dr1``).
AR3D-R1 generates a 3D object coarse to fine, global shape first and local detail after, and gives each
level its own reward and its own group-relative advantage. A denoising chain is coarse to fine too: the
early, noisy steps decide the layout and the late ones the details. So with ``--hierarchical`` every sample
gets two advantages, $A^\text{coarse}_i$ from a scene-level reward (``solid-global``: count, cross-view
consistency, relation) and $A^\text{fine}_i$ from a part-level one (``solid-parts``: each object's colour,
shape and size), and step $k$ of the chain uses $A^\text{coarse}_i$ when it lies in the first
``coarse_fraction`` of the stochastic steps and $A^\text{fine}_i$ after: one clipped loss per level, summed over the
levels as in Hi-GRPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.algorithms.grpo_common import (
    GRPOConfig,
    group_metrics,
    grouped_prompts,
    grpo_advantages,
    grpo_update,
    shared_initial_noise,
)
from reference_impls.sampling import SamplerConfig
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import collect, reward_metrics, training_steps


@dataclass
class FlowGRPOConfig(GRPOConfig):
    """Flow-GRPO's settings on top of the shared GRPO ones."""

    model: str = "shapes-flow"
    """Shipped model name (shapes-flow) or a local flow checkpoint/pipeline folder."""
    kl_coef: float = 0.04
    """beta: weight of the exact per-step KL to the frozen reference (the paper's 0.04 for GenEval and OCR)."""
    timestep_fraction: float = 1.0
    """Fraction of the trainable denoising steps each sample trains on."""
    train_last_step: bool = False
    """Also train the final SDE step (the public configs train the first T-1 steps only)."""
    sampler: str = "sde"
    """Training sampler: sde (the paper's Euler-Maruyama step of the reverse SDE) or cps (coefficients-preserving
    sampling, Wang & Yu 2025, ``wang2025cps``: the next state keeps exactly the noise the flow's marginal has, so
    few-step rollouts carry no excess noise; ``noise_level`` is then its eta in sin(eta pi / 2))."""
    sde_steps: int = 0
    """Sample with the SDE in the first N steps only and with the ODE after them, and train those N (0 = the
    SDE at every step, the paper). Every reward difference inside a group then comes from trained steps."""
    shared_noise: bool = False
    """All members of a group start from the same initial noise (DanceGRPO's and TempFlow-GRPO's seed groups;
    the paper draws one per image). With ``sde_steps`` the group then shares its whole ODE start and differs
    only through the trained steps' noise, so no part of the advantage is credit for the initial noise."""

    hierarchical: bool = False
    """AR3D-R1's hierarchical reward: early (coarse) steps are trained on ``coarse_reward``'s advantages,
    late (fine) steps on ``fine_reward``'s; ``reward`` is then only logged."""
    coarse_reward: str = "solid-global"
    """The scene-level reward of the coarse steps (with --hierarchical)."""
    fine_reward: str = "solid-parts"
    """The part-level reward of the fine steps (with --hierarchical)."""
    coarse_fraction: float = 0.5
    """Steps in the first coarse_fraction of the stochastic steps (all num_steps, or the first sde_steps) are
    coarse, the rest fine (with --hierarchical)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.coarse_fraction < 1:
            raise ValueError(f"--coarse-fraction must lie in (0, 1), got {self.coarse_fraction}")
        if self.sampler not in ("sde", "cps"):
            raise ValueError(f"--sampler must be sde or cps for Flow-GRPO, got {self.sampler!r}")
        if not 0 <= self.sde_steps <= self.num_steps:
            raise ValueError(f"--sde-steps must be between 0 and --num-steps {self.num_steps}, got {self.sde_steps}")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=6, batch_size=8, group_size=4, num_steps=8, minibatch_size=8, learning_rate=1e-4,
                  eval_every=0, eval_prompts=16, checkpoint_every=3, prompts="easy"),
    # Chosen from the sweeps on the Flow-GRPO page (every setting measured by `rlvg compare` on the held-out split,
    # three seeds): the gradient of one batch barely predicts the next, so the preset buys images, 9,600 of them
    # in 13.6 min alone on 2 cores, at lr 1e-3 and without the KL term: its reference forward passes add a
    # fifth to every iteration, which would take the run past 15 minutes.
    "cpu": dict(steps=300, batch_size=32, group_size=8, num_steps=8, minibatch_size=16, learning_rate=1e-3,
                kl_coef=0.0, lora_rank=8, sde_steps=3, std_scope="batch", eval_every=60, eval_prompts=128,
                checkpoint_every=20),
    "gpu": dict(steps=200, batch_size=96, group_size=24, num_steps=10, minibatch_size=48, learning_rate=3e-4,
                eval_every=20, eval_prompts=256, checkpoint_every=20, guidance_scale=4.5),
}

VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    # A clip costs about nine images (benchmarks/video_cost.py): fewer, smaller groups in the same budget. The
    # learning rate and KL weight are the image preset's before it went to 5x the images (what the video and
    # multi-view rows were measured with).
    "smoke": dict(steps=4, batch_size=8, group_size=4, num_steps=6, minibatch_size=8, eval_prompts=4),
    "cpu": dict(steps=20, batch_size=16, group_size=8, num_steps=8, minibatch_size=8, learning_rate=3e-4,
                kl_coef=0.04, eval_every=10, eval_prompts=48, checkpoint_every=10),
}


class FlowGRPO(Method):
    """Flow-GRPO: SDE rollouts, group-relative advantages, clipped per-step ratios, KL to the reference."""

    name: ClassVar[str] = "flow-grpo"
    bib_key: ClassVar[str] = "liu2025flowgrpo"
    supports_distributed: ClassVar[bool] = True
    config_class: ClassVar[type] = FlowGRPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    video_presets: ClassVar[dict[str, dict[str, Any]]] = VIDEO_PRESETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("flow",)
    config: FlowGRPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        # The reference is the model we start from; it is only kept when the KL term is on.
        self.reference = self.frozen_copy() if self.config.kl_coef > 0 else None
        self.levels = None
        if self.config.hierarchical:
            from reference_impls.rewards import get_reward

            self.levels = (get_reward(self.config.coarse_reward), get_reward(self.config.fine_reward))
            for level in self.levels:
                if level.world is not None and level.world != self.policy.world:
                    raise ValueError(f"--hierarchical: reward {level.name!r} scores {level.world} prompts and "
                                     f"{self.policy.name} is a {self.policy.world or 'real-checkpoint'} model")

    def sampler(self) -> SamplerConfig:
        """The training sampler: the flow SDE at every step, with few steps (denoising reduction)."""
        config = self.config
        window = (0, config.sde_steps) if config.sde_steps else None
        return SamplerConfig(config.sampler, num_steps=config.num_steps, noise_level=config.noise_level,
                             guidance_scale=config.guidance_scale, reduction=config.reduction,  # type: ignore[arg-type]
                             stochastic_window=window)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        # 1. Collect: G images per prompt with the SDE sampler, each from its own initial noise (or one per group).
        started = time.perf_counter()
        prompts = grouped_prompts(self, config.batch_size, config.group_size, ctx.rng)
        noise = (shared_initial_noise(self.policy, config.batch_size, config.group_size, ctx.generator)
                 if config.shared_noise else None)
        batch = collect(self, ctx, prompts, self.sampler(), noise=noise)
        rollout_s = time.perf_counter() - started
        # 2. Group-relative advantages: each image against the other images of its prompt.
        advantages = grpo_advantages(batch.rewards, config)
        # 3. Update: clipped ratio at every trained step + beta * KL to the reference on the step means.
        skip_last = not config.train_last_step and config.sde_steps in (0, config.num_steps)
        steps = training_steps(batch.trajectory, config.timestep_fraction, ctx.rng, config.min_step_std, skip_last)
        level_metrics = {}
        if self.levels is not None:  # Hi-GRPO: each step gets the advantage of its level's reward
            advantages, level_metrics = self.hierarchical_advantages(batch, steps)
        update = grpo_update(self, batch.trajectory, advantages, steps, config, ctx.rng, self.reference)
        # --8<-- [end:train_step]
        return {
            **level_metrics,
            **reward_metrics(batch.rewards),
            **group_metrics(batch.rewards, config.group_size),
            **update.metrics(),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "trained_steps": float(steps.shape[1]),
            "time_rollout_s": rollout_s,
        }

    # --8<-- [start:hierarchical]
    def hierarchical_advantages(self, batch, steps: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:  # noqa: ANN001
        """(B, K) advantages: the coarse reward's for steps in the first ``coarse_fraction`` of the stochastic
        steps, else the fine reward's, each normalised within its own groups."""
        images, prompts = batch.trajectory.images, batch.trajectory.prompts
        coarse, fine = (level(images, prompts).float() for level in self.levels)
        window = self.config.sde_steps or self.config.num_steps  # the stochastic, trainable part of the chain
        boundary = self.config.coarse_fraction * window
        per_step = torch.where(steps < boundary, grpo_advantages(coarse, self.config)[:, None],
                               grpo_advantages(fine, self.config)[:, None])
        return per_step, {"coarse_reward_mean": float(coarse.mean()), "fine_reward_mean": float(fine.mean()),
                          "coarse_step_share": float((steps < boundary).float().mean())}
    # --8<-- [end:hierarchical]
