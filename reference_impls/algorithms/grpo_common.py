r"""What the GRPO family shares: groups of samples per prompt and one clipped update with a KL anchor.

Flow-GRPO, DanceGRPO, MixGRPO and TempFlow-GRPO differ in *how they sample* (which steps are
stochastic, whether a group shares its initial noise) and in *which steps they train on*; the
estimator they then optimise is the same. For $B/G$ prompts with $G$ samples each and, for every
sample $i$, a set $K_i$ of trained denoising steps:

$$
A_i = \mathrm{clip}\Big(\frac{r_i - \mathrm{mean}(r_{g(i)})}{\mathrm{std}(r_{g(i)}) + \varepsilon}, -A_\max, A_\max\Big),
\qquad \rho_{i,k} = \frac{\pi_\theta(x^i_{k+1} \mid x^i_k, c_i)}{\pi_{\theta_\text{old}}(x^i_{k+1} \mid x^i_k, c_i)},
$$

$$
L(\theta) = \frac{1}{B}\sum_i \frac{1}{|K_i|}\sum_{k \in K_i}
\Big[w_{i,k} \max\big(-A_i \rho_{i,k},\, -A_i\, \mathrm{clip}(\rho_{i,k}, 1-\epsilon, 1+\epsilon)\big)
+ \beta\, \frac{\lVert \mu_\theta(x^i_k) - \mu_\text{ref}(x^i_k) \rVert^2}{2 s_k^2}\Big],
$$

where $s_k$ is the std of step $k$ ($\sigma_t\sqrt{\Delta t}$ for the flow SDE, DDIM's $\sigma$ for
diffusion) and $w_{i,k} = 1$ except in TempFlow-GRPO (noise-aware weights). That KL is the exact one
(``kl_form = "exact"``). The official Flow-GRPO code divides the squared mean gap by $2\sigma_t^2$ instead
of $2\sigma_t^2\Delta t$, i.e. it multiplies the exact KL by $\Delta t$ ($1/T$ for $T$ uniform steps), so a
given $\beta$ acts $T$ times more weakly there; ``kl_form = "official"`` (the default) does the same, so the
papers' $\beta$ means what it meant in their runs. Diffusion samplers have no such factor: both forms are
the exact KL there. Because $w > 0$, weighting
the clipped term equals clipping with the advantage $w A$, which is how :func:`grpo_update` applies it.
The KL is the exact KL between the two Gaussian steps (they share the std $s_k$), averaged over pixels
like the log-densities (``reduction``). This module defines no method: each file in this folder that does
imports these pieces.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from reference_impls.algorithms.estimators import ClipStats, gaussian_mean_kl, group_advantages, ppo_clip_loss
from reference_impls.models.policy import GenerativePolicy
from reference_impls.sampling import Trajectory, transition_log_prob
from reference_impls.sampling.rollout import initial_noise
from reference_impls.training.config import TrainConfig
from reference_impls.training.method import Method
from reference_impls.training.online import minibatch_indices, step_chunks


@dataclass
class GRPOConfig(TrainConfig):
    """Settings every GRPO method shares (``batch_size`` counts images: prompts x group_size)."""

    group_size: int = 4
    """G: images sampled per prompt; advantages are normalised within each group."""
    std_scope: str = "group"
    """Divisor of the advantages: group (the papers' formula), batch (Flow-GRPO's shipped configs) or none."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max] (the public codes use 5)."""
    clip_range: float = 1e-4
    """PPO clip epsilon on per-step ratios of pixel-averaged densities (the public codes' 1e-4)."""
    kl_coef: float = 0.0
    """beta: weight of the exact per-step KL to the frozen reference model (0 = no reference kept)."""
    noise_level: float = 0.7
    """a in the flow SDE's sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO's 0.7)."""
    inner_epochs: int = 1
    """Passes over each collected batch."""
    minibatch_size: int = 8
    """Images per optimiser step; gradients accumulate over the minibatch's trained steps."""
    steps_per_call: int = 1
    """Trained denoising steps of every minibatch sample recomputed in one denoiser call (0 = all of them
    at once: fastest for small models on CPU; memory grows with it)."""
    reduction: str = "mean"
    """Reduction of per-pixel log-densities and KL: mean (the public codes') or sum."""
    kl_form: str = "official"
    """KL scaling on flow models: official (the public Flow-GRPO code's |mu - mu_ref|^2 / 2 sigma_t^2, the exact
    KL times dt) or exact (|mu - mu_ref|^2 / 2 sigma_t^2 dt). Both are exact on diffusion samplers."""
    min_step_std: float = 0.0
    """Train only the steps whose sampling noise std is at least this (0 = every stochastic step)."""

    def validate(self) -> None:
        super().validate()
        if self.kl_form not in ("official", "exact"):
            raise ValueError(f"--kl-form must be official or exact, got {self.kl_form!r}")
        if self.group_size < 2:
            raise ValueError(f"--group-size must be >= 2 (a group of one has no baseline), got {self.group_size}")
        if self.batch_size % self.group_size:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --group-size {self.group_size}")
        if self.std_scope not in ("group", "batch", "none"):
            raise ValueError(f"--std-scope must be group, batch or none, got {self.std_scope!r}")


