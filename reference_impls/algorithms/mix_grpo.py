r"""MixGRPO: GRPO with mixed ODE-SDE rollouts and a sliding window of trained steps (Li et al., 2025).

Bib key: ``li2025mixgrpo``.

Flow-GRPO and DanceGRPO sample every step with the SDE and (up to subsampling) train on every step.
MixGRPO confines both to a window $W(l) = \{l, \dots, l + w - 1\}$ of $w$ consecutive steps: inside the
window the sampler takes the stochastic SDE step (a Gaussian policy with a log-density), outside it
takes the deterministic ODE step, and only the window's steps enter the objective,

$$
\mathcal J(\theta) = \mathbb E\Big[\frac1G\sum_{i=1}^G \frac1w\sum_{t \in W(l)}
\min\big(\rho_{i,t} A_i,\ \mathrm{clip}(\rho_{i,t}, 1-\epsilon, 1+\epsilon) A_i\big)\Big],
\qquad A_i = \frac{r_i - \mathrm{mean}_G\, r}{\mathrm{std}_G\, r}.
$$

The randomness of a group's images then comes only from the window, so the reward differences are
credited to the steps that are trained, and an update costs $w$ instead of $T$ denoiser
forward-backward passes per image. The window slides from the noisiest steps towards the data as
training goes on (the paper's *progressive* schedule): every $\tau$ iterations its left edge moves by
the stride $s$, $l \leftarrow \min(l + s,\ T - w)$. A variant shortens the interval once the window
has passed step $\lambda$, $\tau(l) = \tau_0\, e^{-k\,\max(0,\, l - \lambda)}$ (``interval_decay`` = k).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from reference_impls.algorithms.grpo_common import (
    GRPOConfig,
    group_metrics,
    grouped_prompts,
    grpo_advantages,
    grpo_update,
    shared_initial_noise,
)
from reference_impls.sampling import SamplerConfig
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import collect, reward_metrics, training_steps


@dataclass
class MixGRPOConfig(GRPOConfig):
    """MixGRPO's settings on top of the shared GRPO ones."""

    model: str = "shapes-flow"
    """Shipped model name (shapes-flow) or a local flow checkpoint/pipeline folder."""
    window_size: int = 2
    """w: consecutive denoising steps sampled with the SDE and trained on (the paper uses 4 of 25)."""
    window_stride: int = 1
    """s: steps the window moves each time it moves."""
    shift_interval: int = 2
    """tau: outer iterations between two moves of the window (the paper uses 25)."""
    interval_decay: float = 0.0
    """k: shorten the interval to tau * exp(-k * max(0, l - decay_after)) (0 = the constant progressive schedule)."""
    decay_after: int = 0
    """lambda: window position after which the interval decays."""
    shared_noise: bool = True
    """All members of a group start from the same initial noise (as in the public code)."""

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.window_size <= self.num_steps:
            raise ValueError(f"--window-size must be in [1, --num-steps={self.num_steps}], got {self.window_size}")
        if self.window_stride < 1 or self.shift_interval < 1:
            raise ValueError("--window-stride and --shift-interval must be >= 1")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=6, batch_size=16, group_size=4, num_steps=8, window_size=2, shift_interval=2,
                  minibatch_size=16, learning_rate=1e-4, eval_every=0, eval_prompts=16, checkpoint_every=3,
                  prompts="easy"),
    "cpu": dict(steps=20, batch_size=64, group_size=8, num_steps=10, window_size=3, shift_interval=5,
                minibatch_size=32, learning_rate=5e-5, eval_every=10, eval_prompts=128, checkpoint_every=10),
    "gpu": dict(steps=300, batch_size=48, group_size=12, num_steps=25, window_size=4, shift_interval=25,
                minibatch_size=12, learning_rate=1e-5, eval_every=25, eval_prompts=256, checkpoint_every=25),
}


# --8<-- [start:window]
def window_start(iteration: int, config: MixGRPOConfig) -> int:
    """Left edge l of the SDE window at outer iteration ``iteration`` (0-based), progressive schedule.

    The window starts at the noisiest step; after each interval tau(l) it moves by the stride until it
    reaches the last steps, l = T - w, and stays there. A pure function of the iteration, so a resumed
    run continues exactly.
    """
    last = config.num_steps - config.window_size
    start, remaining = 0, iteration
    while start < last:
        interval = config.shift_interval * math.exp(-config.interval_decay * max(0, start - config.decay_after))
        interval = max(1, math.ceil(interval - 1e-9))
        if remaining < interval:
            break
        remaining -= interval
        start = min(start + config.window_stride, last)
    return start


def window_sampler(config: MixGRPOConfig, start: int) -> SamplerConfig:
    """The flow SDE inside [start, start + w), the ODE everywhere else."""
    return SamplerConfig("sde", num_steps=config.num_steps, noise_level=config.noise_level,
                         guidance_scale=config.guidance_scale, reduction=config.reduction,  # type: ignore[arg-type]
                         stochastic_window=(start, start + config.window_size))
# --8<-- [end:window]


class MixGRPO(Method):
    """MixGRPO: ODE outside a sliding SDE window; only the window's steps are trained."""

    name: ClassVar[str] = "mix-grpo"
    bib_key: ClassVar[str] = "li2025mixgrpo"
    supports_distributed: ClassVar[bool] = True
    config_class: ClassVar[type] = MixGRPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    supported_kinds: ClassVar[tuple[str, ...]] = ("flow",)
    config: MixGRPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        # MixGRPO trains without a KL term (kl_coef = 0); a reference is kept only if one is asked for.
        self.reference = self.frozen_copy() if self.config.kl_coef > 0 else None

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        # 1. Collect: ODE before and after the window, SDE inside it; groups share their initial noise.
        start = window_start(ctx.step, config)
        started = time.perf_counter()
        prompts = grouped_prompts(self, config.batch_size, config.group_size, ctx.rng)
        noise = (shared_initial_noise(self.policy, config.batch_size, config.group_size, ctx.generator)
                 if config.shared_noise else None)
        batch = collect(self, ctx, prompts, window_sampler(config, start), noise=noise)
        rollout_s = time.perf_counter() - started
        # 2. Group-relative advantages: the differences inside a group come from the window alone.
        advantages = grpo_advantages(batch.rewards, config)
        # 3. Update on exactly the window's steps (the only ones with a log-probability).
        steps = training_steps(batch.trajectory, 1.0, ctx.rng)
        update = grpo_update(self, batch.trajectory, advantages, steps, config, ctx.rng, self.reference)
        # --8<-- [end:train_step]
        return {
            **reward_metrics(batch.rewards),
            **group_metrics(batch.rewards, config.group_size),
            **update.metrics(),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "window_start": float(start),
            "sde_steps": float(batch.trajectory.schedule.stochastic.sum()),
            "trained_steps": float(steps.shape[1]),
            "time_rollout_s": rollout_s,
        }

