r"""Diffusion-KTO: aligning a diffusion model with per-image like/dislike feedback (Li et al., 2024).

Bib key: ``li2024diffusionkto``.

No pairs: each image $x_0$ carries a binary label, desirable or undesirable. With the same per-timestep
denoising errors as Diffusion-DPO (one image, its own timestep and noise), the implicit reward is

$$
g_\theta(x_0, c) = -\big(\mathrm{mse}(\epsilon_\theta(x_t, t, c), \epsilon) - \mathrm{mse}(\epsilon_\text{ref}(x_t, t, c), \epsilon)\big),
$$

positive when the model denoises the image better than the frozen reference. KTO's utility compares it
with a reference point $z_0$ through a sigmoid (the official ``--halo sigmoid``):

$$
h(x_0) = \sigma\big(\beta\, s(x_0)\, (g_\theta(x_0, c) - z_0)\big),\quad s = +1 \text{ (desirable)}, -1 \text{ (undesirable)},
\qquad L(\theta) = \mathbb E\big[\lambda_{s}\,(1 - h(x_0))\big].
$$

The reference point estimates $\mathrm{KL}(\pi_\theta \,\|\, \pi_\text{ref})$ and receives no gradient. As in the
official code's default, $z_0 = \max\big(0, \mathrm{mean}_\text{batch}\, g_\theta\big)$, detached; the
``mismatched`` option uses the KTO paper's estimator instead, $g_\theta$ evaluated with each image paired
with another image's prompt. ``beta`` follows the official code (``--beta_dpo``, default 1000, on
per-pixel *mean* errors, without Diffusion-DPO's factor 1/2). Minibatches draw desirable images with
probability ``desirable_fraction`` (the official weighted sampler's ``positive_ratio`` 0.8).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch

from reference_impls.algorithms.diffusion_dpo import (
    DiffusionDPOConfig,
    PreferenceMonitor,
    denoising_errors,
    make_bank,
    noised,
    sample_noise_levels,
)
from reference_impls.models.policy import Conditioning
from reference_impls.rewards.preferences import SyntheticLabeller
from reference_impls.training.method import Method, StepContext


@dataclass
class DiffusionKTOConfig(DiffusionDPOConfig):
    """Diffusion-KTO's settings: the preference bank's images with per-image like labels, and the utility."""

    beta: float = 1000.0
    """beta of the official code: h = sigmoid(beta * sign * (g - z0)) with g on per-pixel mean errors."""
    like_threshold: float = 0.9
    """tau of the labels: an image is liked with probability sigmoid((score - tau) / labeller temperature)."""
    like_quantile: float = 0.0
    """If > 0, tau is this quantile of the bank's scores instead of --like-threshold (for any reward's scale)."""
    lambda_desirable: float = 1.0
    """lambda_D: weight of desirable images in the loss."""
    lambda_undesirable: float = 1.0
    """lambda_U: weight of undesirable images in the loss."""
    desirable_fraction: float = 0.8
    """Expected fraction of desirable images per minibatch (weighted sampling with replacement)."""
    reference_point: str = "batch"
    """z0: batch (max(0, batch mean of g), official default), mismatched (KTO paper: g with shifted prompts), zero."""

    def validate(self) -> None:
        super().validate()
        if self.reference_point not in ("batch", "mismatched", "zero"):
            raise ValueError(f"--reference-point must be batch, mismatched or zero, got {self.reference_point!r}")
        if not 0 <= self.like_quantile < 1:
            raise ValueError(f"--like-quantile must be in [0, 1), got {self.like_quantile}")
        if not 0 < self.desirable_fraction < 1:
            raise ValueError(f"--desirable-fraction must be in (0, 1), got {self.desirable_fraction}")


PRESETS: dict[str, dict[str, Any]] = {
    # JPEG compressibility (as DDPO's smoke run), the best 30% of the bank's images liked (before noise). At
    # lr 1e-4 the paired reward gain over the base is +0.06 in 8 updates; at 3e-5 it was +0.01 (the page).
    "smoke": dict(steps=8, batch_size=16, num_pairs=32, bank_steps=10, num_steps=6, learning_rate=1e-4,
                  reward="jpeg-compressibility", labeller_temperature=0.02, like_quantile=0.7, eval_every=0,
                  eval_prompts=8, checkpoint_every=4, prompts="easy"),
    # Classes drawn half and half, not the official 0.8: the bank is the base's own images, and drawing liked
    # ones 80% of the time makes the loss mostly "denoise your own samples better", which lowered held-out
    # accuracy even with random labels (the page's controls). 1,024 pairs and 120 updates: the measured row.
    "cpu": dict(steps=120, batch_size=32, num_pairs=1024, bank_steps=10, num_steps=10, learning_rate=1e-5,
                desirable_fraction=0.5, eval_every=20, eval_prompts=64, checkpoint_every=20),
    "gpu": dict(steps=500, batch_size=64, num_pairs=4096, bank_steps=50, bank_guidance_scale=5.0,
                num_steps=20, learning_rate=1e-5, eval_every=50, eval_prompts=256, checkpoint_every=50,
                guidance_scale=5.0),
}


@dataclass
class KTOStats:
    """Diagnostics of one Diffusion-KTO minibatch."""

    reference_point: float
    """z0 used in the utility."""
    accuracy: float
    """Fraction of images on the right side of the reference point (sign * (g - z0) > 0)."""
    utility: float
    """Mean h (before the lambda weights)."""
    implicit_desirable: float
    """Mean g over desirable images (nan-free: 0 if none)."""
    implicit_undesirable: float
    """Mean g over undesirable images."""


# --8<-- [start:loss]
def kto_reference_point(implicit: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean g), detached: the official code's estimate of KL(pi_theta || pi_ref)."""
    return implicit.mean().detach().clamp(min=0)


