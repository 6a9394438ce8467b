"""Estimators shared by several methods: advantages, baselines, KL, and the PPO clipped objective.

Only math that really is shared lives here; each method's own loss stays in its file.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Literal

import torch


# --8<-- [start:per_prompt]
class PerPromptStatTracker:
    """DDPO's advantage normaliser: (r - mean_c) / std_c over recent rewards of the same prompt c.

    Keeps the last ``buffer_size`` rewards per prompt; while a prompt has fewer than ``min_count``,
    the statistics of the whole batch are used instead (Black et al., 2023).
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 4, eps: float = 1e-6) -> None:
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.history: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=buffer_size))

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        values = rewards.detach().float().cpu()
        advantages = torch.empty_like(values)
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        for prompt in set(prompts):
            rows = [i for i, p in enumerate(prompts) if p == prompt]
            self.history[prompt].extend(values[rows].tolist())
            seen = torch.tensor(list(self.history[prompt]))
            if len(seen) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = seen.mean(), seen.std(unbiased=False)
            advantages[rows] = (values[rows] - mean) / (std + self.eps)
        return advantages.to(rewards.device)

    def state_dict(self) -> dict[str, list[float]]:
        return {prompt: list(values) for prompt, values in self.history.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.history.clear()
        for prompt, values in state.items():
            self.history[prompt].extend(values)
# --8<-- [end:per_prompt]


# --8<-- [start:group]
def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    std_scope: Literal["group", "batch", "none"] = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO advantages: A_i = (r_i - mean(group)) / (std + eps), groups of consecutive samples.

    ``std_scope``: divide by the group's std (GRPO, Flow-GRPO), the whole batch's std (a variant that
    avoids blowing up near-constant groups), or not at all (Dr. GRPO). A group whose rewards are all
    equal gets zero advantages (and so no gradient), whatever the scope.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std_scope == "group":
        scale = grouped.std(dim=1, unbiased=False, keepdim=True)
    elif std_scope == "batch":
        scale = rewards.float().std(unbiased=False).expand_as(centred[:, :1])
    elif std_scope == "none":
        return centred.view(-1)
    else:
        raise ValueError(f"unknown std_scope {std_scope!r}; valid: group, batch, none")
    return (centred / (scale + eps)).view(-1)
# --8<-- [end:group]


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO baseline: A_i = r_i - mean_{j != i} r_j within each group (unbiased, no learned critic)."""
    if group_size < 2:
        raise ValueError("leave-one-out needs groups of at least 2 samples")
    grouped = rewards.float().view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view(-1)


# --8<-- [start:kl]
def kl_estimate(log_p: torch.Tensor, log_q: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k3") -> torch.Tensor:
    """Sample estimators of KL(p || q) from x ~ p (Schulman's k1, k2, k3); r = q(x) / p(x).

    k1 = -log r (unbiased, high variance), k2 = (log r)^2 / 2 (biased, low variance),
    k3 = (r - 1) - log r (unbiased, low variance, always >= 0).
    """
    log_ratio = log_q - log_p
    if kind == "k1":
        return -log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}; valid: k1, k2, k3")


def gaussian_mean_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor,
                     reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """KL between two Gaussian steps of equal std: ||mu_p - mu_q||^2 / (2 std^2), per sample.

    Exact for the stochastic samplers (both policies share the step's std), which is how Flow-GRPO
    regularises towards the reference model.
    """
    per_dim = (mean_p - mean_q) ** 2 / (2 * std**2)
    dims = tuple(range(1, per_dim.dim()))
    return per_dim.mean(dim=dims) if reduction == "mean" else per_dim.sum(dim=dims)
# --8<-- [end:kl]


@dataclass
class ClipStats:
    """Diagnostics of one PPO minibatch."""

    approx_kl: float
    """0.5 * mean((log pi - log pi_old)^2): how far the policy moved."""
    clipfrac: float
    """Fraction of samples whose ratio left [1 - eps, 1 + eps]."""
    ratio_mean: float
    """Mean importance ratio (exactly 1 at the first inner step)."""


# --8<-- [start:ppo_clip]
def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, ClipStats]:
    """PPO's clipped surrogate as a loss to minimise (Schulman et al., 2017):

    L = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps)),  r_i = exp(log pi - log pi_old).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = ClipStats(
            approx_kl=float(0.5 * ((log_prob - old_log_prob) ** 2).mean()),
            clipfrac=float(((ratio - 1.0).abs() > clip_range).float().mean()),
            ratio_mean=float(ratio.mean()),
        )
    return loss, stats
# --8<-- [end:ppo_clip]
