r"""DRaFT-LV: DRaFT's lower-variance estimator for K = 1 (Clark et al., 2024).

Bib key: ``clark2023draft``.

Sample $x_0$ with no gradient at all. Then re-noise it $n$ times to the noise level of the sampler's last
step with fresh noise, run that last step again with gradient, and average the reward over the $n$
re-denoised images:

$$
x_1^{(j)} = \sqrt{\bar\alpha_1}\,\mathrm{sg}(x_0) + \sqrt{1 - \bar\alpha_1}\,\epsilon^{(j)}
\quad(\text{flow: } (1 - s_1)\,\mathrm{sg}(x_0) + s_1 \epsilon^{(j)}),\qquad
\hat x_0^{(j)} = f_\theta(x_1^{(j)}, 1, c),
\qquad
L(\theta) = -\frac{1}{n}\sum_{j=1}^{n} r\big(\hat x_0^{(j)}, c\big),
$$

with $f_\theta$ the last step of the deterministic sampler (DDIM with $\eta = 0$, or the flow ODE), and
$\epsilon^{(j)} \sim \mathcal N(0, I)$ independent. Like DRaFT-1 only one network call per image is
differentiated, but the $n$ calls average the gradient over the last step's noise, which the paper found
to learn faster than DRaFT-1 for little extra cost (here the $n$ calls are one batched forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from reference_impls.models.policy import GenerativePolicy
from reference_impls.sampling import apply_step, guided_prediction, make_schedule
from reference_impls.training.differentiable import (
    GradSample,
    RewardBackpropConfig,
    sample_with_grad,
    training_sampler,
)
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import reward_metrics


@dataclass
class DRaFTLVConfig(RewardBackpropConfig):
    """DRaFT-LV's own settings on top of the shared ones."""

    lv_samples: int = 2
    """n: noisings of each final sample whose re-denoised rewards are averaged (the paper uses 2)."""

    def validate(self) -> None:
        super().validate()
        if self.lv_samples < 1:
            raise ValueError(f"--lv-samples must be >= 1, got {self.lv_samples}")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(reward="prompt-colour", steps=6, batch_size=8, num_steps=8, lv_samples=2, learning_rate=3e-4,
                  eval_every=0, eval_prompts=8, checkpoint_every=3, prompts="easy"),
    "cpu": dict(steps=60, batch_size=16, num_steps=10, lv_samples=2, learning_rate=1e-4, eval_every=20,
                eval_prompts=128, checkpoint_every=20),
    "gpu": dict(steps=2000, batch_size=16, num_steps=50, lv_samples=2, learning_rate=2e-4, eval_every=100,
                eval_prompts=256, checkpoint_every=100, guidance_scale=7.5),
}


# --8<-- [start:lv]
def renoise_last_step(policy: GenerativePolicy, sample: GradSample, x0: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """Forward-diffuse x0 to the noise level of the sampler's last step (x_1 in DRaFT's notation)."""
    last = sample.schedule.num_steps - 1
    if policy.kind == "diffusion":
        a = sample.schedule.alpha_bar[last].to(x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise
    s = sample.schedule.sigma[last].to(x0)
    return (1 - s) * x0 + s * noise


def low_variance_images(policy: GenerativePolicy, sample: GradSample, n: int,
                        generator: torch.Generator | None) -> torch.Tensor:
    """n re-noised, re-denoised copies of each final sample, (n * B, ...), differentiable in theta."""
    x0 = sample.final.detach().repeat(n, 1, 1, 1)  # copy j of image b sits at row j * B + b
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    x1 = renoise_last_step(policy, sample, x0, noise)
    deterministic = replace(sample.config, name="ddim" if policy.kind == "diffusion" else "ode", eta=0.0)
    schedule = make_schedule(policy, deterministic)
    last = schedule.num_steps - 1
    uncond = None if sample.uncond is None else sample.uncond.repeat(n)
    output = guided_prediction(policy, x1, schedule.model_timesteps[last].to(x1.device), sample.cond.repeat(n),
                               uncond, deterministic.guidance_scale)
    index = torch.full((x1.shape[0],), last, dtype=torch.long)
    return apply_step(policy, deterministic, schedule, index, x1, output).next_state


def lv_loss(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """-(1/n) sum_j mean_b r(x0_hat^(j)_b): rewards of the n * B re-denoised images, (n * B,)."""
    return -rewards.view(n, -1).mean(dim=0).mean()
# --8<-- [end:lv]


class DRaFTLV(Method):
    """DRaFT-LV: K = 1 with the last step's reward gradient averaged over n fresh noisings."""

    name: ClassVar[str] = "draft-lv"
    bib_key: ClassVar[str] = "clark2023draft"
    config_class: ClassVar[type] = DRaFTLVConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    needs_differentiable_reward: ClassVar[bool] = True
    config: DRaFTLVConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.sampler = training_sampler(self.policy, self.config)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        prompts = self.sample_prompts(config.batch_size, ctx.rng)
        # 1. Sample x_0 with no gradient (grad_from_step = T: no step is differentiated).
        sample = sample_with_grad(self.policy, prompts, self.sampler, ctx.generator, grad_from_step=config.num_steps)
        with torch.no_grad():
            rewards = self.reward(self.policy.decode(sample.final), prompts)
        # 2. Re-noise x_0 n times to the last step's level and re-run that step with gradient.
        images = self.policy.decode(low_variance_images(self.policy, sample, config.lv_samples, ctx.generator))
        lv_rewards = self.reward(images, prompts * config.lv_samples)
        loss = lv_loss(lv_rewards, config.lv_samples)
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {**reward_metrics(rewards), "reward_lv_mean": float(lv_rewards.detach().mean()),
                "loss": loss.item(), "grad_norm": grad_norm}
