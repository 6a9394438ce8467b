r"""Flow-DPO: direct preference optimisation for rectified-flow video models (Liu et al., 2025, VideoAlign).

Bib key: ``liu2025videoalign``.

"Improving Video Generation with Human Feedback" carries Diffusion-DPO over to flow-matching video
generators. For a pair of clips $(c, x^w_0, x^l_0)$ with $x^w_0$ preferred, draw one noise level $t$ and one
noise $\epsilon$ for both, interpolate on the straight path $x^\bullet_t = (1 - t)\,x^\bullet_0 + t\,\epsilon$, and
compare velocity errors against the target $v^\bullet = \epsilon - x^\bullet_0$:

$$
\Delta^\bullet = \big\|v_\theta(x^\bullet_t, t, c) - v^\bullet\big\|^2 - \big\|v_\text{ref}(x^\bullet_t, t, c) - v^\bullet\big\|^2,
\qquad
L(\theta) = -\,\mathbb E_{(c, x^w, x^l),\, t,\, \epsilon}\Big[\log\sigma\Big(-\frac{\beta}{2}\,\big(\Delta^w - \Delta^l\big)\Big)\Big],
$$

squared errors averaged over the clip's $D = 3 \times F \times H \times W$ values (the public codes' reduction).
Read it as Diffusion-DPO with the velocity in place of the noise: the loss falls when the model fits the
preferred clip's path better than the reference does, relative to the other clip.

**beta.** Deriving the loss from the diffusion ELBO puts a weight that depends on $t$ in front of the
errors; we keep one constant $\beta$ for every $t$, as the public flow-matching DPO code does
(``flow_grpo``'s ``train_sd3_dpo.py``, $\beta = 100$ on SD3.5 latents). The paper's own statement about the
timestep-dependent variant could not be checked here, so this page does not repeat it.

**Noise levels.** ``timestep_sampling="logit-normal"`` draws $t = \sigma(u)$, $u \sim \mathcal N(0, 1)$ (the
public code's density, which spends more updates at mid noise); ``uniform`` draws $t \sim \mathcal U(0, 1)$
like our pretraining.

The preference bank, synthetic labeller and reward monitor are Diffusion-DPO's (``diffusion_dpo.py``); only
the model family and the noise-level draw differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.algorithms.diffusion_dpo import (
    DiffusionDPO,
    DiffusionDPOConfig,
    denoising_errors,
    diffusion_dpo_loss,
    noised,
)
from reference_impls.models.policy import Conditioning
from reference_impls.training.method import StepContext


@dataclass
class FlowDPOConfig(DiffusionDPOConfig):
    """Flow-DPO's settings: Diffusion-DPO's bank and labeller, a flow model, and the noise-level density."""

    model: str = "motion-flow"
    """A flow (velocity) model: shipped name or folder."""
    reward: str = "motion-composition"
    """Score the synthetic labeller judges with (it prefers higher scores, with Bradley-Terry noise)."""
    beta: float = 500.0
    """Constant beta of -log sigmoid(-beta/2 (Delta_w - Delta_l)) on per-value mean velocity errors."""
    timestep_sampling: str = "logit-normal"
    """Noise-level density: logit-normal (t = sigmoid(u), u ~ N(0, 1), as the public code) or uniform."""

    def validate(self) -> None:
        super().validate()
        if self.timestep_sampling not in ("logit-normal", "uniform"):
            raise ValueError(f"--timestep-sampling {self.timestep_sampling!r}; valid: logit-normal, uniform")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=4, batch_size=4, num_pairs=16, bank_steps=8, num_steps=8, learning_rate=1e-4,
                  eval_every=0, eval_prompts=4, checkpoint_every=2, monitor_samples=4, prompts="easy"),
    "cpu": dict(steps=40, batch_size=16, num_pairs=192, bank_steps=10, num_steps=10, learning_rate=3e-5,
                eval_every=20, eval_prompts=48, checkpoint_every=20, monitor_samples=8),
    "gpu": dict(steps=500, batch_size=32, num_pairs=4096, bank_steps=30, num_steps=30, learning_rate=1e-5,
                eval_every=50, eval_prompts=243, checkpoint_every=50),
}


# --8<-- [start:noise_levels]
def flow_noise_levels(n: int, density: str, generator: torch.Generator) -> torch.Tensor:
    """t in (0, 1): sigmoid of a standard normal (logit-normal) or uniform."""
    if density == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=generator))
    return torch.rand(n, generator=generator)
# --8<-- [end:noise_levels]


class FlowDPO(DiffusionDPO):
    """Flow-DPO: Diffusion-DPO's pairs and loss on a rectified-flow model's velocity errors."""

    name: ClassVar[str] = "flow-dpo"
    bib_key: ClassVar[str] = "liu2025videoalign"
    config_class: ClassVar[type] = FlowDPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("flow",)
    config: FlowDPOConfig

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config, policy, pairs = self.config, self.policy, self.pairs
        device = policy.device
        # 1. A minibatch of preference pairs (c, x_w, x_l): clips for a video model.
        rows = torch.as_tensor(ctx.rng.choice(len(pairs), size=min(config.batch_size, len(pairs)), replace=False))
        n = len(rows)
        x0 = torch.cat([pairs.winners[rows], pairs.losers[rows]]).to(device)
        with torch.no_grad():
            cond = policy.encode_text([pairs.prompts[int(i)] for i in rows]).detach()
        # 2. One noise level and one noise per pair: x_t = (1 - t) x0 + t eps, target v = eps - x0.
        level = flow_noise_levels(n, config.timestep_sampling, ctx.generator).repeat(2)
        noise = torch.randn((n, *x0.shape[1:]), generator=ctx.generator).to(device)
        x_t, timestep, target = noised(policy, x0, torch.cat([noise, noise]), level)
        both = Conditioning.cat([cond, cond])
        # 3. Velocity errors of the model and of the frozen reference; the DPO loss on their differences.
        errors = denoising_errors(policy, x_t, timestep, both, target)
        with torch.no_grad():
            ref_errors = denoising_errors(self.reference, x_t, timestep, both, target)
        loss, stats = diffusion_dpo_loss(errors[:n], errors[n:], ref_errors[:n], ref_errors[n:], config.beta)
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {
            **self.monitor(),
            "loss": float(loss.detach()),
            "implicit_acc": stats.implicit_acc,
            "implicit_margin": stats.implicit_margin,
            "delta_w": stats.delta_w,
            "delta_l": stats.delta_l,
            "grad_norm": grad_norm,
            "noise_level_mean": float(level[:n].mean()),
            "pair_score_gap": float((pairs.winner_scores[rows] - pairs.loser_scores[rows]).mean()),
            "samples": 2 * n,
        }