def diffusion_kto_loss(err: torch.Tensor, ref_err: torch.Tensor, desirable: torch.Tensor, beta: float,
                       reference_point: torch.Tensor | float, lambda_desirable: float = 1.0,
                       lambda_undesirable: float = 1.0) -> tuple[torch.Tensor, KTOStats]:
    """mean lambda_s (1 - sigmoid(beta s (g - z0))),  g = -(err - ref_err),  s = +1 / -1."""
    implicit = -(err - ref_err)
    sign = desirable.float() * 2 - 1
    z0 = torch.as_tensor(reference_point, dtype=implicit.dtype, device=implicit.device).detach()
    inside = beta * sign * (implicit - z0)
    utility = torch.sigmoid(inside)
    weight = torch.where(desirable, torch.full_like(utility, lambda_desirable),
                         torch.full_like(utility, lambda_undesirable))
    loss = (weight * (1 - utility)).mean()
    with torch.no_grad():
        part = lambda mask: float(implicit[mask].mean()) if bool(mask.any()) else 0.0  # noqa: E731
        stats = KTOStats(float(z0), float((inside > 0).float().mean()), float(utility.mean()),
                         part(desirable), part(~desirable))
    return loss, stats
# --8<-- [end:loss]


def class_draw_weights(desirable: np.ndarray, desirable_fraction: float) -> np.ndarray:
    """Per-image draw probabilities giving desirable images total probability ``desirable_fraction``.

    The official weighted sampler; if the bank holds only one class, every image is equally likely.
    """
    n_pos, n_neg = int(desirable.sum()), int((~desirable).sum())
    if n_pos and n_neg:
        weights = np.where(desirable, desirable_fraction / n_pos, (1 - desirable_fraction) / n_neg)
    else:
        weights = np.full(len(desirable), 1.0 / len(desirable))
    return weights / weights.sum()


class DiffusionKTO(Method):
    """Diffusion-KTO: per-image binary feedback, KTO utility with a batch reference point."""

    name: ClassVar[str] = "diffusion-kto"
    bib_key: ClassVar[str] = "li2024diffusionkto"
    config_class: ClassVar[type] = DiffusionKTOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    config: DiffusionKTOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        config = self.config
        self.reference = self.frozen_copy()
        self.labeller = SyntheticLabeller(config.reward, config.labeller_temperature, config.tie_margin,
                                          like_threshold=config.like_threshold, seed=config.bank_seed)
        self.bank = make_bank(self, config, self.labeller)
        if config.like_quantile > 0:
            tau = float(torch.quantile(self.bank.scores.flatten().double(), config.like_quantile))
            self.labeller = replace(self.labeller, like_threshold=tau)
        self.data = self.bank.likes(self.labeller)
        self.draw_weights = class_draw_weights(self.data.desirable.numpy(), config.desirable_fraction)
        self.monitor = PreferenceMonitor(self, self.bank.prompts[: config.monitor_samples], seed=config.bank_seed + 1)

    def errors(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning, target: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image errors of the model (with gradient) and of the frozen reference."""
        err = denoising_errors(self.policy, x_t, timestep, cond, target)
        with torch.no_grad():
            ref_err = denoising_errors(self.reference, x_t, timestep, cond, target)
        return err, ref_err

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config, policy, data = self.config, self.policy, self.data
        # 1. A minibatch of labelled images, desirable ones drawn with probability desirable_fraction.
        rows = torch.as_tensor(ctx.rng.choice(len(data), size=config.batch_size, replace=True, p=self.draw_weights))
        x0 = data.states[rows].to(policy.device)
        desirable = data.desirable[rows].to(policy.device)
        prompts = [data.prompts[int(i)] for i in rows]
        with torch.no_grad():
            cond = policy.encode_text(prompts).detach()
        # 2. Each image noised with its own timestep and noise; implicit reward g = -(err - ref_err).
        level = sample_noise_levels(policy, len(rows), ctx.generator)
        noise = torch.randn(x0.shape, generator=ctx.generator).to(policy.device)
        x_t, timestep, target = noised(policy, x0, noise, level)
        err, ref_err = self.errors(x_t, timestep, cond, target)
        # 3. The reference point (no gradient), then KTO's utility.
        if config.reference_point == "batch":
            z0 = kto_reference_point(-(err - ref_err))
        elif config.reference_point == "mismatched":  # the same noised images under another image's prompt
            with torch.no_grad():
                shifted = Conditioning(torch.roll(cond.hidden_states, 1, 0),
                                       None if cond.pooled is None else torch.roll(cond.pooled, 1, 0))
                mis_err, mis_ref = self.errors(x_t, timestep, shifted, target)
            z0 = kto_reference_point(-(mis_err - mis_ref))
        else:
            z0 = torch.zeros(())
        loss, stats = diffusion_kto_loss(err, ref_err, desirable, config.beta, z0, config.lambda_desirable,
                                         config.lambda_undesirable)
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {
            **self.monitor(),
            "loss": float(loss.detach()),
            "kto_accuracy": stats.accuracy,
            "utility": stats.utility,
            "reference_point": stats.reference_point,
            "implicit_desirable": stats.implicit_desirable,
            "implicit_undesirable": stats.implicit_undesirable,
            "desirable_fraction": float(desirable.float().mean()),
            "grad_norm": grad_norm,
            "samples": len(rows),
        }
