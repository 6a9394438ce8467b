r"""DreamReward: score distillation with a learned 3D reward's gradient (Ye et al., 2024).

Bib key: ``ye2024dreamreward``.

DreamReward trains a reward model on multi-view renders (Reward3D) and then optimises a 3D representation
$\psi$ for one prompt $c$ with *DreamFL*: the score-distillation gradient of a frozen multi-view generator,
plus the gradient of the reward of the render $x = g(\psi)$. The paper derives the reward term as a
stand-in for the gap between the generator's score and the score of an ideal, reward-aligned generator;
what is optimised is

$$ \nabla_\psi \mathcal L = \underbrace{\big(x - \hat x_0\big)\frac{\partial x}{\partial\psi}}_{\text{SDS}}
   \;+\; \lambda\,\nabla_\psi\, \mathrm{ReLU}\big(m - \hat r_\phi(\tilde x, c)\big), $$

a hinge that pushes the learned reward $\hat r_\phi$ up to the margin $m$. As in the authors' code:

* the reward term joins only after a warm-up of plain SDS (from 60% of the steps), when the field already
  has a shape for the reward to judge;
* it scores the generator's one-step denoised estimate when the noise level is small, passing the
  gradient straight through to the render: $\tilde x = x - \mathrm{sg}(x - \hat x_0)$ (the value is
  $\hat x_0$, the gradient is the render's); otherwise the render itself, $\tilde x = x$;
* $\lambda$ matches the two losses' orders of magnitude, $\lambda = \kappa\cdot 10^{d(\mathcal L_\text{SDS})
  - d(\mathcal L_\text{reward})}$ with $d$ the number of digits of a loss's integer part (1 for any loss
  below 10) and $\kappa = 0.6$;
* the last 2% of the steps optimise the reward alone.

Here the generator is ``solid-mv-flow``, the field is the voxel grid of
:mod:`reference_impls.models.voxel_field`, and the reward is ``solid-learned``
(:mod:`reference_impls.rewards.learned_solid`): a multi-view CNN that, like Reward3D, reads the four views
in camera order with the prompt, trained to predict the exact SolidWorld evaluator. Our reward lies in
$[0, 1]$, so the margin is $m = 1$ and the hinge is always active: the term is $1 - \hat r_\phi$. With
``--reward-weight 0`` the method is plain SDS, the baseline it is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.algorithms.score_distillation import (
    FieldConfig,
    FieldMethod,
    gradient_as_loss,
    guided_denoise,
    noise_level,
    sds_direction,
)
from reference_impls.training.method import StepContext


@dataclass
class DreamRewardConfig(FieldConfig):
    """DreamReward's settings: the shared per-prompt ones plus the reward term's schedule and weight."""

    reward: str = "solid-learned"
    """The differentiable multi-view reward whose gradient joins SDS's (the Reward3D analogue)."""
    reward_weight: float = 0.6
    """kappa: the reward loss's weight after matching its order of magnitude to SDS's (0 = plain SDS)."""
    reward_margin: float = 1.0
    """m in ReLU(m - r): the reward level the hinge pushes towards (our rewards lie in [0, 1])."""
    reward_start: float = 0.6
    """Fraction of the steps run as plain SDS before the reward term joins (6000 of 10000 in the paper's code)."""
    reward_only_from: float = 0.98
    """Fraction of the steps after which only the reward is optimised (9800 of 10000 in the paper's code)."""
    denoised_below: float = 0.1
    """At noise levels s up to this, the reward scores the one-step estimate x0_hat (straight-through to the
    render); above it, the render (t <= 100 of 1000 in the paper's code)."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.reward_start <= self.reward_only_from <= 1:
            raise ValueError(f"need 0 <= --reward-start <= --reward-only-from <= 1, got {self.reward_start}, "
                             f"{self.reward_only_from}")
        if self.reward_weight < 0:
            raise ValueError(f"--reward-weight must be >= 0 (0 = plain SDS), got {self.reward_weight}")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=60, eval_every=30, checkpoint_every=30),
    "cpu": dict(steps=150, eval_every=50, checkpoint_every=50),
    "gpu": dict(steps=1000, eval_every=100, checkpoint_every=100, resolution=64, samples_per_ray=160),
}


# --8<-- [start:loss]
def integer_digits(value: float) -> int:
    """Digits of the integer part of a non-negative number: 1 below 10 (0.3 and 7 alike), 3 for 512.4."""
    return 1 if value < 10 else math.floor(math.log10(value)) + 1


def magnitude_match(sds_loss: float, reward_loss: float) -> float:
    """10^(digits(L_sds) - digits(L_reward)), digits counted on the integer parts as the authors' code does.

    A reward loss below 1 counts as one digit, so the weight does not grow as the hinge closes.
    """
    return 10.0 ** (integer_digits(sds_loss) - integer_digits(reward_loss))


def scored_views(x: torch.Tensor, x0_hat: torch.Tensor, use_estimate: bool) -> torch.Tensor:
    """What the reward reads, in [0, 1]: x0_hat's value with the render's gradient (x - sg(x - x0_hat)), or x."""
    views = x - (x - x0_hat).detach() if use_estimate else x
    return (views.clamp(-1, 1) + 1) / 2


def hinge_reward_loss(rewards: torch.Tensor, margin: float) -> torch.Tensor:
    """ReLU(m - r), averaged over the batch: pushes the reward up until it reaches the margin."""
    return torch.relu(margin - rewards).mean()
# --8<-- [end:loss]


class DreamReward(FieldMethod):
    """DreamReward (DreamFL): SDS from solid-mv-flow plus the learned multi-view reward's gradient."""

    name: ClassVar[str] = "dreamreward"
    bib_key: ClassVar[str] = "ye2024dreamreward"
    config_class: ClassVar[type] = DreamRewardConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    needs_differentiable_reward: ClassVar[bool] = True
    sds_settings: ClassVar[dict[str, Any]] = {"reward_weight": 0.0}
    config: DreamRewardConfig

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        progress = ctx.step / max(1, config.steps)
        use_reward = config.reward_weight > 0 and progress >= config.reward_start
        reward_only = use_reward and progress >= config.reward_only_from
        x = self.render()
        s = noise_level(config, ctx.step, ctx.generator)
        noise = torch.randn((1, *x.shape[1:]), generator=ctx.generator)
        # 1. SDS: move the render towards the generator's guided one-step estimate.
        x0_hat = guided_denoise(self, x.detach(), s, noise)
        sds_loss = gradient_as_loss(x, sds_direction(x, x0_hat))
        loss, metrics = sds_loss, {"sds_loss": float(sds_loss.detach())}
        if use_reward:
            # 2. The learned reward of the estimate (small s) or of the render, hinged at the margin.
            views = scored_views(x, x0_hat, use_estimate=float(s) <= config.denoised_below)
            rewards = self.reward(views, [self.prompt])
            reward_loss = hinge_reward_loss(rewards, config.reward_margin)
            # 3. lambda = kappa 10^(orders of magnitude between the losses); the last steps: the reward alone.
            weight = config.reward_weight * magnitude_match(float(sds_loss.detach()), float(reward_loss.detach()))
            loss = weight * reward_loss if reward_only else sds_loss + weight * reward_loss
            metrics.update(reward_mean=float(rewards.detach().mean()), reward_loss=float(reward_loss.detach()),
                           reward_weight=weight)
        norm = self.step_field(loss + self.sparsity())
        # --8<-- [end:train_step]
        metrics.update(noise_level=float(s), grad_norm=norm, reward_term=float(use_reward),
                       reward_only=float(reward_only))
        return metrics
