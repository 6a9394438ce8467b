r"""VideoDPO: Diffusion-DPO on automatically ranked video pairs, re-weighted by how rare a pair is (Liu et al., 2024).

Bib key: ``liu2024videodpo``.

VideoDPO scores sampled videos with an *OmniScore* that covers per-frame visual quality, text alignment and
inter-frame (temporal) quality, turns the scores into preference pairs, and trains with the Diffusion-DPO
loss in which each pair carries a weight:

$$
L(\theta) = -\,\mathbb E\Big[w(x^w, x^l)\,\log\sigma\Big(-\frac{\beta}{2}\big(\Delta^w - \Delta^l\big)\Big)\Big],
\qquad
w(x^w, x^l) = \Big(\frac{p_\text{max}}{p(x^w)\,p(x^l)}\Big)^{\alpha},
$$

with $\Delta^\bullet$ the model-minus-reference denoising error of Diffusion-DPO and $p(x)$ the frequency of
$x$'s score among all scored videos (a histogram over the bank), $p_\text{max}$ that of the most frequent
score. A pair of two common scores weighs least; pairs involving rare scores (the few good clips, the
clearly broken ones) weigh more, so the update is not dominated by the bulk of mediocre samples.
$\alpha = 0$ is plain Diffusion-DPO.

**Where we differ.**

* *OmniScore.* The paper combines several evaluators; MotionWorld's exact matched score
  (``motion-composition``) already joins the three kinds of check: per-frame appearance (colour, shape),
  text alignment (direction, speed) and temporal consistency (broken or unsteady tracks cost), so it plays
  the OmniScore's role.
* *Pairs.* Two samples per prompt, winner by the synthetic labeller (Diffusion-DPO's bank); the paper
  samples several per prompt and picks pairs from them.
* *Weights.* In the public code the weight is $(0.72 / (p_w p_l))^\alpha$ with 0.72 "about the frequency of
  the most frequent sample" of their data and $p$ the product of histogram frequencies; we compute
  $p_\text{max}$ from our bank. The released VideoCrafter2 config sets $\alpha = 0$ (weights off); the code's
  default, and ours, is $\alpha = 1$. Weights are normalised to mean 1 over the bank so that ``beta`` and
  the learning rate keep Diffusion-DPO's meaning.
* *Noise.* As in Diffusion-DPO both clips of a pair share the timestep and the noise; the public
  VideoDPO code draws them independently for the two clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from reference_impls.algorithms.diffusion_dpo import (
    DiffusionDPO,
    DiffusionDPOConfig,
    DPOStats,
    denoising_errors,
    noised,
    sample_noise_levels,
)
from reference_impls.models.policy import Conditioning
from reference_impls.training.method import StepContext


@dataclass
class VideoDPOConfig(DiffusionDPOConfig):
    """VideoDPO's settings: Diffusion-DPO's bank and beta, plus the pair re-weighting."""

    model: str = "motion-diffusion"
    """A video model: shipped name or folder."""
    reward: str = "motion-composition"
    """The OmniScore analogue the labeller ranks clips by (exact: appearance, alignment, temporal checks)."""
    weight_alpha: float = 1.0
    """alpha of the pair weight (p_max / (p_w p_l))^alpha; 0 turns re-weighting off (plain Diffusion-DPO)."""
    score_bins: int = 10
    """Bins of the score histogram over the bank that gives each clip's frequency p."""

    def validate(self) -> None:
        super().validate()
        if self.weight_alpha < 0 or self.score_bins < 1:
            raise ValueError("--weight-alpha must be >= 0 and --score-bins >= 1")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=4, batch_size=4, num_pairs=16, bank_steps=8, num_steps=8, learning_rate=1e-4,
                  eval_every=0, eval_prompts=4, checkpoint_every=2, monitor_samples=4, prompts="easy"),
    "cpu": dict(steps=40, batch_size=16, num_pairs=192, bank_steps=10, num_steps=10, learning_rate=3e-5,
                eval_every=20, eval_prompts=48, checkpoint_every=20, monitor_samples=8),
    "gpu": dict(steps=500, batch_size=32, num_pairs=4096, bank_steps=50, num_steps=50, learning_rate=6e-6,
                eval_every=50, eval_prompts=243, checkpoint_every=50),
}


