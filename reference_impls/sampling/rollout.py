"""Rollouts that record the whole trajectory a policy-gradient method needs.

``rollout`` walks a :class:`~reference_impls.models.policy.GenerativePolicy` from noise to data with one
of four samplers and records states, timesteps, per-step log-probabilities and conditioning.
``transition_log_prob`` recomputes the log-probability of stored transitions under the current weights:
with unchanged weights it returns exactly the recorded values (the PPO ratio is 1 at the first inner step).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from reference_impls.models.policy import Conditioning, GenerativePolicy
from reference_impls.sampling.gaussian import Reduction
from reference_impls.sampling.steps import (
    StepOutput,
    ddim_step,
    ddpm_step,
    flow_cps_step,
    flow_ode_step,
    flow_sde_step,
)

SamplerName = Literal["ddim", "ddpm", "sde", "cps", "ode"]
SAMPLERS_BY_KIND: dict[str, tuple[str, ...]] = {"diffusion": ("ddim", "ddpm"), "flow": ("sde", "cps", "ode")}


@dataclass(frozen=True)
class SamplerConfig:
    """How to walk from noise to data."""

    name: SamplerName = "ddim"
    """ddim or ddpm for epsilon models; sde or ode for flow (velocity) models."""
    num_steps: int = 20
    """Denoising steps."""
    eta: float = 1.0
    """DDIM stochasticity: 0 deterministic, 1 the DDPM posterior variance (DDPO uses 1.0)."""
    noise_level: float = 0.7
    """Flow-GRPO's a in sigma_t = a sqrt(s / (1 - s)) for the flow SDE."""
    guidance_scale: float = 1.0
    """Classifier-free guidance weight; 1.0 means one conditional denoiser call per step."""
    reduction: Reduction = "mean"
    """Reduce per-pixel log-densities by mean (the public codes' convention) or sum."""
    stochastic_window: tuple[int, int] | None = None
    """Steps [start, end) that sample stochastically; the others are deterministic (eta=0 / ODE).
    None: every step is stochastic for ddim/ddpm/sde, none for ode. MixGRPO slides this window."""

    def validate_for(self, kind: str) -> None:
        valid = SAMPLERS_BY_KIND[kind]
        if self.name not in valid:
            raise ValueError(f"sampler {self.name!r} does not fit a {kind} model; valid samplers: {', '.join(valid)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")


@dataclass
class Schedule:
    """Per-step quantities of the chosen sampler, index i = step from noise (0) to data (T-1)."""

    model_timesteps: torch.Tensor
    """(T,) the timestep fed to the denoiser at step i."""
    stochastic: torch.Tensor
    """(T,) bool: does step i sample (and so have a log-probability)?"""
    alpha_bar: torch.Tensor | None = None
    """(T,) cumulative alpha at step i (diffusion)."""
    alpha_bar_prev: torch.Tensor | None = None
    """(T,) cumulative alpha at the step's target (diffusion)."""
    sigma: torch.Tensor | None = None
    """(T,) noise level s at step i (flow), 1 = pure noise."""
    sigma_next: torch.Tensor | None = None
    """(T,) noise level after step i (flow)."""
    sigma_cap: torch.Tensor | None = None
    """Value used for s in the SDE coefficient where s = 1 (flow)."""
    clip_x0: float | None = None
    """Clamp the predicted x0 to [-clip_x0, clip_x0] (diffusion; the scheduler's clip_sample)."""

    @property
    def num_steps(self) -> int:
        return int(self.model_timesteps.shape[0])


