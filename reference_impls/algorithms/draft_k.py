r"""DRaFT-K: direct reward fine-tuning through the last K sampling steps (Clark et al., 2024).

Bib key: ``clark2023draft``.

Write the sampler as $T$ steps $x_{t-1} = f_\theta(x_t, t, c, z_t)$ from noise $x_T$ to the image $x_0$
($z_t$ the step's injected noise). DRaFT maximises $J(\theta) = \mathbb{E}_{c, x_T, z}[r(x_0, c)]$ by
following the pathwise gradient through the sampler. DRaFT-K stops the gradient at $x_K$, so only the
last $K$ network calls receive credit:

$$
L_K(\theta) = -\,\mathbb{E}\big[r(x_0, c)\big], \qquad
\nabla_\theta L_K = -\,\mathbb{E}\Big[\nabla_{x_0} r(x_0, c)^\top \sum_{t=1}^{K}
\frac{\partial x_0}{\partial x_{t-1}}\, \frac{\partial f_\theta(x_t, t, c, z_t)}{\partial \theta}\Big].
$$

In the code steps are indexed from noise ($i = 0$) to data ($i = T - 1$): ``grad_from_step = T - K``.
$K = T$ is full DRaFT. The paper finds small $K$ (even $K = 1$) learns faster than full backpropagation
per unit of compute: long chains of network Jacobians make the full gradient noisy and can explode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.training.differentiable import RewardBackpropConfig, sample_with_grad, training_sampler
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import reward_metrics


@dataclass
class DRaFTKConfig(RewardBackpropConfig):
    """DRaFT-K's own settings on top of the shared ones."""

    k: int = 1
    """Sampling steps the reward gradient flows through (the last K); K = num_steps is full DRaFT."""
    checkpointing: bool = False
    """Recompute each differentiated denoiser call in the backward pass instead of storing it."""

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.k <= self.num_steps:
            raise ValueError(f"--k must be in [1, --num-steps={self.num_steps}], got {self.k}")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(reward="prompt-colour", steps=6, batch_size=8, num_steps=8, k=1, learning_rate=3e-4,
                  eval_every=0, eval_prompts=8, checkpoint_every=3, prompts="easy"),
    "cpu": dict(steps=60, batch_size=16, num_steps=10, k=2, learning_rate=1e-4, eval_every=20, eval_prompts=128,
                checkpoint_every=20),
    "gpu": dict(steps=2000, batch_size=16, num_steps=50, k=1, learning_rate=2e-4, eval_every=100, eval_prompts=256,
                checkpoint_every=100, guidance_scale=7.5, checkpointing=True),
}


# --8<-- [start:loss]
def reward_loss(rewards: torch.Tensor) -> torch.Tensor:
    """-mean_i r(x_0^i, c_i): the rewards must carry the graph back to the differentiated steps."""
    return -rewards.mean()
# --8<-- [end:loss]


class DRaFTK(Method):
    """DRaFT-K: backpropagate a differentiable reward through the last K steps of the sampler."""

    name: ClassVar[str] = "draft-k"
    bib_key: ClassVar[str] = "clark2023draft"
    config_class: ClassVar[type] = DRaFTKConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    needs_differentiable_reward: ClassVar[bool] = True
    config: DRaFTKConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sampler = training_sampler(self.policy, self.config)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        prompts = self.sample_prompts(config.batch_size, ctx.rng)
        # Sample x_0, with gradient through the last K steps only (stop-gradient on x_{T-K}).
        sample = sample_with_grad(self.policy, prompts, self.sampler, ctx.generator,
                                  grad_from_step=config.num_steps - config.k, checkpointing=config.checkpointing)
        rewards = self.reward(self.policy.decode(sample.final), prompts)
        loss = reward_loss(rewards)
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {**reward_metrics(rewards.detach()), "loss": loss.item(), "grad_norm": grad_norm}
