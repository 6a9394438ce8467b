r"""DDPO-IS: denoising diffusion policy optimisation with importance sampling (Black et al., 2023).

Bib key: ``black2023ddpo``.

The denoising chain is a T-step MDP: state $s_t = (x_t, t, c)$, action $x_{t-1}$, Gaussian policy
$\pi_\theta(x_{t-1} \mid x_t, c)$ (a DDIM step with $\eta = 1$), reward $r(x_0, c)$ only at the end.
DDPO maximises $J(\theta) = \mathbb{E}[r(x_0, c)]$ with PPO's clipped surrogate over every step:

$$
L(\theta) = \mathbb{E}_{i, t}\Big[\max\big(-A_i\,\rho_{i,t},\; -A_i\,\mathrm{clip}(\rho_{i,t}, 1-\epsilon, 1+\epsilon)\big)\Big],
\qquad \rho_{i,t} = \frac{\pi_\theta(x^i_{t-1} \mid x^i_t, c_i)}{\pi_{\theta_\text{old}}(x^i_{t-1} \mid x^i_t, c_i)}
$$

with advantages $A_i = (r_i - \mu_{c_i}) / \sigma_{c_i}$ normalised per prompt over recent samples,
then clipped to $[-A_\max, A_\max]$. Samples are reused for ``inner_epochs`` passes; each sample trains on
its own random permutation of steps, gradients accumulated over a minibatch's steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from reference_impls.algorithms.estimators import PerPromptStatTracker, ppo_clip_loss
from reference_impls.sampling import transition_log_prob
from reference_impls.training.config import TrainConfig
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import (
    collect,
    minibatch_indices,
    reward_metrics,
    step_chunks,
    training_steps,
)


@dataclass
class DDPOConfig(TrainConfig):
    """DDPO's own settings on top of the shared ones."""

    sampler: str = "ddim"
    """Training sampler: ddim (with eta) or ddpm for diffusion models; sde for flow models."""
    eta: float = 1.0
    """DDIM stochasticity of training rollouts (DDPO uses 1.0)."""
    inner_epochs: int = 1
    """Passes over each collected batch (PPO epochs)."""
    minibatch_size: int = 4
    """Samples per gradient step (gradients accumulate over the minibatch's timesteps)."""
    timestep_fraction: float = 1.0
    """Fraction of the denoising steps each sample trains on."""
    steps_per_call: int = 1
    """Trained denoising steps of every minibatch sample recomputed in one denoiser call (0 = all of them
    at once: fastest for small models on CPU; memory grows with it)."""
    clip_range: float = 1e-4
    """PPO clip epsilon on the ratio of per-pixel-averaged densities (the public code's 1e-4)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [-adv_clip_max, adv_clip_max]."""
    per_prompt_stat_tracking: bool = True
    """Normalise rewards per prompt (True) or over the batch (False)."""
    stat_buffer_size: int = 32
    """Rewards remembered per prompt by the stat tracker."""
    stat_min_count: int = 4
    """Below this many rewards for a prompt, batch statistics are used."""
    reduction: str = "mean"
    """Reduction of the per-pixel log-density: mean (DDPO's) or sum."""
    samples_per_prompt: int = 1
    """Images drawn per prompt in a batch (1 = the paper's sampling). DDPO's prompts are single animal names,
    so per-prompt buffers fill; on our 834-prompt grammar they stay nearly empty unless prompts repeat."""
    stochastic_steps: int = 0
    """Sample with eta only in the first N denoising steps and deterministically (eta = 0) after them, and train
    those N (0 = every step stochastic, the paper). Every reward difference between images of one prompt then
    comes from trained steps, as with Flow-GRPO's ``--sde-steps``."""
    min_step_std: float = 0.05
    """Train only on steps whose noise std is at least this. Our cosine schedule's last DDIM step targets
    alpha_bar_0 = 0.99996 and has std 0.006 (Stable Diffusion's: about 0.03); 0 trains every step as DDPO does."""

    def validate(self) -> None:
        super().validate()
        check_samples_per_prompt(self)
        if not 0 <= self.stochastic_steps <= self.num_steps:
            raise ValueError(f"--stochastic-steps must be between 0 and --num-steps {self.num_steps}, "
                             f"got {self.stochastic_steps}")


