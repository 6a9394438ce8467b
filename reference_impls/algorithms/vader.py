r"""VADER: video diffusion alignment by backpropagating reward gradients (Prabhudesai et al., 2024).

Bib key: ``prabhudesai2024vader``.

VADER is DRaFT-style reward backpropagation made to fit video. Sample a clip $x_0 = g_\theta(x_T, c)$ with
the sampler written as a differentiable chain, score it with a differentiable reward and ascend

$$
J(\theta) = \mathbb E_{c,\,x_T}\big[r(S \odot x_0 + (1 - S) \odot \operatorname{sg}(x_0),\ c)\big],
$$

where $\operatorname{sg}$ stops the gradient and $S$ selects a random subset of the clip's frames. Two
truncations keep memory within one accelerator, since every differentiated step stores activations of
every frame:

* **through time** (truncated backpropagation): only the last $K$ denoising steps carry gradient (the
  public code's default ``backprop_mode='last'`` is $K = 1$);
* **through frames**: the reward's gradient reaches the sampler only through ``grad_frames`` randomly
  chosen frames. The public code goes further for image rewards: it decodes only one random frame (its
  default ``decode_frame='-1'``). Our decoder is the identity on pixels and our reward needs the whole
  clip to judge motion, so every frame is scored and the subset only limits where the gradient flows.

Differences from the paper: pixel-space tiny model and all weights (the paper: VideoCrafter / Open-Sora /
ModelScope with LoRA rank 16, gradient checkpointing, fp16); the reward is ``motion-learned``, a learned
approximation of MotionWorld's exact evaluator (the paper: aesthetic, HPS, PickScore, object detectors,
action classifiers, ViCLIP, V-JEPA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.training.differentiable import RewardBackpropConfig, sample_with_grad, training_sampler
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import reward_metrics


@dataclass
class VADERConfig(RewardBackpropConfig):
    """VADER's settings on top of the reward-backpropagation ones."""

    model: str = "motion-flow"
    """A video model (shipped name or folder)."""
    reward: str = "motion-learned"
    """Differentiable video reward."""
    k: int = 1
    """Denoising steps the gradient flows through (the last K; the public code's default is 1)."""
    grad_frames: int = 2
    """Frames per clip, drawn at random, through which the reward's gradient reaches the sampler (0: all)."""
    checkpointing: bool = False
    """Recompute each differentiated denoiser call in the backward pass instead of storing it."""

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.k <= self.num_steps:
            raise ValueError(f"--k must be in [1, --num-steps={self.num_steps}], got {self.k}")
        if self.grad_frames < 0:
            raise ValueError(f"--grad-frames must be >= 0, got {self.grad_frames}")


PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(steps=4, batch_size=4, num_steps=6, k=1, learning_rate=1e-4, eval_every=0, eval_prompts=4,
                  checkpoint_every=2, prompts="easy"),
    "cpu": dict(steps=30, batch_size=8, num_steps=10, k=1, learning_rate=3e-5, eval_every=10, eval_prompts=48,
                checkpoint_every=10),
    "gpu": dict(steps=400, batch_size=8, num_steps=25, k=1, learning_rate=2e-4, eval_every=50, eval_prompts=243,
                checkpoint_every=50, lora_rank=16, checkpointing=True),
}


# --8<-- [start:frames]
def frame_subset_mask(batch: int, frames: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """(B, 1, F, 1, 1) bool: ``keep`` random frames per clip (all frames when keep is 0 or >= F)."""
    if keep <= 0 or keep >= frames:
        return torch.ones(batch, 1, frames, 1, 1, dtype=torch.bool)
    order = torch.rand(batch, frames, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], True)
    return mask.view(batch, 1, frames, 1, 1)
# --8<-- [end:frames]


class VADER(Method):
    """VADER: reward gradients through the last K steps and a random subset of frames."""

    name: ClassVar[str] = "vader"
    bib_key: ClassVar[str] = "prabhudesai2024vader"
    config_class: ClassVar[type] = VADERConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    needs_differentiable_reward: ClassVar[bool] = True
    config: VADERConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.policy.latent_shape) != 4:
            raise ValueError(f"vader trains video models; {self.policy.name} samples images "
                             "(use draft-k for the same update on images)")
        self.sampler = training_sampler(self.policy, self.config)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        prompts = self.sample_prompts(config.batch_size, ctx.rng)
        # 1. Sample clips with the gradient kept through the last K steps only.
        sample = sample_with_grad(self.policy, prompts, self.sampler, ctx.generator,
                                  grad_from_step=config.num_steps - config.k, checkpointing=config.checkpointing)
        clips = self.policy.decode(sample.final)
        # 2. The reward sees every frame; its gradient flows through a random subset of them.
        keep = frame_subset_mask(clips.shape[0], clips.shape[2], config.grad_frames, ctx.generator).to(clips.device)
        clips = torch.where(keep, clips, clips.detach())
        rewards = self.reward(clips, prompts)
        # 3. Ascend the reward.
        loss = -rewards.mean()
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {**reward_metrics(rewards.detach()), "loss": loss.item(), "grad_norm": grad_norm,
                "grad_frames": float(keep[0].sum())}
