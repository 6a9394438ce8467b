"""One stochastic denoising step per sampler family, with the Gaussian it samples from.

Each step maps the current state x_t (and the denoiser's output at x_t) to the mean and std of the
Gaussian policy over the next state, samples it unless the next state is given (recomputing the
log-probability of a stored transition), and returns the log-probability. Time runs from noise to data.

* ``ddim_step``: DDIM with stochasticity ``eta`` (Song et al., 2021); eta=1 is the DDPM posterior on the
  strided chain; used by DDPO (Black et al., 2023).
* ``ddpm_step``: the ancestral DDPM posterior q(x_{t'} | x_t, x0_hat) (Ho et al., 2020).
* ``flow_sde_step``: the SDE of Flow-GRPO (Liu et al., 2025) with the same marginals as the flow ODE;
  noise level ``a`` scales sigma_t = a * sqrt(s / (1 - s)).
* ``flow_cps_step``: coefficients-preserving sampling (Wang & Yu, 2025, ``wang2025cps``), a DDIM-like
  stochastic step for flow models whose sample keeps the (1 - s, s) coefficients of x0 and noise exactly.
* ``flow_ode_step``: the deterministic Euler step of the probability-flow ODE (no log-probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference_impls.sampling.gaussian import Reduction, gaussian_log_prob


@dataclass
class StepOutput:
    """The result of one step of a stochastic policy."""

    next_state: torch.Tensor
    """x_{t-1}: sampled, or the stored one passed in."""
    mean: torch.Tensor
    """Mean of the Gaussian over the next state (differentiable in the denoiser output)."""
    std: torch.Tensor
    """Standard deviation (a scalar tensor per step; zero for the ODE step)."""
    log_prob: torch.Tensor | None
    """(B,) log-density of next_state under N(mean, std^2), reduced over pixels; None if std == 0."""
    predicted_x0: torch.Tensor
    """The denoiser's estimate of the clean sample at this step (used by ReFL and for display)."""
    model_output: torch.Tensor | None = None
    """The (guided) denoiser output the step was computed from, when the caller kept it (epsilon or
    velocity): DPOK's official regulariser compares these directly."""


def _has_noise(std: torch.Tensor) -> bool:
    return bool((std > 0).all())


def _sample_or_use(mean: torch.Tensor, std: torch.Tensor, next_state: torch.Tensor | None,
                   generator: torch.Generator | None, noise: torch.Tensor | None) -> torch.Tensor:
    if next_state is not None:
        return next_state
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    eta: float = 1.0,
    *,
    next_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    clip_x0: float | None = None,
) -> StepOutput:
    """DDIM step from x_t to x_{t'} given the predicted noise (epsilon parametrisation).

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sigma  = eta * sqrt((1 - a_t') / (1 - a_t)) * sqrt(1 - a_t / a_t')
    mean   = sqrt(a_t') x0_hat + sqrt(1 - a_t' - sigma^2) eps
    """
    eps = model_output
    x0_hat = (x_t - (1 - alpha_bar_t).sqrt() * eps) / alpha_bar_t.sqrt()
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
        eps = (x_t - alpha_bar_t.sqrt() * x0_hat) / (1 - alpha_bar_t).sqrt()
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    std = eta * variance.clamp(min=0).sqrt()
    direction = (1 - alpha_bar_prev - std**2).clamp(min=0).sqrt() * eps
    mean = alpha_bar_prev.sqrt() * x0_hat + direction
    sample = _sample_or_use(mean, std, next_state, generator, noise)
    log_prob = gaussian_log_prob(sample.detach(), mean, std, reduction) if _has_noise(std) else None
    return StepOutput(sample, mean, std, log_prob, x0_hat)


