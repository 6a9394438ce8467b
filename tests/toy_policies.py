"""Policies whose denoiser is exact: Gaussian data, so every marginal of the noising process is known.

Data x0 ~ N(m, diag(s0^2)) on a (D, 1, 1) latent and noise eps ~ N(0, I), independent.

* Flow matching: x_s = (1 - s) x0 + s eps has mean (1 - s) m and variance V = (1 - s)^2 s0^2 + s^2, with
  Cov(x0, x_s) = (1 - s) s0^2 and Cov(eps, x_s) = s. Gaussian conditioning gives the exact velocity
  E[eps - x0 | x_s] = (s - (1 - s) s0^2) (x_s - (1 - s) m) / V - m.
* Diffusion: x_t = sqrt(a) x0 + sqrt(1 - a) eps has mean sqrt(a) m and variance V = a s0^2 + 1 - a, with
  Cov(eps, x_t) = sqrt(1 - a), so E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) m) / V.

Samplers walking these policies must reproduce N(m, s0^2) up to their discretisation error.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from reference_impls.models.policy import Conditioning, GenerativePolicy

TRAIN_TIMESTEPS = 1000


def _column(values: torch.Tensor | list[float]) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1)


def flow_marginal(mean: torch.Tensor, std: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of x_s = (1 - s) x0 + s eps."""
    return (1 - s) * mean, ((1 - s) ** 2 * std**2 + s**2).sqrt()


def exact_velocity(x: torch.Tensor, s: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    variance = (1 - s) ** 2 * std**2 + s**2
    return (s - (1 - s) * std**2) * (x - (1 - s) * mean) / variance - mean


def exact_epsilon(
    x: torch.Tensor, alpha_bar: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    variance = alpha_bar * std**2 + 1 - alpha_bar
    return (1 - alpha_bar).sqrt() * (x - alpha_bar.sqrt() * mean) / variance


class _Anchor(nn.Module):
    """Holds one parameter so that ``GenerativePolicy.device`` has something to look at."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))


def _zero_text(prompts: list[str]) -> Conditioning:
    return Conditioning(torch.zeros(len(prompts), 1, 1))


def gaussian_flow_policy(mean: list[float], std: list[float]) -> GenerativePolicy:
    """A flow policy whose velocity is exact for x0 ~ N(mean, diag(std^2)); latent shape (D, 1, 1)."""
    m, s0 = _column(mean), _column(std)

    def call(
        module: nn.Module, x: torch.Tensor, model_timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        s = (model_timestep.to(x.dtype) / TRAIN_TIMESTEPS).view(-1, 1, 1, 1)
        return exact_velocity(x, s, m, s0)

    return GenerativePolicy(
        name="toy-gaussian-flow",
        denoiser=_Anchor(),
        prediction="velocity",
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=1.0),
        encode_text=_zero_text,
        call_denoiser=call,
        latent_shape=(m.shape[0], 1, 1),
    )


def gaussian_diffusion_policy(
    mean: list[float], std: list[float], clip_sample: bool = False
) -> GenerativePolicy:
    """An epsilon policy, exact for x0 ~ N(mean, diag(std^2)) under the cosine schedule.

    ``clip_sample`` goes into the scheduler's config (diffusers' flag for clamping the predicted x0 to
    [-1, 1]); only data inside that range should set it.
    """
    m, s0 = _column(mean), _column(std)
    scheduler = DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=clip_sample,
        clip_sample_range=1.0,
    )
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)

    def call(
        module: nn.Module, x: torch.Tensor, model_timestep: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        a = alphas_cumprod[model_timestep.round().long()].view(-1, 1, 1, 1)
        # float64 inside: near t = T-1, alpha_bar ~ 2e-9 and x0_hat divides by sqrt(alpha_bar).
        return exact_epsilon(x.double(), a, m.double(), s0.double()).to(x.dtype)

    return GenerativePolicy(
        name="toy-gaussian-diffusion",
        denoiser=_Anchor(),
        prediction="epsilon",
        scheduler=scheduler,
        encode_text=_zero_text,
        call_denoiser=call,
        latent_shape=(m.shape[0], 1, 1),
    )