PRESETS: dict[str, dict[str, Any]] = {
    # The setting tests/test_ddpo.py asserts raises the reward (paired with the base).
    "smoke": dict(steps=4, batch_size=16, minibatch_size=8, num_steps=6, inner_epochs=2, learning_rate=3e-5, eval_every=0,
                  eval_prompts=16, checkpoint_every=4, prompts="a red circle"),
    # LoRA at lr 1e-3 with noise in the first three steps only, for 300 iterations (9,600 images, Flow-GRPO's
    # budget): the first DDPO setting whose held-out gain excludes 0 over three seeds (method page, Results).
    "cpu": dict(steps=300, batch_size=32, samples_per_prompt=8, minibatch_size=16, num_steps=10, inner_epochs=1,
                learning_rate=1e-3, lora_rank=8, stochastic_steps=3, eval_every=100, eval_prompts=128,
                checkpoint_every=10),
    "gpu": dict(steps=100, batch_size=64, num_steps=20, minibatch_size=8, learning_rate=3e-5, eval_every=10,
                eval_prompts=256, checkpoint_every=10, guidance_scale=5.0, inner_epochs=1),
}

VIDEO_PRESETS: dict[str, dict[str, Any]] = {
    # A clip costs about nine images (benchmarks/video_cost.py): smaller batches in the same budget.
    "smoke": dict(steps=4, batch_size=8, minibatch_size=8, num_steps=6, inner_epochs=2, eval_prompts=4,
                  prompts="a red circle moving right"),
    "cpu": dict(steps=12, batch_size=16, samples_per_prompt=8, minibatch_size=8, num_steps=8, eval_every=6,
                eval_prompts=48, checkpoint_every=6),
}


def check_samples_per_prompt(config: DDPOConfig) -> None:
    if config.samples_per_prompt < 1 or config.batch_size % config.samples_per_prompt:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of --samples-per-prompt "
                         f"{config.samples_per_prompt} (>= 1)")


def draw_prompts(method: Method, config: DDPOConfig, rng: np.random.Generator) -> list[str]:
    """``batch_size`` prompts: ``batch_size / samples_per_prompt`` distinct draws, each repeated."""
    check_samples_per_prompt(config)
    distinct = method.sample_prompts(config.batch_size // config.samples_per_prompt, rng)
    return [prompt for prompt in distinct for _ in range(config.samples_per_prompt)]


def advantages_from_rewards(rewards: torch.Tensor, prompts: list[str], config: DDPOConfig,
                            tracker: PerPromptStatTracker) -> torch.Tensor:
    if config.per_prompt_stat_tracking:
        advantages = tracker.update(prompts, rewards)
    else:
        advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    return advantages.clamp(-config.adv_clip_max, config.adv_clip_max)


class DDPO(Method):
    """DDPO-IS (the paper's best variant): PPO-clipped importance sampling over denoising steps."""

    name: ClassVar[str] = "ddpo"
    bib_key: ClassVar[str] = "black2023ddpo"
    supports_distributed: ClassVar[bool] = True
    config_class: ClassVar[type] = DDPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    video_presets: ClassVar[dict[str, dict[str, Any]]] = VIDEO_PRESETS
    config: DDPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.tracker = PerPromptStatTracker(self.config.stat_buffer_size, self.config.stat_min_count)

    # --8<-- [start:loss]
    def minibatch_loss(self, batch, rows, steps, advantages):  # noqa: ANN001 - see train_step
        """Clipped surrogate for one denoising step of each sample in the minibatch."""
        sub = batch.trajectory.subset(rows)
        new = transition_log_prob(self.policy, sub, steps)
        old = sub.log_probs[torch.arange(len(rows)), steps]
        return ppo_clip_loss(new.log_prob, old, advantages[rows], self.config.clip_range)
    # --8<-- [end:loss]

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        # 1. Collect: sample with the current policy, recording per-step log-probs.
        prompts = draw_prompts(self, config, ctx.rng)
        batch = collect(self, ctx, prompts)
        # 2. Score and normalise per prompt.
        advantages = advantages_from_rewards(batch.rewards, prompts, config, self.tracker)
        # 3. Update: inner epochs over shuffled samples and, per sample, shuffled steps.
        stats = []
        for _ in range(config.inner_epochs):
            steps = training_steps(batch.trajectory, config.timestep_fraction, ctx.rng, config.min_step_std)
            for rows in minibatch_indices(len(prompts), config.minibatch_size, ctx.rng, self.distributed):
                rows = torch.as_tensor(rows)
                # Gradients accumulate over the minibatch's steps, several steps per denoiser call.
                for row, column, n in step_chunks(rows, steps.shape[1], config.steps_per_call):
                    loss, stat = self.minibatch_loss(batch, row, steps[row, column], advantages)
                    (loss * n / steps.shape[1]).backward()
                    stats.append(stat)
                self.apply_gradients()
        # --8<-- [end:train_step]
        first = stats[0]
        return {
            **reward_metrics(batch.rewards),
            "approx_kl": sum(s.approx_kl for s in stats) / len(stats),
            "clipfrac": sum(s.clipfrac for s in stats) / len(stats),
            "ratio_mean": sum(s.ratio_mean for s in stats) / len(stats),
            "ratio_first": first.ratio_mean,
            "advantage_abs_mean": float(advantages.abs().mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"stat_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state.get("stat_tracker", {}))
