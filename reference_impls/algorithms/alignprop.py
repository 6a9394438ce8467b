r"""AlignProp: end-to-end reward backpropagation with randomised truncation (Prabhudesai et al., 2023).

Bib key: ``prabhudesai2023alignprop``.

The same pathwise objective as DRaFT, $L(\theta) = -\mathbb{E}[r(x_0, c)]$ with $x_0 = g_\theta(x_T, c)$
the whole sampling chain, made affordable and less prone to over-optimisation by two devices:

* **gradient checkpointing** of every denoiser call: only each step's input state is stored, and the
  call's activations are recomputed in the backward pass, so memory no longer grows with
  $T \times$ (activations of one network call);
* **randomised truncated backpropagation**: for each trajectory draw $K \sim \mathcal U\{K_\min, \dots,
  K_\max\}$ and stop the gradient before its last $K$ steps,

$$
\nabla_\theta L = -\,\mathbb{E}_{K}\,\mathbb{E}\Big[\nabla_{x_0} r(x_0, c)^\top \sum_{t=1}^{K}
\frac{\partial x_0}{\partial x_{t-1}}\,\frac{\partial f_\theta(x_t, t, c, z_t)}{\partial \theta}\Big],
$$

with the chain written as $x_{t-1} = f_\theta(x_t, t, c, z_t)$ from noise $x_T$ to image $x_0$.

Short truncations keep the gradient from exploding through long Jacobian chains and bias updates
towards the late steps (texture and colour); the occasional long one still credits the early steps that
decide composition. The paper fine-tunes LoRA adapters; the tiny models here train all their weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from reference_impls.training.differentiable import RewardBackpropConfig, sample_with_grad, training_sampler
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import reward_metrics


@dataclass
class AlignPropConfig(RewardBackpropConfig):
    """AlignProp's own settings on top of the shared ones."""

    eta: float = 1.0
    """DDIM stochasticity of training rollouts (AlignProp samples with eta = 1; the noise is reparameterised)."""
    k_min: int = 1
    """Fewest final steps that keep gradients; K ~ U{k_min..k_max}, drawn once per trajectory."""
    k_max: int = 0
    """Most final steps that keep gradients (0 = num_steps, the whole chain); k_min = k_max fixes K."""
    checkpointing: bool = True
    """Recompute each differentiated denoiser call in the backward pass instead of storing it."""

    @property
    def k_range(self) -> tuple[int, int]:
        return self.k_min, (self.k_max or self.num_steps)

    def validate(self) -> None:
        super().validate()
        low, high = self.k_range
        if not 1 <= low <= high <= self.num_steps:
            raise ValueError(f"need 1 <= --k-min <= --k-max <= --num-steps, got {low}, {high}, {self.num_steps}")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(reward="prompt-colour", steps=6, batch_size=8, num_steps=8, k_max=4, learning_rate=3e-4,
                  eval_every=0, eval_prompts=8, checkpoint_every=3, prompts="easy"),
    "cpu": dict(steps=40, batch_size=16, num_steps=10, learning_rate=3e-5, eval_every=20, eval_prompts=128,
                checkpoint_every=20),
    "gpu": dict(steps=400, batch_size=8, num_steps=50, learning_rate=1e-4, eval_every=50, eval_prompts=256,
                checkpoint_every=50, guidance_scale=5.0),
}


# --8<-- [start:truncation]
def draw_truncation(batch_size: int, k_range: tuple[int, int], num_steps: int,
                    rng: np.random.Generator) -> torch.Tensor:
    """(B,) first differentiated step of each trajectory: T - K with K ~ U{k_min..k_max}."""
    k = rng.integers(k_range[0], k_range[1] + 1, size=batch_size)
    return torch.as_tensor(num_steps - k, dtype=torch.long)
# --8<-- [end:truncation]


class AlignProp(Method):
    """AlignProp: full-chain reward backpropagation, checkpointed, with a random truncation per trajectory."""

    name: ClassVar[str] = "alignprop"
    bib_key: ClassVar[str] = "prabhudesai2023alignprop"
    config_class: ClassVar[type] = AlignPropConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    needs_differentiable_reward: ClassVar[bool] = True
    config: AlignPropConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sampler = training_sampler(self.policy, self.config)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        prompts = self.sample_prompts(config.batch_size, ctx.rng)
        # 1. Draw each trajectory's truncation: gradients flow through its last K steps only.
        grad_from = draw_truncation(len(prompts), config.k_range, config.num_steps, ctx.rng)
        # 2. Sample through the whole chain, checkpointing every differentiated denoiser call.
        sample = sample_with_grad(self.policy, prompts, self.sampler, ctx.generator, grad_from_step=grad_from,
                                  checkpointing=config.checkpointing)
        # 3. Maximise the reward of the final images.
        rewards = self.reward(self.policy.decode(sample.final), prompts)
        loss = -rewards.mean()
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {**reward_metrics(rewards.detach()), "loss": loss.item(), "grad_norm": grad_norm,
                "k_mean": float(sample.grad_steps.float().mean())}
