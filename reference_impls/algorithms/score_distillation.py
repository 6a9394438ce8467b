r"""Score distillation into a 3D field: the shared core of the per-prompt text-to-3D methods.

DreamFusion's score distillation sampling (SDS; Poole et al., 2023, ``poole2022dreamfusion``) optimises a 3D
representation $\psi$ so that its renders $x = g(\psi)$ look, to a frozen text-conditioned generator, like
samples for the prompt $c$: noise the render, ask the generator to denoise it, and move the render towards
its answer, without backpropagating through the generator. For our rectified-flow multi-view generator
(``solid-mv-flow``), with the render of all four cameras $x \in [-1, 1]^{3 \times 4 \times 32 \times 32}$:

$$ s \sim \mathcal U[s_\min, s_\max], \quad \epsilon \sim \mathcal N(0, I), \quad x_s = (1 - s)\,x + s\,\epsilon,
   \quad \hat x_0 = x_s - s\,\hat v_\text{cfg}(x_s, s, c), $$

$$ \nabla_\psi \mathcal L_\text{SDS} = w(s)\,\big(\hat v_\text{cfg} - (\epsilon - x)\big)\,\frac{\partial x}{\partial \psi}
   = \big(x - \hat x_0\big)\,\frac{\partial x}{\partial \psi} \quad\text{with } w(s) = s, $$

where $\hat v_\text{cfg} = \hat v(x_s, s, \varnothing) + \gamma\,(\hat v(x_s, s, c) - \hat v(x_s, s, \varnothing))$ is
the classifier-free-guided velocity. $\hat v - (\epsilon - x)$ is the flow analogue of DreamFusion's
$\hat\epsilon - \epsilon$; with $w(s) = s$ the gradient is the gap between the render and the generator's
one-step denoised estimate $\hat x_0$, which is how it is implemented: a loss
$\tfrac12\lVert x - \mathrm{sg}(x - g)\rVert^2$ whose gradient in $x$ is $g$.

:class:`FieldMethod` is what a per-prompt method shares: the frozen generator, the voxel field
(:mod:`reference_impls.models.voxel_field`) and its optimiser, the exact SolidWorld evaluation of the field's
renders, and the final outputs (views, turntable GIF, mesh). The methods differ in the gradient $g$.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from reference_impls.models.policy import Conditioning
from reference_impls.models.voxel_field import VoxelField, VoxelFieldConfig
from reference_impls.training.config import TrainConfig
from reference_impls.training.method import Method, NonFiniteLossError


@dataclass
class FieldConfig(TrainConfig):
    """Settings of a per-prompt 3D optimisation: the prompt, the field and the distillation."""

    model: str = "solid-mv-flow"
    """The frozen multi-view generator whose scores are distilled (SolidWorld's 4 views)."""
    reward: str = "solid-composition"
    """The reward that ranks or scores renders (solid-composition: the exact SolidWorld evaluator)."""
    prompts: str = "a red cube"
    """The one prompt this field is optimised for (a SolidWorld prompt in quotes)."""
    steps: int = 300
    """Optimiser steps on the field (one render and one or two generator queries each)."""
    learning_rate: float = 0.1
    """Adam learning rate on the field's density and colour parameters."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the generator's velocity (DreamDPO's 7.5)."""
    noise_min: float = 0.02
    """Smallest noise level s drawn (DreamFusion's t_min = 0.02)."""
    noise_max: float = 0.98
    """Largest noise level s drawn at the start; it decays linearly to ``noise_max_final``."""
    noise_max_final: float = 0.5
    """Largest noise level s at the last step: coarse layout first, then detail (DreamDPO's annealing)."""
    sparsity_weight: float = 0.01
    """Weight of the mean density, which empties the regions no view constrains."""
    resolution: int = 32
    """Voxel grid cells per axis."""
    samples_per_ray: int = 96
    """Points composited along each ray."""
    eval_every: int = 50
    """Score the field's renders with the exact evaluator every this many steps."""
    checkpoint_every: int = 50
    """Write the field and optimiser state atomically every this many steps (a killed run resumes)."""
    batch_size: int = 1
    """One field, one prompt: kept for the shared settings (renders per step)."""

    def validate(self) -> None:
        super().validate()
        if not 0 < self.noise_min < self.noise_max_final <= self.noise_max < 1:
            raise ValueError(f"need 0 < --noise-min < --noise-max-final <= --noise-max < 1, got {self.noise_min}, "
                             f"{self.noise_max_final}, {self.noise_max}")


def noise_level(config: FieldConfig, step: int, generator: torch.Generator) -> torch.Tensor:
    """s ~ U[noise_min, s_max(step)], with s_max decaying linearly from noise_max to noise_max_final."""
    progress = step / max(1, config.steps - 1)
    high = config.noise_max + (config.noise_max_final - config.noise_max) * progress
    return config.noise_min + (high - config.noise_min) * torch.rand((), generator=generator)


# --8<-- [start:sds]
def guided_denoise(method: FieldMethod, x: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The generator's guided one-step estimates x0_hat of the render x noised to level s with each of the
    K noises (K, ...): x_s = (1 - s) x + s eps, x0_hat = x_s - s v_cfg. Returns (K, ...); one denoiser call
    holds every noise, conditional and unconditional (per-call overhead dominates small models)."""
    k = noise.shape[0]
    x_s = (1 - s) * x + s * noise
    t = (s * 1000).reshape(1).expand(2 * k)
    cond = Conditioning.cat([method.cond.repeat(k), method.uncond.repeat(k)])
    with torch.no_grad():
        conditional, unconditional = method.policy.predict(torch.cat([x_s, x_s]), t, cond).chunk(2)
    velocity = unconditional + method.config.guidance_scale * (conditional - unconditional)
    return x_s - s * velocity


def sds_direction(x: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """SDS's gradient in x with w(s) = s: x - x0_hat = s (v_hat - (eps - x))."""
    return x.detach() - x0_hat


def gradient_as_loss(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient in x is ``direction`` (summed over views and pixels)."""
    target = (x - direction).detach()
    return 0.5 * ((x - target) ** 2).sum()
# --8<-- [end:sds]


class FieldMethod(Method):
    """A per-prompt 3D optimisation guided by a frozen multi-view generator; subclasses give ``train_step``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = FieldConfig
    sds_settings: ClassVar[dict[str, Any]] = {}
    """The settings that turn the method into plain SDS: its paired baseline (benchmarks/field_table.py)."""
    config: FieldConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy.world != "solid" or self.policy.kind != "flow":
            raise ValueError(f"{self.name} distils a SolidWorld multi-view flow model (solid-mv-flow) into a 3D "
                             f"field; {self.policy.name} is a {self.policy.kind} model of world "
                             f"{self.policy.world or 'none (a real checkpoint)'}")
        from reference_impls.worlds.registry import get_world

        world = get_world("solid")
        try:
            self.prompt = world.canonical(self.config.prompts)
        except world.prompt_error as error:
            raise ValueError(f"--prompts: {self.name} optimises one field for one SolidWorld prompt: {error}") from None
        self.policy.denoiser.requires_grad_(False).eval()
        torch.manual_seed(self.config.seed)
        self.field = VoxelField(VoxelFieldConfig(resolution=self.config.resolution,
                                                 samples_per_ray=self.config.samples_per_ray))
        self.optimizer = torch.optim.Adam(self.field.parameters(), lr=self.config.learning_rate)
        self.ema = []
        with torch.no_grad():
            self.cond = self.policy.encode_text([self.prompt])
            self.uncond = self.policy.encode_text([""])

    def render(self) -> torch.Tensor:
        """The field from SolidWorld's four cameras as the generator's input: (1, 3, V, H, W) in [-1, 1]."""
        return (2 * self.field.render() - 1).permute(1, 0, 2, 3).unsqueeze(0)

    def sparsity(self) -> torch.Tensor:
        return self.config.sparsity_weight * torch.nn.functional.softplus(self.field.density).mean()

    def step_field(self, loss: torch.Tensor) -> float:
        """Backpropagate into the field, clip, step; returns the gradient norm."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.field.parameters(), self.config.max_grad_norm)
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"gradient norm is {float(norm)}")
        self.optimizer.step()
        return float(norm)

    # -- the training loop's hooks ------------------------------------------------------------------
    def trained_module(self) -> torch.nn.Module:
        return self.field

    def score_renders(self) -> tuple[torch.Tensor, Any]:
        """The field's four views in [0, 1], (1, 3, V, H, W), and the exact evaluator's verdict on them."""
        from reference_impls.worlds.registry import to_uint8
        from reference_impls.worlds.solid import evaluate_views

        with torch.no_grad():
            views = self.field.render().permute(1, 0, 2, 3).unsqueeze(0)
        return views, evaluate_views(to_uint8(views), [self.prompt])[0]

    def evaluate(self, samples_dir: Path, step: int) -> dict[str, float] | None:
        from reference_impls.evaluation import save_grid

        views, verdict = self.score_renders()
        samples_dir.mkdir(parents=True, exist_ok=True)
        save_grid(views, samples_dir / f"step_{step:06d}.png", scale=4)
        metrics = {"eval_score": float(verdict.score), "eval_correct": float(verdict.correct)}
        metrics.update({f"eval_{k}": float(v) for k, v in verdict.criteria.items()})
        return metrics

    def save_final(self, root: Path) -> bool:
        from reference_impls.evaluation import save_grid

        final = root / "final"
        final.mkdir(parents=True, exist_ok=True)
        views, verdict = self.score_renders()
        save_grid(views, final / "views.png", scale=4)
        self.field.turntable(final / "turntable.gif")
        try:
            mesh = self.field.mesh(final / "mesh.ply")
        except ValueError as error:  # an empty field has no surface; say so instead of failing the run
            mesh = {"error": str(error)}
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.field.state_dict().items()},
                  str(final / "field.safetensors"))
        summary = {"prompt": self.prompt, "score": verdict.score, "correct": verdict.correct,
                   "criteria": verdict.criteria, "mesh": mesh,
                   "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size, "iou": round(o.iou, 3)}
                               for o in verdict.objects]}
        (final / "verdict.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return True
