r"""Carve3D: RL fine-tuning of a multi-view generator for reconstruction consistency (Xie et al., 2024).

Bib key: ``xie2023carve3d``.

Carve3D fine-tunes a text-to-multi-view diffusion model with DDPO, rewarded by Multi-view Reconstruction
Consistency (MRC): fit a 3D representation to the generated views, re-render it from the same cameras,
and compare. It changes DDPO in two ways, both to keep the model close to what supervised fine-tuning
taught it while the reward pulls it towards consistency:

1. **The KL to the base model is folded into the reward.** Along each sampled chain $x_T \to x_0$ the
   per-step log-ratio to the frozen base model $\pi_\text{ref}$ is summed, and the reward is lowered by it:

   $$ \tilde r_i = r(x^i_0, c_i) - \beta\,\widehat{\mathrm{KL}}_i, \qquad
      \widehat{\mathrm{KL}}_i = \sum_{t} \big[\log \pi_\theta(x^i_{t-1} \mid x^i_t, c_i)
      - \log \pi_\text{ref}(x^i_{t-1} \mid x^i_t, c_i)\big], $$

   a one-sample estimate of $\mathrm{KL}(\pi_\theta \,\|\, \pi_\text{ref})$ over the chain (the sample was
   drawn from $\pi_\theta$). Advantages are $\tilde r$ normalised per prompt, as in DDPO.
2. **Purely on-policy updates.** Every collected batch gives one gradient step on all its samples, so
   the importance ratio is exactly 1 and the clipped surrogate is REINFORCE with a baseline:

   $$ L(\theta) = -\frac{1}{N K}\sum_{i}\sum_{t \in \mathcal T_i} A_i\, \log \pi_\theta(x^i_{t-1} \mid x^i_t, c_i). $$

Here the multi-view model is ``solid-mv-flow`` (4 views of a SolidWorld scene generated jointly, with
attention across views), and the MRC analogue is the ``solid-consistency`` reward: the SolidWorld
evaluator fits one primitive per colour to the views, re-renders it, and scores the silhouettes' IoU
(``reference_impls/rewards/registry.py``). ``solid-composition`` adds what the prompt asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.algorithms.ddpo import advantages_from_rewards, check_samples_per_prompt, draw_prompts
from reference_impls.algorithms.estimators import PerPromptStatTracker
from reference_impls.sampling import transition_log_prob
from reference_impls.training.config import TrainConfig
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import collect, reward_metrics, training_steps


@dataclass
class Carve3DConfig(TrainConfig):
    """Carve3D's settings: DDPO's sampling and advantage settings, purely on-policy, plus the KL weight."""

    model: str = "solid-mv-flow"
    """The multi-view generator (SolidWorld's 4 views), or a local checkpoint folder of one."""
    reward: str = "solid-consistency"
    """solid-consistency (the MRC analogue), solid-composition (what the prompt asked, consistency included)."""
    sampler: str = "sde"
    """Training sampler: sde for the flow model (its Euler-Maruyama steps are the Gaussian policy), ddim or
    ddpm for a diffusion model."""
    eta: float = 1.0
    """DDIM stochasticity of training rollouts of a diffusion model."""
    noise_level: float = 0.3
    """SDE sampler of a flow model: the noise scale a of sigma_t = a sqrt(t / (1 - t)). Flow-GRPO's 0.7 leaves
    noise of std 0.09 in the last of 8 steps, which the evaluator reads as specks and holes: on 16 held-out
    prompts the rollouts' mean exact score was 0.34 at 0.7, 0.57 at 0.3 and 0.58 with the ODE."""
    kl_coef: float = 0.1
    """beta: weight of the chain's summed log-ratio to the base model, subtracted from the reward."""
    samples_per_prompt: int = 4
    """Samples drawn per prompt in a batch, so that per-prompt reward statistics exist."""
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per prompt (True, DDPO's and Carve3D's) or over the batch (False)."""
    stat_buffer_size: int = 32
    """Rewards remembered per prompt by the stat tracker."""
    stat_min_count: int = 4
    """Below this many rewards for a prompt, batch statistics are used."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    timestep_fraction: float = 1.0
    """Fraction of the denoising steps each sample trains on."""
    min_step_std: float = 0.05
    """Train only on steps whose noise std is at least this (see DDPO's page: a nearly deterministic
    step explores nothing, and its log-density gradient scales like 1/std)."""
    reduction: str = "mean"
    """Reduction of the per-pixel log-density: mean (DDPO's) or sum."""

    def validate(self) -> None:
        super().validate()
        check_samples_per_prompt(self)


PRESETS: dict[str, dict[str, Any]] = {
    # The multi-view model is sensitive: one on-policy update at 1e-4 took the smoke prompt's consistency
    # from 0.71 to 0.09, at 3e-5 to 0.57; at 1e-5 it rose (0.71 -> 0.76). Each chain trains half its steps:
    # its UNet costs 0.5 s a call on one core, and the rise is the same (0.74 -> 0.75 over the 4 batches).
    "smoke": dict(steps=4, batch_size=8, samples_per_prompt=4, num_steps=6, learning_rate=1e-5, eval_every=0,
                  eval_prompts=8, checkpoint_every=2, prompts="a red cube", timestep_fraction=0.5),
    # On-policy means one update per batch: more, smaller batches give more updates for the same samples.
    "cpu": dict(steps=24, batch_size=16, samples_per_prompt=4, num_steps=8, learning_rate=1e-5, eval_every=12,
                eval_prompts=48, checkpoint_every=12),
    "gpu": dict(steps=100, batch_size=64, samples_per_prompt=8, num_steps=20, learning_rate=3e-5, eval_every=10,
                eval_prompts=256, checkpoint_every=10),
}


# --8<-- [start:kl_reward]
def chain_log_ratio(policy_log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """(B,) summed log pi_theta - log pi_ref over the trained steps of each chain: the one-sample KL estimate."""
    return (policy_log_probs - reference_log_probs).sum(dim=1)


def kl_regularised_reward(rewards: torch.Tensor, log_ratio: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r - beta * KL_hat: Carve3D's reward, which pays for every step away from the base model."""
    return rewards - kl_coef * log_ratio
# --8<-- [end:kl_reward]


# --8<-- [start:loss]
def on_policy_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the normalised advantage as baseline-corrected return: -mean_i,t A_i log pi(x_{t-1}|x_t).

    ``log_probs`` is (B, K), the trained steps of each sample; the ratio to the sampling policy is 1.
    """
    return -(advantages[:, None] * log_probs).mean()
# --8<-- [end:loss]


class Carve3D(Method):
    """Carve3D: on-policy DDPO with a KL-regularised multi-view consistency reward."""

    name: ClassVar[str] = "carve3d"
    bib_key: ClassVar[str] = "xie2023carve3d"
    config_class: ClassVar[type] = Carve3DConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    config: Carve3DConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy.world != "solid":
            raise ValueError(f"carve3d fine-tunes a multi-view generator of SolidWorld (solid-mv-flow); "
                             f"{self.policy.name} is a {self.policy.world or 'real-checkpoint'} model")
        self.tracker = PerPromptStatTracker(self.config.stat_buffer_size, self.config.stat_min_count)
        self.reference = self.frozen_copy()

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        # 1. Collect on-policy samples (4 views each) and score them.
        prompts = draw_prompts(self, config, ctx.rng)
        batch = collect(self, ctx, prompts)
        trajectory = batch.trajectory
        steps = training_steps(trajectory, config.timestep_fraction, ctx.rng, config.min_step_std)
        rows = torch.arange(len(prompts))
        # 2. The chain's log-ratio to the base model. The sampler recorded log pi_theta of every step, and
        #    on-policy these are the current weights' own; only the base model's needs a pass.
        with torch.no_grad():
            reference = torch.stack([transition_log_prob(self.reference, trajectory, steps[:, k]).log_prob
                                     for k in range(steps.shape[1])], dim=1)
        log_ratio = chain_log_ratio(trajectory.log_probs[rows[:, None], steps], reference)
        # 3. Fold the KL into the reward and normalise per prompt.
        shaped = kl_regularised_reward(batch.rewards, log_ratio, config.kl_coef)
        advantages = advantages_from_rewards(shaped, prompts, config, self.tracker)
        # 4. One on-policy gradient step over every sample, accumulated step by step to bound memory.
        ratios = []
        for k in range(steps.shape[1]):
            log_prob = transition_log_prob(self.policy, trajectory, steps[:, k]).log_prob
            (on_policy_loss(log_prob[:, None], advantages) / steps.shape[1]).backward()
            ratios.append(float(torch.exp(log_prob.detach() - trajectory.log_probs[rows, steps[:, k]]).mean()))
        self.apply_gradients()
        # --8<-- [end:train_step]
        return {
            **reward_metrics(batch.rewards),
            "shaped_reward_mean": float(shaped.mean()),
            "kl_estimate": float(log_ratio.mean()),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "ratio_mean": sum(ratios) / len(ratios),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"stat_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state.get("stat_tracker", {}))