def make_schedule(policy: GenerativePolicy, config: SamplerConfig) -> Schedule:
    config.validate_for(policy.kind)
    steps = config.num_steps
    if config.stochastic_window is None:
        stochastic = torch.full((steps,), config.name != "ode")
        if config.name == "cps":
            stochastic[-1] = False  # its std s' sin(a pi / 2) is 0 at the last step, s' = 0: no log-probability
    else:
        start, end = config.stochastic_window
        stochastic = torch.zeros(steps, dtype=torch.bool)
        stochastic[max(0, start) : min(steps, end)] = True
    scheduler = policy.scheduler
    train_steps = int(scheduler.config.num_train_timesteps)
    if policy.kind == "diffusion":
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)
        # "trailing" spacing: the first step starts from t = T-1 (pure noise under the cosine schedule).
        stride = train_steps / steps
        timesteps = (torch.arange(steps, 0, -1, dtype=torch.float64) * stride).round().long() - 1
        previous = torch.cat([timesteps[1:], timesteps.new_full((1,), -1)])
        alpha_bar = alphas_cumprod[timesteps]
        # As Stable Diffusion's schedulers (set_alpha_to_one=False), the last step targets alpha_bar[0],
        # so with eta > 0 every step is stochastic and has a log-probability.
        alpha_bar_prev = torch.where(previous >= 0, alphas_cumprod[previous.clamp(min=0)], alphas_cumprod[0])
        clip = float(scheduler.config.clip_sample_range) if getattr(scheduler.config, "clip_sample", False) else None
        return Schedule(timesteps.float(), stochastic, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev,
                        clip_x0=clip)
    shift = float(getattr(scheduler.config, "shift", 1.0))
    base = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
    sigmas = shift * base / (1 + (shift - 1) * base)
    return Schedule(
        model_timesteps=sigmas[:-1] * train_steps,
        stochastic=stochastic,
        sigma=sigmas[:-1],
        sigma_next=sigmas[1:],
        sigma_cap=sigmas[1] if steps > 1 else torch.tensor(0.5),
    )


@dataclass
class Trajectory:
    """Everything a policy-gradient update needs about a batch of sampled images."""

    prompts: list[str]
    states: torch.Tensor
    """(B, T+1, C, H, W): x at every step, noise first, final sample last."""
    log_probs: torch.Tensor
    """(B, T) log-probability of each transition when sampled (0 where the step is deterministic)."""
    schedule: Schedule
    config: SamplerConfig
    cond: Conditioning
    uncond: Conditioning | None
    images: torch.Tensor
    """(B, 3, H, W) decoded final samples in [0, 1]."""
    extras: dict = field(default_factory=dict)
    step_stds: torch.Tensor | None = None
    """(T,) noise std of each step when sampled (largest over the batch; 0 for deterministic steps)."""

    @property
    def batch_size(self) -> int:
        return int(self.states.shape[0])

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    def subset(self, index: torch.Tensor | list[int]) -> Trajectory:
        index = torch.as_tensor(index, dtype=torch.long)
        return replace(
            self,
            prompts=[self.prompts[int(i)] for i in index],
            states=self.states[index],
            log_probs=self.log_probs[index],
            cond=self.cond.take(index),
            uncond=None if self.uncond is None else self.uncond.take(index),
            images=self.images[index],
        )


def guided_prediction(
    policy: GenerativePolicy,
    x: torch.Tensor,
    model_timestep: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance_scale: float,
) -> torch.Tensor:
    """Denoiser output with classifier-free guidance: u + w (c - u); one call when w == 1."""
    batch = x.shape[0]
    timestep = model_timestep.expand(batch) if model_timestep.dim() == 0 else model_timestep
    if guidance_scale == 1.0 or uncond is None:
        return policy.predict(x, timestep, cond)
    both = policy.predict(torch.cat([x, x]), torch.cat([timestep, timestep]), Conditioning.cat([uncond, cond]))
    unconditional, conditional = both.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


def _per_sample(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device, like.dtype)[index].view(-1, *([1] * (like.dim() - 1)))


