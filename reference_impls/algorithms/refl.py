r"""ReFL: reward feedback learning, the fine-tuning half of ImageReward (Xu et al., 2023).

Bib key: ``xu2023imagereward``.

Sample without gradient from noise down to a late step $i = T - t$, with $t$ drawn uniformly from
$\{t_\min, \dots, t_\max\}$ steps before the end; run that step's denoiser call with gradient and score
its one-shot prediction of the clean image:

$$
\hat x_0 = \frac{x_i - \sqrt{1 - \bar\alpha_i}\,\epsilon_\theta(x_i, i, c)}{\sqrt{\bar\alpha_i}}
\quad(\text{flow: } \hat x_0 = x_s - s\, v_\theta(x_s, s, c)),
\qquad
L(\theta) = \lambda\, \mathbb{E}\big[\phi\big(r(\hat x_0, c)\big)\big] + \beta\, L_\text{pre}(\theta),
\quad \phi(r) = \mathrm{ReLU}(m - r).
$$

$\phi$ is ImageReward's reward-to-loss map (the official code uses $m = 2$ on ImageReward's roughly
standard-normal scores and $\lambda = 10^{-3}$); $L_\text{pre}$ is the ordinary denoising loss on real
data, which the paper mixes in against over-optimisation. Here the real data are ground-truth ShapeWorld
renders of the batch's prompts, and $\beta = 0$ by default so that the reward's effect is measured alone.
Only the one denoiser call at step $i$ receives gradient: no backpropagation through the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from reference_impls.models.policy import GenerativePolicy
from reference_impls.training.differentiable import RewardBackpropConfig, sample_with_grad, training_sampler
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import reward_metrics


@dataclass
class ReFLConfig(RewardBackpropConfig):
    """ReFL's own settings on top of the shared ones."""

    eta: float = 1.0
    """DDIM stochasticity of the no-gradient part (1.0: the ancestral DDPM-like sampler ReFL trains with)."""
    t_min: int = 1
    """The gradient step is t steps before the end, t uniform in [t_min, t_max]; 1 is the last step."""
    t_max: int = 3
    """Upper end of that range (ReFL: the last 10 of 40 steps; here a similar fraction of fewer steps)."""
    reward_margin: float = 1.0
    """m in phi(r) = ReLU(m - r); 1.0 is the maximum of the [0, 1] rewards here, so the ReLU never cuts."""
    loss_scale: float = 1.0
    """lambda, the reward loss weight (the official code's 1e-3 pairs with a learning rate of 1e-5)."""
    pretrain_weight: float = 0.0
    """beta: weight of the denoising loss on ground-truth renders of the batch's prompts (ShapeWorld); 0 = off."""

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.t_min <= self.t_max <= self.num_steps:
            raise ValueError(f"need 1 <= --t-min <= --t-max <= --num-steps, got {self.t_min}, {self.t_max}, "
                             f"{self.num_steps}")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(reward="prompt-colour", steps=6, batch_size=8, num_steps=8, t_min=1, t_max=2,
                  learning_rate=3e-4, eval_every=0, eval_prompts=8, checkpoint_every=3, prompts="easy"),
    "cpu": dict(steps=60, batch_size=16, num_steps=10, t_min=1, t_max=3, learning_rate=1e-4, eval_every=20,
                eval_prompts=128, checkpoint_every=20),
    "gpu": dict(steps=400, batch_size=16, num_steps=40, t_min=1, t_max=10, learning_rate=1e-5, eval_every=50,
                eval_prompts=256, checkpoint_every=50, guidance_scale=5.0, loss_scale=1e-3, reward_margin=2.0),
}


# --8<-- [start:loss]
def refl_loss(rewards: torch.Tensor, margin: float = 1.0, scale: float = 1.0) -> torch.Tensor:
    """lambda * mean_i ReLU(m - r_i): ImageReward's reward-to-loss map (rewards: (B,), differentiable)."""
    return scale * torch.relu(margin - rewards).mean()


def denoising_loss(policy: GenerativePolicy, prompts: list[str], seed: int,
                   generator: torch.Generator) -> torch.Tensor:
    """The pretraining loss on ground-truth renders: epsilon-MSE (diffusion) or velocity-MSE (flow)."""
    from reference_impls.worlds import render_batch

    x0 = torch.from_numpy(render_batch(prompts, seed)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    x0 = x0.to(policy.device)
    noise = torch.randn(x0.shape, generator=generator).to(policy.device)
    with torch.no_grad():
        cond = policy.encode_text(prompts).detach()
    if policy.kind == "diffusion":
        t = torch.randint(0, int(policy.scheduler.config.num_train_timesteps), (len(prompts),), generator=generator)
        a = policy.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1).to(policy.device)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return torch.mean((policy.predict(x_t, t.to(policy.device), cond) - noise) ** 2)
    s = torch.rand(len(prompts), generator=generator).to(policy.device)
    x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    timestep = s * float(policy.scheduler.config.num_train_timesteps)
    return torch.mean((policy.predict(x_s, timestep, cond) - (noise - x0)) ** 2)
# --8<-- [end:loss]


class ReFL(Method):
    """ReFL: the reward of a one-step clean-image prediction at a random late step, backpropagated once."""

    name: ClassVar[str] = "refl"
    bib_key: ClassVar[str] = "xu2023imagereward"
    config_class: ClassVar[type] = ReFLConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    needs_differentiable_reward: ClassVar[bool] = True
    config: ReFLConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.config.pretrain_weight > 0 and self.policy.world != "shapes":
            raise ValueError("--pretrain-weight needs ground-truth data: only ShapeWorld models have it here")
        self.sampler = training_sampler(self.policy, self.config)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        prompts = self.sample_prompts(config.batch_size, ctx.rng)
        # 1. Pick the late step: t steps before the end, t ~ U{t_min..t_max}.
        t = int(ctx.rng.integers(config.t_min, config.t_max + 1))
        step = config.num_steps - t
        # 2. Sample without gradient down to x at that step; run its denoiser call with gradient.
        sample = sample_with_grad(self.policy, prompts, self.sampler, ctx.generator, grad_from_step=step,
                                  stop_after=step)
        # 3. Score the one-shot prediction x0_hat and backpropagate through that single call.
        rewards = self.reward(self.policy.decode(sample.predicted_x0), prompts)
        loss = refl_loss(rewards, config.reward_margin, config.loss_scale)
        pretrain = torch.zeros(())
        if config.pretrain_weight > 0:
            seed = int(ctx.rng.integers(np.iinfo(np.int32).max))
            pretrain = denoising_loss(self.policy, prompts, seed, ctx.generator)
            loss = loss + config.pretrain_weight * pretrain
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {**reward_metrics(rewards.detach()), "loss": loss.item(), "grad_norm": grad_norm,
                "refl_t": float(t), "pretrain_loss": pretrain.item()}
