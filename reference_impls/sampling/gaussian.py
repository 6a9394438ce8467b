"""Gaussian log-densities with an explicit reduction over pixels.

The public codes (ddpo-pytorch, flow_grpo) *average* the per-pixel log-density over latent dims, which
is why their PPO clip ranges are ~1e-4: an averaged log-ratio is the summed one divided by the number
of dimensions. ``reduction`` makes that choice visible: ``"mean"`` (their convention, our default) or
``"sum"`` (the true log-density of the whole image).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Reduction = Literal["mean", "sum"]
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_log_prob(
    value: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float, reduction: Reduction = "mean"
) -> torch.Tensor:
    """log N(value; mean, std^2) per sample, reduced over all non-batch dims."""
    std = torch.as_tensor(std, dtype=mean.dtype, device=mean.device)
    per_dim = -((value - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return reduce_over_pixels(per_dim, reduction)


def reduce_over_pixels(per_dim: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    dims = tuple(range(1, per_dim.dim()))
    if reduction == "mean":
        return per_dim.mean(dim=dims)
    if reduction == "sum":
        return per_dim.sum(dim=dims)
    raise ValueError(f"unknown reduction {reduction!r}; valid: mean, sum")