def apply_step(
    policy: GenerativePolicy,
    config: SamplerConfig,
    schedule: Schedule,
    step_index: torch.Tensor,
    x: torch.Tensor,
    model_output: torch.Tensor,
    *,
    next_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One sampler step for a batch whose samples may sit at different steps (``step_index``: (B,))."""
    stochastic = bool(schedule.stochastic[step_index].all())
    deterministic = not bool(schedule.stochastic[step_index].any())
    if not (stochastic or deterministic):
        raise ValueError("a batch must not mix stochastic and deterministic steps")
    if policy.kind == "diffusion":
        a_t = _per_sample(schedule.alpha_bar, step_index, x)
        a_prev = _per_sample(schedule.alpha_bar_prev, step_index, x)
        if config.name == "ddpm" and stochastic:
            return ddpm_step(model_output, x, a_t, a_prev, next_state=next_state, generator=generator,
                             noise=noise, reduction=config.reduction, clip_x0=schedule.clip_x0)
        eta = config.eta if stochastic else 0.0
        return ddim_step(model_output, x, a_t, a_prev, eta, next_state=next_state, generator=generator,
                         noise=noise, reduction=config.reduction, clip_x0=schedule.clip_x0)
    sigma = _per_sample(schedule.sigma, step_index, x)
    sigma_next = _per_sample(schedule.sigma_next, step_index, x)
    if not stochastic:
        return flow_ode_step(model_output, x, sigma, sigma_next, next_state=next_state)
    if config.name == "cps":
        return flow_cps_step(model_output, x, sigma, sigma_next, config.noise_level, next_state=next_state,
                             generator=generator, noise=noise, reduction=config.reduction)
    return flow_sde_step(model_output, x, sigma, sigma_next, config.noise_level,
                         sigma_cap=schedule.sigma_cap.to(x.device, x.dtype), next_state=next_state,
                         generator=generator, noise=noise, reduction=config.reduction)


def encode_prompts(policy: GenerativePolicy, prompts: list[str], config: SamplerConfig
                   ) -> tuple[Conditioning, Conditioning | None]:
    with torch.no_grad():
        cond = policy.encode_text(list(prompts)).detach()
        uncond = policy.encode_text([""] * len(prompts)).detach() if config.guidance_scale != 1.0 else None
    return cond, uncond


def initial_noise(policy: GenerativePolicy, batch: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn((batch, *policy.latent_shape), generator=generator, device=policy.device)


def _step_noise(policy: GenerativePolicy, schedule: Schedule, index: int, shape: tuple[int, ...],
                generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor | None:
    """The standard normal noise of step ``index`` for the whole batch, or None where the step draws none.

    Diffusion steps draw at every step (a deterministic DDIM step multiplies its draw by 0) and flow steps
    only where the SDE is on: the same stream the step functions would draw themselves.
    """
    if policy.kind != "diffusion" and not bool(schedule.stochastic[index]):
        return None
    return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)


@torch.no_grad()
def rollout(
    policy: GenerativePolicy,
    prompts: list[str],
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
    progress: bool = False,
    rows: slice | None = None,
) -> Trajectory:
    """Sample images for ``prompts`` and record the trajectory (no gradients).

    ``rows`` samples only that block of the batch (one process's share in data-parallel training). Every
    random draw is still made for the whole batch and then sliced, so the block's images are exactly the
    ones a single process sampling all of ``prompts`` would produce.
    """
    schedule = make_schedule(policy, config)
    rows = rows or slice(None)
    batch = len(prompts)
    prompts = list(prompts)[rows]
    cond, uncond = encode_prompts(policy, prompts, config)
    x = initial_noise(policy, batch, generator) if noise is None else noise.to(policy.device)
    x = x[rows]
    states = [x]
    log_probs = torch.zeros(len(prompts), schedule.num_steps, device=x.device)
    step_stds = torch.zeros(schedule.num_steps)
    steps = range(schedule.num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        index = torch.full((len(prompts),), i, dtype=torch.long)
        output = guided_prediction(policy, x, schedule.model_timesteps[i].to(x.device), cond, uncond,
                                   config.guidance_scale)
        step_noise = _step_noise(policy, schedule, i, (batch, *x.shape[1:]), generator, x)
        step = apply_step(policy, config, schedule, index, x, output,
                          noise=None if step_noise is None else step_noise[rows])
        if step.log_prob is not None:
            log_probs[:, i] = step.log_prob
        step_stds[i] = float(torch.as_tensor(step.std).max())
        x = step.next_state
        states.append(x)
    images = policy.decode(x)
    return Trajectory(list(prompts), torch.stack(states, dim=1), log_probs, schedule, config, cond, uncond, images,
                      step_stds=step_stds)


def transition_log_prob(
    policy: GenerativePolicy,
    trajectory: Trajectory,
    step_index: torch.Tensor | int,
    guidance_scale: float | None = None,
) -> StepOutput:
    """Recompute the Gaussian of stored transitions x_i -> x_{i+1} under the current weights.

    ``step_index`` is one step for the whole batch or a (B,) tensor (DDPO shuffles steps per sample).
    The result's ``log_prob`` is differentiable in the denoiser's parameters.
    """
    batch = trajectory.batch_size
    index = torch.as_tensor(step_index, dtype=torch.long)
    if index.dim() == 0:
        index = index.expand(batch)
    rows = torch.arange(batch)
    x = trajectory.states[rows, index]
    next_state = trajectory.states[rows, index + 1]
    timesteps = trajectory.schedule.model_timesteps.to(x.device)[index]
    scale = trajectory.config.guidance_scale if guidance_scale is None else guidance_scale
    output = guided_prediction(policy, x, timesteps, trajectory.cond, trajectory.uncond, scale)
    step = apply_step(policy, trajectory.config, trajectory.schedule, index, x, output, next_state=next_state)
    step.model_output = output
    return step