# --8<-- [start:groups]
def grouped_prompts(method: Method, batch_size: int, group_size: int, rng: np.random.Generator) -> list[str]:
    """batch_size / group_size prompts, each repeated group_size times in a row (one group per prompt)."""
    prompts = method.sample_prompts(batch_size // group_size, rng)
    return [prompt for prompt in prompts for _ in range(group_size)]


def shared_initial_noise(policy: GenerativePolicy, batch_size: int, group_size: int,
                         generator: torch.Generator) -> torch.Tensor:
    """x_T drawn once per group and repeated for its members (DanceGRPO's shared noise, TempFlow's
    seed groups): the group's images then differ only through the sampler's own noise."""
    per_group = initial_noise(policy, batch_size // group_size, generator)
    return per_group.repeat_interleave(group_size, dim=0)


def grpo_advantages(rewards: torch.Tensor, config: GRPOConfig) -> torch.Tensor:
    """Group-relative advantages, clipped to [-A_max, A_max]."""
    advantages = group_advantages(rewards, config.group_size, config.std_scope)  # type: ignore[arg-type]
    return advantages.clamp(-config.adv_clip_max, config.adv_clip_max)
# --8<-- [end:groups]


@dataclass
class UpdateStats:
    """Diagnostics collected over one call of :func:`grpo_update`."""

    clip: list[ClipStats] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        n = len(self.clip)
        out = {
            "approx_kl": sum(s.approx_kl for s in self.clip) / n,
            "clipfrac": sum(s.clipfrac for s in self.clip) / n,
            "ratio_mean": sum(s.ratio_mean for s in self.clip) / n,
            "ratio_first": self.clip[0].ratio_mean,
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "time_update_s": self.seconds,
        }
        if self.kl:
            out["kl_to_reference"] = sum(self.kl) / len(self.kl)
        return out


# --8<-- [start:step_loss]
def grpo_step_loss(method: Method, trajectory: Trajectory, steps: torch.Tensor, advantages: torch.Tensor,
                   config: GRPOConfig, reference: GenerativePolicy | None = None,
                   weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ClipStats, float | None]:
    """Loss of one denoising step per sample (``steps``: (B,) indices into the trajectory).

    Recomputes log pi_theta of the stored transitions, clips the ratio against the stored log pi_old and,
    if a reference is given, adds beta * KL(pi_theta || pi_ref) of the two Gaussian steps.
    """
    new = transition_log_prob(method.policy, trajectory, steps)
    old = trajectory.log_probs[torch.arange(trajectory.batch_size), steps]
    scaled = advantages if weights is None else advantages * weights  # w > 0: same as weighting the loss
    loss, stats = ppo_clip_loss(new.log_prob, old, scaled, config.clip_range)
    if reference is None:
        return loss, stats, None
    with torch.no_grad():
        anchor = transition_log_prob(reference, trajectory, steps)
    kl = gaussian_mean_kl(new.mean, anchor.mean, new.std, reduction=config.reduction)  # type: ignore[arg-type]
    kl = (kl * kl_scale(trajectory, steps, config.kl_form).to(kl.device, kl.dtype)).mean()
    return loss + config.kl_coef * kl, stats, float(kl.detach())


def kl_scale(trajectory: Trajectory, steps: torch.Tensor, form: str) -> torch.Tensor:
    """Per-sample factor on the exact step KL: dt = s_k - s_{k+1} for the official flow form, else 1."""
    schedule = trajectory.schedule
    if form == "exact" or schedule.sigma is None:
        return torch.ones(steps.shape[0])
    dt = (schedule.sigma - schedule.sigma_next)[steps]
    return dt.to(torch.float32)
# --8<-- [end:step_loss]


# --8<-- [start:update]
def grpo_update(method: Method, trajectory: Trajectory, advantages: torch.Tensor, steps: torch.Tensor,
                config: GRPOConfig, rng: np.random.Generator, reference: GenerativePolicy | None = None,
                weights: torch.Tensor | None = None) -> UpdateStats:
    """Clipped GRPO update over (sample, step) pairs.

    ``steps`` is (B, K): the K denoising steps sample i trains on (all stochastic steps, a random subset,
    a window or a single branch step); ``advantages`` is (B,), one per sample, or (B, K), one per trained
    step (a hierarchical reward); ``weights`` (B, K) optional per-pair loss weights. For each inner
    epoch the samples are shuffled into minibatches; a minibatch accumulates the gradient of its K steps
    and takes one optimiser step, so the ratio is exactly 1 in the first minibatch of the first epoch.
    """
    stats = UpdateStats()
    started = time.perf_counter()
    for _ in range(config.inner_epochs):
        for rows in minibatch_indices(trajectory.batch_size, config.minibatch_size, rng, method.distributed):
            rows = torch.as_tensor(rows)
            for row, column, n in step_chunks(rows, steps.shape[1], config.steps_per_call):
                weight = None if weights is None else weights[row, column]
                advantage = advantages[row] if advantages.dim() == 1 else advantages[row, column]
                loss, clip, kl = grpo_step_loss(method, trajectory.subset(row), steps[row, column], advantage,
                                                config, reference, weight)
                (loss * n / steps.shape[1]).backward()
                stats.clip.append(clip)
                if kl is not None:
                    stats.kl.append(kl)
            stats.grad_norms.append(method.apply_gradients())
    stats.seconds = time.perf_counter() - started
    return stats
# --8<-- [end:update]


def group_metrics(rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """Reward spread inside groups: the signal GRPO learns from (zero-variance groups give no gradient)."""
    grouped = rewards.float().view(-1, group_size)
    spread = grouped.std(dim=1, unbiased=False)
    return {"group_reward_std": float(spread.mean()), "zero_std_groups": float((spread < 1e-8).float().mean())}

