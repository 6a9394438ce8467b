"""Pieces of the online policy-gradient loop that several methods share: collect and iterate.

Collect: sample prompts, roll out the current policy with log-probs, score. Iterate: shuffle samples
into minibatches and, per sample, the denoising steps to train on (DDPO trains each sample on its own
random permutation of steps, so a minibatch mixes timesteps).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from reference_impls.sampling import SamplerConfig, Trajectory, rollout
from reference_impls.training.distributed import SINGLE_PROCESS, Distributed, gather_trajectory
from reference_impls.training.method import Method, StepContext


@dataclass
class Batch:
    """A scored batch of trajectories."""

    trajectory: Trajectory
    rewards: torch.Tensor
    """(B,) rewards of the final images."""


def sampler_from_config(method: Method) -> SamplerConfig:
    config = method.config
    name = getattr(config, "sampler", None) or ("ddim" if method.policy.kind == "diffusion" else "sde")
    return SamplerConfig(
        name=name,
        num_steps=config.num_steps,
        eta=getattr(config, "eta", 1.0),
        noise_level=getattr(config, "noise_level", 0.7),
        guidance_scale=config.guidance_scale,
        reduction=getattr(config, "reduction", "mean"),
        # DDPO-style configs may sample stochastically in the first N steps only (0 = every step).
        stochastic_window=(0, config.stochastic_steps) if getattr(config, "stochastic_steps", 0) else None,
    )


def collect(method: Method, ctx: StepContext, prompts: list[str], sampler: SamplerConfig | None = None,
            noise: torch.Tensor | None = None) -> Batch:
    """Sample and score ``prompts``. Over several processes each samples and scores its block, and every
    process gets the whole scored batch back."""
    policy, distributed = method.policy, method.distributed
    rows = distributed.block(len(prompts)) if distributed.enabled else None
    policy.denoiser.eval()
    trajectory = rollout(policy, prompts, sampler or sampler_from_config(method), ctx.generator, noise=noise,
                         rows=rows)
    policy.denoiser.train()
    rewards = method.reward(trajectory.images, trajectory.prompts).float()
    if distributed.enabled:
        trajectory = gather_trajectory(trajectory, prompts, distributed)
        rewards = distributed.gather(rewards)
    return Batch(trajectory, rewards)


def minibatch_indices(batch_size: int, minibatch_size: int, rng: np.random.Generator,
                      distributed: Distributed = SINGLE_PROCESS) -> Iterator[np.ndarray]:
    """Shuffled minibatches; over several processes, this process's block of each (the gradients of the
    blocks are averaged before the optimiser step)."""
    order = rng.permutation(batch_size)
    for start in range(0, batch_size, minibatch_size):
        rows = order[start : start + minibatch_size]
        yield rows[distributed.block(len(rows), "minibatch")] if distributed.enabled else rows


def step_chunks(rows: torch.Tensor, num_steps: int, steps_per_call: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Denoiser calls over a minibatch's (sample, trained step) pairs, ``steps_per_call`` steps of every sample
    per call (0 = all of them in one call).

    Yields ``(row, column, n)``: indices into the (B, K) matrix of trained steps for the pairs of one call,
    which holds ``n`` of the K steps. A call's loss is a mean over its pairs, so ``(loss * n / K).backward()``
    over the calls accumulates the gradient of one ``(loss_k / K).backward()`` per step; fewer, larger calls
    cost less where per-call overhead dominates (small models, CPU).
    """
    per_call = num_steps if steps_per_call <= 0 else min(steps_per_call, num_steps)
    for start in range(0, num_steps, per_call):
        columns = torch.arange(start, min(start + per_call, num_steps))
        # Step-major order: all samples at the first step of the call, then all at the next.
        yield rows.repeat(len(columns)), columns.repeat_interleave(len(rows)), len(columns)


def training_steps(trajectory: Trajectory, fraction: float, rng: np.random.Generator,
                   min_std: float = 0.0, skip_last: bool = False) -> torch.Tensor:
    """(B, K) step indices to train on: per sample, a random permutation of its stochastic steps,
    truncated to ``fraction`` of them (DDPO's ``timestep_fraction``).

    Steps whose sampling noise std was below ``min_std`` are left out: a nearly deterministic step
    explores nothing, yet the gradient of its log-density scales like 1/std and would drown the others.
    ``skip_last`` leaves out the final denoising step (Flow-GRPO's shipped configs train the first T-1).
    """
    trainable = trajectory.schedule.stochastic.clone()
    if skip_last:
        trainable[-1] = False
    if min_std > 0 and trajectory.step_stds is not None:
        trainable &= trajectory.step_stds >= min_std
    if not bool(trainable.any()):
        raise ValueError(f"no sampler step has a noise std >= {min_std} (stds: {trajectory.step_stds})")
    stochastic = torch.nonzero(trainable).flatten().numpy()
    keep = max(1, int(round(fraction * len(stochastic))))
    rows = [rng.permutation(stochastic)[:keep] for _ in range(trajectory.batch_size)]
    return torch.as_tensor(np.stack(rows), dtype=torch.long)


def reward_metrics(rewards: torch.Tensor) -> dict[str, float]:
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False))}
