"""One interface over every generator the samplers drive.

A :class:`GenerativePolicy` hides whether the denoiser is a tiny pixel-space UNet, the UNet of a
Stable Diffusion pipeline, or the transformer of a flow-matching pipeline. Samplers only need to
encode prompts, call the denoiser, and decode the final state to RGB.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import nn

Prediction = Literal["epsilon", "velocity"]


@dataclass
class Conditioning:
    """Encoded prompts: what the denoiser attends to, for the prompts and for the empty prompt."""

    hidden_states: torch.Tensor
    """(B, L, D) text features for cross-attention."""
    pooled: torch.Tensor | None = None
    """(B, D') pooled text features (flow transformers use them); None for UNets."""

    def take(self, index: torch.Tensor | slice) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled[index]
        return Conditioning(self.hidden_states[index], pooled)

    def repeat(self, n: int) -> Conditioning:
        pooled = None if self.pooled is None else self.pooled.repeat(n, *([1] * (self.pooled.dim() - 1)))
        return Conditioning(self.hidden_states.repeat(n, 1, 1), pooled)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        return Conditioning(torch.cat([c.hidden_states for c in items]), pooled)

    def detach(self) -> Conditioning:
        return Conditioning(self.hidden_states.detach(), None if self.pooled is None else self.pooled.detach())


@dataclass
class GenerativePolicy:
    """A denoiser viewed as a policy: state (x_t, t, prompt) -> the next, less noisy state."""

    name: str
    """Shipped name or checkpoint path, for logs."""
    denoiser: nn.Module
    """The trainable network (UNet2DConditionModel or a flow transformer)."""
    prediction: Prediction
    """What the denoiser outputs: the noise (DDPM/DDIM) or the velocity noise - x0 (flow matching)."""
    scheduler: object
    """A diffusers scheduler carrying the noise schedule (alphas_cumprod or sigmas)."""
    encode_text: Callable[[list[str]], Conditioning]
    """Prompt texts -> conditioning (tokenizer + text encoder, frozen)."""
    call_denoiser: Callable[[nn.Module, torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]
    """(denoiser module, x_t, model timestep, conditioning) -> raw model output. Taking the module as an
    argument lets the same policy evaluate a frozen reference copy (``with_denoiser``)."""
    latent_shape: tuple[int, int, int]
    """(C, H, W) of the state the sampler walks."""
    decode: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda x: ((x + 1) / 2).clamp(0, 1))
    """Final state -> RGB images in [0, 1], (B, 3, H', W'); differentiable."""
    text_encoder: nn.Module | None = None
    """Kept for LoRA/text-encoder methods; frozen by default."""
    world: str | None = None
    """Name of the synthetic world the model was pretrained on ("shapes"), None for real checkpoints."""
    autocast_dtype: torch.dtype | None = None
    """Dtype of the denoiser's forward passes under autocast (mixed precision), None for fp32."""
    pipeline_class: str | None = None
    """The diffusers pipeline class a real checkpoint was loaded from ("StableDiffusionPipeline"), None
    for the shipped tiny models; a run's ``final/`` is written in that pipeline's LoRA format."""

    @property
    def kind(self) -> str:
        return "flow" if self.prediction == "velocity" else "diffusion"

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: str | torch.device) -> GenerativePolicy:
        self.denoiser.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def predict(self, x: torch.Tensor, model_timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.call_denoiser(self.denoiser, x, model_timestep, cond)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            output = self.call_denoiser(self.denoiser, x, model_timestep, cond)
        # The Gaussian of the step (its mean, std and log-density) is computed in fp32 from here on.
        return output.float()

    def with_denoiser(self, denoiser: nn.Module) -> GenerativePolicy:
        """The same policy with another denoiser (e.g. the frozen reference of a KL or DPO term)."""
        return replace(self, denoiser=denoiser)