def ddpm_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar_t: torch.Tensor,
    alpha_bar_prev: torch.Tensor,
    *,
    next_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reduction: Reduction = "mean",
    clip_x0: float | None = None,
) -> StepOutput:
    """Ancestral step with the posterior q(x_t' | x_t, x0_hat) of the (strided) forward process.

    With beta = 1 - a_t / a_t':
    mean = sqrt(a_t') beta / (1 - a_t) x0_hat + sqrt(1 - beta) (1 - a_t') / (1 - a_t) x_t
    var  = beta (1 - a_t') / (1 - a_t)
    """
    x0_hat = (x_t - (1 - alpha_bar_t).sqrt() * model_output) / alpha_bar_t.sqrt()
    if clip_x0 is not None:
        x0_hat = x0_hat.clamp(-clip_x0, clip_x0)
    beta = 1 - alpha_bar_t / alpha_bar_prev
    coef_x0 = alpha_bar_prev.sqrt() * beta / (1 - alpha_bar_t)
    coef_xt = (1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    mean = coef_x0 * x0_hat + coef_xt * x_t
    std = (beta * (1 - alpha_bar_prev) / (1 - alpha_bar_t)).clamp(min=0).sqrt()
    sample = _sample_or_use(mean, std, next_state, generator, noise)
    log_prob = gaussian_log_prob(sample.detach(), mean, std, reduction) if _has_noise(std) else None
    return StepOutput(sample, mean, std, log_prob, x0_hat)


def flow_sde_std(sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float,
                 sigma_cap: torch.Tensor) -> torch.Tensor:
    """Std of the Flow-GRPO SDE step: a * sqrt(s / (1 - s)) * sqrt(s - s_next).

    At s = 1 the diffusion coefficient diverges; like Flow-GRPO we evaluate it at ``sigma_cap``
    (the second sigma of the schedule) there.
    """
    s = torch.where(sigma >= 1, sigma_cap, sigma)
    return noise_level * (s / (1 - s)).sqrt() * (sigma - sigma_next).sqrt()


def flow_sde_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float = 0.7,
    *,
    sigma_cap: torch.Tensor | None = None,
    next_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    """Euler-Maruyama step of the reverse SDE that shares the flow ODE's marginals.

    With x_s = (1 - s) x0 + s eps and v = eps - x0, the score is -(x + (1 - s) v) / s, so
    mean = x + [v + g^2 / (2 s) (x + (1 - s) v)] (s_next - s),  g = a sqrt(s / (1 - s)),
    std  = g sqrt(s - s_next).
    """
    sigma_cap = sigma if sigma_cap is None else sigma_cap
    dt = sigma_next - sigma  # negative: time runs from noise (1) to data (0)
    s = torch.where(sigma >= 1, sigma_cap, sigma)
    g2 = noise_level**2 * s / (1 - s)
    mean = x_t + (velocity + g2 / (2 * s) * (x_t + (1 - s) * velocity)) * dt
    std = flow_sde_std(sigma, sigma_next, noise_level, sigma_cap)
    sample = _sample_or_use(mean, std, next_state, generator, noise)
    log_prob = gaussian_log_prob(sample.detach(), mean, std, reduction) if _has_noise(std) else None
    x0_hat = x_t - sigma * velocity
    return StepOutput(sample, mean, std, log_prob, x0_hat)


def flow_cps_step(
    velocity: torch.Tensor,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float = 0.7,
    *,
    next_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> StepOutput:
    r"""Coefficients-preserving step: from x0_hat = x - s v and eps_hat = x + (1 - s) v,

    $$ x_{s'} = (1 - s')\,\hat x_0 + \sqrt{s'^2 - \sigma^2}\,\hat\epsilon + \sigma\,\epsilon,\qquad
       \sigma = s' \sin(a \pi / 2), $$

    so the noise in the next state has total variance s'^2, what the flow's marginal at s' has. The
    Euler-Maruyama SDE step adds more noise than a coarse step removes, and with few steps its samples keep
    noise the model never saw in training; this step does not. At s' = 0 it is deterministic.
    """
    std = sigma_next * torch.sin(torch.as_tensor(noise_level * torch.pi / 2, dtype=x_t.dtype, device=x_t.device))
    x0_hat = x_t - sigma * velocity
    eps_hat = x_t + (1 - sigma) * velocity
    mean = (1 - sigma_next) * x0_hat + (sigma_next**2 - std**2).clamp(min=0).sqrt() * eps_hat
    sample = _sample_or_use(mean, std, next_state, generator, noise)
    log_prob = gaussian_log_prob(sample.detach(), mean, std, reduction) if _has_noise(std) else None
    return StepOutput(sample, mean, std, log_prob, x0_hat)


def flow_ode_step(velocity: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor,
                  sigma_next: torch.Tensor, *, next_state: torch.Tensor | None = None) -> StepOutput:
    """Deterministic Euler step x + v (s_next - s): a policy with zero variance, so no log-prob."""
    mean = x_t + velocity * (sigma_next - sigma)
    sample = mean if next_state is None else next_state
    return StepOutput(sample, mean, torch.zeros((), dtype=x_t.dtype, device=x_t.device), None,
                      x_t - sigma * velocity)
