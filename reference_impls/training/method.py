"""What the training loop needs from a method, and what it gives it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from reference_impls.models.policy import GenerativePolicy
from reference_impls.rewards import RewardFunction
from reference_impls.training.config import TrainConfig
from reference_impls.training.distributed import SINGLE_PROCESS, Distributed

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN/inf; the loop stops and keeps the last good checkpoint."""


@dataclass
class StepContext:
    """Per-step randomness, derived from (seed, step) so a resumed run replays exactly."""

    step: int
    generator: torch.Generator
    """Torch generator for noise (initial latents, sampler noise, timestep draws)."""
    rng: np.random.Generator
    """NumPy generator for prompts and minibatch order."""


def step_context(seed: int, step: int, device: torch.device | str = "cpu") -> StepContext:
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    return StepContext(step, generator, np.random.default_rng([seed, step]))


@dataclass
class Method:
    """Base class of every method: holds the policy, reward, config and optimiser.

    Subclasses implement ``train_step`` (one outer iteration: collect, score, update) and may override
    ``state_dict``/``load_state_dict`` for state beyond the weights (e.g. DDPO's per-prompt statistics).
    """

    name: ClassVar[str] = ""
    bib_key: ClassVar[str] = ""
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    video_presets: ClassVar[dict[str, dict[str, Any]]] = {}
    """Per preset, the settings that change when the model is a video model (clips cost ~9 images)."""
    supported_kinds: ClassVar[tuple[str, ...]] = ("diffusion", "flow")
    needs_differentiable_reward: ClassVar[bool] = False
    supports_distributed: ClassVar[bool] = False
    """Whether the method runs data-parallel over several processes (``--num-processes``)."""

    policy: GenerativePolicy
    reward: RewardFunction
    config: TrainConfig
    optimizer: torch.optim.Optimizer = field(init=False)
    distributed: Distributed = field(default=SINGLE_PROCESS, init=False)
    """This process's place in a data-parallel run (the training loop sets it)."""

    def __post_init__(self) -> None:
        if self.policy.kind not in self.supported_kinds:
            raise ValueError(f"{self.name} needs a {' or '.join(self.supported_kinds)} model; "
                             f"{self.policy.name} is a {self.policy.kind} model")
        if self.reward.world is not None and self.policy.world != self.reward.world:
            from reference_impls.rewards import REWARDS
            from reference_impls.worlds.registry import get_world

            modality = (get_world(self.policy.world).modality if self.policy.world
                        else "video" if len(self.policy.latent_shape) == 4 else "image")
            fitting = [n for n, r in REWARDS.items() if r.world in (None, self.policy.world)
                       and r.modality in (modality, "any")]
            raise ValueError(f"reward {self.reward.name!r} scores {self.reward.world} prompts and {self.policy.name} "
                             f"is a {self.policy.world or 'real-checkpoint'} model; rewards that fit it: "
                             f"{', '.join(fitting)}")
        if self.needs_differentiable_reward and not self.reward.differentiable:
            from reference_impls.rewards import REWARDS

            valid = [n for n, r in REWARDS.items() if r.differentiable]
            raise ValueError(f"{self.name} backpropagates through the reward, and {self.reward.name!r} is not "
                             f"differentiable; differentiable rewards: {', '.join(valid)}")
        if self.config.lora_rank:
            from reference_impls.models.lora import add_lora

            # The adapters' Gaussian init draws from torch's global generator: seed it from --seed (and put it
            # back after), so a run is fixed by its config whoever calls it (the CLI or a benchmark).
            with torch.random.fork_rng():
                torch.manual_seed(self.config.seed)
                add_lora(self.policy.denoiser, self.config.lora_rank, self.config.lora_alpha or None)
        if self.config.gradient_checkpointing:
            denoiser = self.policy.denoiser
            if not getattr(denoiser, "_supports_gradient_checkpointing", False):
                raise ValueError(f"--gradient-checkpointing: {type(denoiser).__name__} does not support it "
                                 "(diffusers' UNet2DConditionModel and SD3Transformer2DModel do)")
            denoiser.enable_gradient_checkpointing()  # type: ignore[operator]
        if self.config.channels_last:
            self.policy.denoiser.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.policy.autocast_dtype = AUTOCAST_DTYPES[self.config.mixed_precision]
        self.policy.denoiser.train()
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=self.config.learning_rate,
                                           weight_decay=1e-4)
        self.ema: list[torch.Tensor] = ([p.detach().clone() for p in self.policy.trainable_parameters()]
                                        if self.config.ema_decay > 0 else [])

    # -- helpers subclasses share ------------------------------------------------------------------
    def frozen_copy(self) -> GenerativePolicy:
        """The policy as it is now, with a frozen copy of its denoiser (the reference of KL and DPO terms).

        ``reference.predict`` / ``transition_log_prob(reference, ...)`` evaluate the frozen weights.
        """
        reference = copy.deepcopy(self.policy.denoiser)
        reference.requires_grad_(False).eval()
        return self.policy.with_denoiser(reference)

    def sample_prompts(self, n: int, rng: np.random.Generator) -> list[str]:
        from reference_impls.worlds import PromptError, as_spec, sample_prompts
        from reference_impls.worlds.grammar import TASK_SPLIT_PREFIX

        if self.policy.world in ("motion", "solid"):
            from reference_impls.worlds.registry import get_world

            world = get_world(self.policy.world)
            if self.config.prompts in ("train", "easy"):
                return world.sample_prompts(n, self.config.prompts, rng)
            return [world.canonical(self.config.prompts)] * n
        if self.config.prompts in ("train", "easy") or self.config.prompts.startswith(TASK_SPLIT_PREFIX):
            return sample_prompts(n, self.config.prompts, rng)
        try:
            text = as_spec(self.config.prompts).text
        except PromptError:
            if self.policy.world == "shapes":
                raise
            text = self.config.prompts  # a real checkpoint takes any prompt
        return [text] * n

    def apply_gradients(self) -> float:
        """Average over processes, clip, check finiteness, step; returns the gradient norm."""
        self.distributed.average_gradients(self.policy.trainable_parameters())
        norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), self.config.max_grad_norm)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {float(norm)}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            with torch.no_grad():
                weights = [p.detach() for p in self.policy.trainable_parameters()]
                torch._foreach_lerp_(self.ema, weights, 1.0 - self.config.ema_decay)
        return float(norm)

    def use_ema_weights(self) -> None:
        """Copy the moving average into the trained weights (the loop does this before writing ``final/``)."""
        with torch.no_grad():
            for parameter, average in zip(self.policy.trainable_parameters(), self.ema):
                parameter.copy_(average)

    # -- interface ---------------------------------------------------------------------------------
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    def trained_module(self) -> torch.nn.Module:
        """What checkpoints hold: the denoiser; a per-prompt 3D method returns its 3D representation."""
        return self.policy.denoiser

    def evaluate(self, samples_dir: Path, step: int) -> dict[str, float] | None:
        """The method's own evaluation at ``step`` (per-prompt 3D methods score their renders), or None
        for the loop's: the generator on fixed held-out prompts."""
        del samples_dir, step
        return None

    def save_final(self, root: Path) -> bool:
        """Write the method's own final outputs under ``root`` and return True, or False for the loop's
        (the fine-tuned generator in ``final/``)."""
        del root
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the trained weights that a resumed run needs (DiffusionNFT's old policy)."""
        return {}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        del tensors
