r"""A sampling chain you can differentiate: the shared core of the reward-backpropagation methods.

ReFL, DRaFT and AlignProp all write the sampler as a differentiable map from noise to image,
$x_0 = g_\theta(x_T, c)$, with $x_{i+1} = f_\theta(x_i, i, c, z_i)$ one sampler step (steps are indexed
from noise, $i = 0$, to data, $i = T-1$; $z_i$ is the step's injected noise, multiplied by zero for
DDIM with $\eta = 0$ and the flow ODE). They differ only in where the gradient is allowed to flow:

* **truncation** (DRaFT-K, AlignProp): steps before ``grad_from`` run without a graph, so the state
  entering step ``grad_from`` is a constant and only the last $T - \text{grad\_from}$ network calls
  receive credit. ``grad_from`` may differ per trajectory (AlignProp's randomised truncation): rows
  whose truncation point is not reached yet have their network output detached.
* **early stop** (ReFL): ``stop_after`` ends the chain after that step, and the step's one-shot
  clean-image prediction $\hat x_0$ (``StepOutput.predicted_x0``) stands in for the final image.
* **checkpointing** (AlignProp, DRaFT at scale): each denoiser call with a graph is wrapped in
  ``torch.utils.checkpoint``, storing only its inputs and recomputing its activations in the backward
  pass, so memory grows with the number of steps times the size of one state, not of one network.

Noise is drawn in the same order whatever the truncation, so for a fixed generator the forward values
are identical to :func:`reference_impls.sampling.rollout`'s (what a test checks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from reference_impls.models.policy import Conditioning, GenerativePolicy
from reference_impls.sampling import (
    SamplerConfig,
    Schedule,
    StepOutput,
    apply_step,
    guided_prediction,
    make_schedule,
)
from reference_impls.sampling.rollout import encode_prompts, initial_noise
from reference_impls.training.config import TrainConfig


@dataclass
class RewardBackpropConfig(TrainConfig):
    """Settings the reward-backpropagation methods share (ReFL, DRaFT, AlignProp)."""

    reward: str = "shapes-learned"
    """Reward name; must be differentiable (prompt-colour, shapes-learned)."""
    sampler: str = ""
    """Training sampler: ddim or ddpm (diffusion), ode or sde (flow); empty picks ddim or ode."""
    eta: float = 0.0
    """DDIM stochasticity of training rollouts; the injected noise is reparameterised, so any eta works."""


@dataclass
class GradSample:
    """The end of a (possibly truncated, possibly early-stopped) differentiable sampling run."""

    final: torch.Tensor
    """(B, C, H, W) or (B, C, F, H, W) state after the last step that ran (x_0 for a full run); carries the graph."""
    predicted_x0: torch.Tensor
    """The last step's one-shot clean-sample estimate (ReFL's x0_hat), shaped like ``final``."""
    grad_from: torch.Tensor
    """(B,) index of the first step whose network call is differentiated (T = none)."""
    last_step: int
    """Index of the last step that ran (T-1 unless ``stop_after`` ended the chain early)."""
    schedule: Schedule
    config: SamplerConfig
    cond: Conditioning
    uncond: Conditioning | None

    @property
    def grad_steps(self) -> torch.Tensor:
        """(B,) how many network calls of each trajectory receive gradient."""
        return (self.last_step + 1 - self.grad_from).clamp(min=0)


def training_sampler(policy: GenerativePolicy, config: RewardBackpropConfig) -> SamplerConfig:
    """The sampler a reward-backprop method trains through; an empty name picks DDIM or the flow ODE."""
    name = config.sampler or ("ddim" if policy.kind == "diffusion" else "ode")
    return SamplerConfig(name=name, num_steps=config.num_steps, eta=config.eta,
                         guidance_scale=config.guidance_scale)


# --8<-- [start:denoise]
def _denoise(policy: GenerativePolicy, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
             uncond: Conditioning | None, guidance_scale: float, use_checkpoint: bool) -> torch.Tensor:
    """One (guided) denoiser call; with ``use_checkpoint`` its activations are recomputed in backward."""
    if not use_checkpoint:
        return guided_prediction(policy, x, timestep, cond, uncond, guidance_scale)
    return checkpoint(lambda state: guided_prediction(policy, state, timestep, cond, uncond, guidance_scale),
                      x, use_reentrant=False)
# --8<-- [end:denoise]


# --8<-- [start:sample_with_grad]
def sample_with_grad(
    policy: GenerativePolicy,
    prompts: list[str],
    sampler: SamplerConfig,
    generator: torch.Generator | None,
    grad_from_step: int | torch.Tensor,
    *,
    checkpointing: bool = False,
    stop_after: int | None = None,
    noise: torch.Tensor | None = None,
) -> GradSample:
    """Run the sampler, keeping the autograd graph from step ``grad_from_step`` on.

    ``grad_from_step``: an int for the whole batch or a (B,) tensor per trajectory; 0 differentiates
    every step (full DRaFT), T - K the last K (DRaFT-K), T none. ``stop_after``: index of the last step
    to run (ReFL); None runs all T steps.
    """
    schedule = make_schedule(policy, sampler)
    steps = schedule.num_steps
    last = steps - 1 if stop_after is None else int(stop_after)
    if not 0 <= last < steps:
        raise ValueError(f"stop_after must be in [0, {steps - 1}], got {stop_after}")
    batch = len(prompts)
    grad_from = torch.as_tensor(grad_from_step, dtype=torch.long).expand(batch).clone()
    cond, uncond = encode_prompts(policy, prompts, sampler)
    x = initial_noise(policy, batch, generator) if noise is None else noise.to(policy.device)
    output: StepOutput | None = None
    for i in range(last + 1):
        track = (grad_from <= i).to(x.device)  # rows whose step i is differentiated
        index = torch.full((batch,), i, dtype=torch.long)
        timestep = schedule.model_timesteps[i].to(x.device)
        with torch.set_grad_enabled(bool(track.any()) and torch.is_grad_enabled()):
            rows = track.view(-1, *([1] * (x.dim() - 1)))  # broadcast over (C, H, W) or (C, F, H, W)
            if not track.all():  # stop-gradient for the rows still before their truncation point
                x = torch.where(rows, x, x.detach())
            model_output = _denoise(policy, x, timestep, cond, uncond, sampler.guidance_scale,
                                    checkpointing and bool(track.any()))
            if not track.all():
                model_output = torch.where(rows, model_output, model_output.detach())
            output = apply_step(policy, sampler, schedule, index, x, model_output, generator=generator)
        x = output.next_state
    assert output is not None
    return GradSample(x, output.predicted_x0, grad_from, last, schedule, sampler, cond, uncond)
# --8<-- [end:sample_with_grad]

