r"""DreamDPO: per-prompt text-to-3D optimisation guided by pairwise preferences (Zhou et al., 2025).

Bib key: ``zhou2025dreamdpo``.

DreamDPO keeps score distillation's loop (render the 3D representation, noise the render, ask a frozen
generator to denoise it) but replaces SDS's single pull towards the generator's estimate with a
preference between two estimates. At every step:

1. **Pair.** The same render $x$ is noised to the same level $s$ with two independent noises
   $\epsilon^1, \epsilon^2$, and the generator's guided one-step estimates $\hat x_0^1, \hat x_0^2$ are formed
   (:func:`~reference_impls.algorithms.score_distillation.guided_denoise`).
2. **Compare.** A reward ranks the two estimates: the paper uses HPSv2 or a large multimodal model; here the
   exact SolidWorld evaluator's matched score (``solid-composition``), so that only the ranking matters,
   never a calibrated value. The better one is the winner $w$, the other the loser $l$.
3. **Preference-guided update.** The gradient pulls the render towards the winner's estimate and pushes it
   away from the loser's; when the two scores are too close to trust ($|r_w - r_l| < \tau$), the loser term
   is dropped and the step is SDS with the winner's noise:

$$ \nabla_\psi \mathcal L = w(s)\Big[\big(\hat v^w - (\epsilon^w - x)\big)
   - \mathbb 1\big[|r_w - r_l| \ge \tau\big]\,\big(\hat v^l - (\epsilon^l - x)\big)\Big]\frac{\partial x}{\partial\psi}
   = \Big[(x - \hat x_0^w) - \mathbb 1[\cdot]\,(x - \hat x_0^l)\Big]\frac{\partial x}{\partial\psi}, $$

so with the loser term on, the render moves along $\hat x_0^w - \hat x_0^l$. The field is the voxel grid of
:mod:`reference_impls.models.voxel_field`; a small density penalty empties what no view constrains.
"""

from __future__ import annotations

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
class DreamDPOConfig(FieldConfig):
    """DreamDPO's settings: the shared per-prompt ones plus the preference threshold."""

    preference_threshold: float = 0.01
    """tau: below this reward gap the pair is a tie and only the winner's SDS term is used."""
    use_preferences: bool = True
    """False: plain SDS with one noise per step (DreamFusion's loop), the baseline DreamDPO is compared to."""


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=60, eval_every=30, checkpoint_every=30),
    "cpu": dict(steps=150, eval_every=50, checkpoint_every=50),
    "gpu": dict(steps=1000, eval_every=100, checkpoint_every=100, resolution=64, samples_per_ray=160),
}


# --8<-- [start:loss]
def preference_direction(x: torch.Tensor, x0_first: torch.Tensor, x0_second: torch.Tensor,
                         rewards: torch.Tensor, threshold: float) -> tuple[torch.Tensor, bool]:
    """DreamDPO's gradient in x from two estimates and their rewards: (x - x0_win) - [gap >= tau] (x - x0_lose).

    Returns the direction and whether the loser term was used. Ties go to the first estimate.
    """
    first_wins = bool(rewards[0] >= rewards[1])
    x0_win, x0_lose = (x0_first, x0_second) if first_wins else (x0_second, x0_first)
    use_loser = bool((rewards[0] - rewards[1]).abs() >= threshold)
    direction = sds_direction(x, x0_win)
    if use_loser:
        direction = direction - sds_direction(x, x0_lose)
    return direction, use_loser
# --8<-- [end:loss]


class DreamDPO(FieldMethod):
    """DreamDPO: a voxel field optimised by preference-guided score distillation from solid-mv-flow."""

    name: ClassVar[str] = "dreamdpo"
    bib_key: ClassVar[str] = "zhou2025dreamdpo"
    config_class: ClassVar[type] = DreamDPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    sds_settings: ClassVar[dict[str, Any]] = {"use_preferences": False}
    config: DreamDPOConfig

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        x = self.render()
        s = noise_level(config, ctx.step, ctx.generator)
        noise = torch.randn((2, *x.shape[1:]), generator=ctx.generator)
        # 1. Two noisy copies of the same render at the same level, each denoised in one guided step.
        if not config.use_preferences:
            x0_first = guided_denoise(self, x.detach(), s, noise[:1])
            direction, used_pair, rewards = sds_direction(x, x0_first), False, None
        else:
            x0_first, x0_second = guided_denoise(self, x.detach(), s, noise).split(1)
            # 2. The reward ranks the two one-step estimates (in [0, 1], as the evaluator sees images).
            estimates = torch.cat([x0_first, x0_second]).clamp(-1, 1) / 2 + 0.5
            rewards = self.reward(estimates, [self.prompt, self.prompt])
            # 3. Towards the winner, away from the loser when the gap is trusted.
            direction, used_pair = preference_direction(x, x0_first, x0_second, rewards, config.preference_threshold)
        loss = gradient_as_loss(x, direction) + self.sparsity()
        norm = self.step_field(loss)
        # --8<-- [end:train_step]
        metrics = {"noise_level": float(s), "grad_norm": norm, "pair_used": float(used_pair),
                   "direction_rms": float(direction.pow(2).mean().sqrt())}
        if rewards is not None:
            metrics.update(reward_mean=float(rewards.mean()), reward_gap=float((rewards[0] - rewards[1]).abs()))
        return metrics