# --8<-- [start:weights]
def pair_weights(winner_scores: torch.Tensor, loser_scores: torch.Tensor, alpha: float, bins: int) -> torch.Tensor:
    """(P,) weights (p_max / (p_w p_l))^alpha from the histogram of all 2P scores, normalised to mean 1."""
    scores = torch.cat([winner_scores, loser_scores]).double()
    low, high = float(scores.min()), float(scores.max())
    width = (high - low) / bins if high > low else 1.0
    index = ((scores - low) / width).floor().clamp(0, bins - 1).long()
    frequency = torch.bincount(index, minlength=bins).double() / len(scores)
    p = frequency[index]
    p_w, p_l = p[: len(winner_scores)], p[len(winner_scores):]
    weights = (frequency.max() / (p_w * p_l)) ** alpha
    return (weights / weights.mean()).float()
# --8<-- [end:weights]


# --8<-- [start:loss]
def weighted_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                      beta: float, weights: torch.Tensor) -> tuple[torch.Tensor, DPOStats]:
    """-mean w log sigmoid(-beta/2 [(err_w - ref_err_w) - (err_l - ref_err_l)]); w = 1 is Diffusion-DPO's loss."""
    delta_w, delta_l = err_w - ref_err_w, err_l - ref_err_l
    inside = -0.5 * beta * (delta_w - delta_l)
    loss = -(weights * F.logsigmoid(inside)).mean()
    with torch.no_grad():
        stats = DPOStats(float((inside > 0).float().mean()), float(inside.mean()), float(delta_w.mean()),
                         float(delta_l.mean()))
    return loss, stats
# --8<-- [end:loss]


class VideoDPO(DiffusionDPO):
    """VideoDPO: Diffusion-DPO with each pair weighted by the rarity of its two scores."""

    name: ClassVar[str] = "video-dpo"
    bib_key: ClassVar[str] = "liu2024videodpo"
    config_class: ClassVar[type] = VideoDPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    config: VideoDPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.weights = pair_weights(self.pairs.winner_scores, self.pairs.loser_scores, self.config.weight_alpha,
                                    self.config.score_bins)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config, policy, pairs = self.config, self.policy, self.pairs
        device = policy.device
        # 1. A minibatch of ranked clip pairs and their rarity weights.
        rows = torch.as_tensor(ctx.rng.choice(len(pairs), size=min(config.batch_size, len(pairs)), replace=False))
        n = len(rows)
        x0 = torch.cat([pairs.winners[rows], pairs.losers[rows]]).to(device)
        weights = self.weights[rows].to(device)
        with torch.no_grad():
            cond = policy.encode_text([pairs.prompts[int(i)] for i in rows]).detach()
        # 2. Diffusion-DPO's noising: the same timestep and noise for both clips of a pair.
        level = sample_noise_levels(policy, n, ctx.generator).repeat(2)
        noise = torch.randn((n, *x0.shape[1:]), generator=ctx.generator).to(device)
        x_t, timestep, target = noised(policy, x0, torch.cat([noise, noise]), level)
        both = Conditioning.cat([cond, cond])
        # 3. Errors of the model and the frozen reference; the weighted DPO loss.
        errors = denoising_errors(policy, x_t, timestep, both, target)
        with torch.no_grad():
            ref_errors = denoising_errors(self.reference, x_t, timestep, both, target)
        loss, stats = weighted_dpo_loss(errors[:n], errors[n:], ref_errors[:n], ref_errors[n:], config.beta, weights)
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
            "pair_weight_mean": float(weights.mean()),
            "pair_weight_max": float(weights.max()),
            "pair_score_gap": float((pairs.winner_scores[rows] - pairs.loser_scores[rows]).mean()),
            "samples": 2 * n,
        }

