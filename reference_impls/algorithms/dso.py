r"""DSO: aligning a 3D generator with physical feedback by preference optimisation (Li et al., 2025).

Bib key: ``li2025dso``.

DSO fine-tunes a 3D generator so that what it makes *stands*. It generates objects with the base model,
labels each one stable or not with a physics simulator (drop the mesh on a plane and see whether it
tips), and trains on those labels without any differentiable simulator, with one of two objectives:

* **DPO** (Diffusion-DPO on the flow-matching loss, against a frozen reference): for a pair with the stable
  object $x^w$ and the unstable $x^l$, one noise level $t$ and one noise for both,

  $$ L_\text{DPO} = -\log\sigma\Big(-\tfrac{\beta}{2}\big[(e_\theta(x^w) - e_\text{ref}(x^w)) - (e_\theta(x^l) - e_\text{ref}(x^l))\big]\Big),
     \qquad e(x) = \lVert v(x_t, t, c) - (\epsilon - x)\rVert^2 ; $$

* **DRO** (direct reward optimisation, no reference model): learn the stable object's path and unlearn the
  unstable one's, $L_\text{DRO} = \mathbb E\big[(1 - 2\,o(x))\, e_\theta(x)\big]$ with $o(x) \in \{0, 1\}$ the
  stability label. Over the preference bank's pairs (one stable, one unstable object each) this is
  $\tfrac12\,\mathbb E[e_\theta(x^w) - e_\theta(x^l)]$, which is what is implemented.

Here the generator is ``solid-mv-flow`` (SolidWorld's four views), the "simulator" is a support check on the
3D layout the SolidWorld evaluator fits to the views (``solid-stability``: every object on the ground or
centred on a cube's or cylinder's flat top), and the pairs come from Diffusion-DPO's preference bank
(base-model samples of the same prompt, labelled by the stability reward, ties dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.algorithms.diffusion_dpo import DPOStats, denoising_errors, noised
from reference_impls.algorithms.flow_dpo import PRESETS as FLOW_DPO_PRESETS
from reference_impls.algorithms.flow_dpo import FlowDPO, FlowDPOConfig, flow_noise_levels
from reference_impls.models.policy import Conditioning
from reference_impls.training.method import StepContext


@dataclass
class DSOConfig(FlowDPOConfig):
    """DSO's settings: Flow-DPO's bank and loss on the multi-view model, with the stability label."""

    model: str = "solid-mv-flow"
    """The multi-view flow model (SolidWorld's 4 views), or a local checkpoint folder of one."""
    reward: str = "solid-stability"
    """The physical feedback that labels the bank's samples (1 = every object stands)."""
    objective: str = "dpo"
    """dpo (Diffusion-DPO against the frozen reference, beta) or dro (learn stable, unlearn unstable; no
    reference)."""
    labeller_temperature: float = 0.0
    """A simulator's verdict is not a noisy human: the label is exact (Bradley-Terry temperature 0)."""
    prompts: str = "train"
    """Prompts of the bank: a SolidWorld split, or one literal prompt (stacked prompts are where objects fall)."""

    def validate(self) -> None:
        super().validate()
        if self.objective not in ("dpo", "dro"):
            raise ValueError(f"--objective {self.objective!r}; valid: dpo, dro")


# A multi-view sample costs about what a clip does: Flow-DPO's video budgets, on SolidWorld's prompts.
PRESETS: dict[str, dict[str, Any]] = FLOW_DPO_PRESETS


# --8<-- [start:loss]
def dro_loss(err_w: torch.Tensor, err_l: torch.Tensor) -> tuple[torch.Tensor, DPOStats]:
    """(1 - 2 o) e averaged over the pair's two members: (e_w - e_l) / 2, with no reference model."""
    loss = 0.5 * (err_w - err_l).mean()
    margin = float((err_l - err_w).detach().mean())  # DRO has no reference: the stats hold raw errors
    stats = DPOStats(implicit_acc=float((err_w < err_l).float().mean()), implicit_margin=margin,
                     delta_w=float(err_w.detach().mean()), delta_l=float(err_l.detach().mean()))
    return loss, stats
# --8<-- [end:loss]


class DSO(FlowDPO):
    """DSO: DPO or DRO of the multi-view generator on stability-labelled pairs of its own samples."""

    name: ClassVar[str] = "dso"
    bib_key: ClassVar[str] = "li2025dso"
    config_class: ClassVar[type] = DSOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    config: DSOConfig

    def __post_init__(self) -> None:
        if self.policy.world != "solid":
            raise ValueError(f"dso fine-tunes a multi-view generator of SolidWorld (solid-mv-flow); "
                             f"{self.policy.name} is a {self.policy.world or 'real-checkpoint'} model")
        super().__post_init__()

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config, policy, pairs = self.config, self.policy, self.pairs
        if config.objective == "dpo":
            return super().train_step(ctx)  # Flow-DPO's step on stable/unstable pairs
        rows = torch.as_tensor(ctx.rng.choice(len(pairs), size=min(config.batch_size, len(pairs)), replace=False))
        n = len(rows)
        x0 = torch.cat([pairs.winners[rows], pairs.losers[rows]]).to(policy.device)
        with torch.no_grad():
            cond = policy.encode_text([pairs.prompts[int(i)] for i in rows]).detach()
        level = flow_noise_levels(n, config.timestep_sampling, ctx.generator).repeat(2)
        noise = torch.randn((n, *x0.shape[1:]), generator=ctx.generator).to(policy.device)
        x_t, timestep, target = noised(policy, x0, torch.cat([noise, noise]), level)
        errors = denoising_errors(policy, x_t, timestep, Conditioning.cat([cond, cond]), target)
        loss, stats = dro_loss(errors[:n], errors[n:])
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {**self.monitor(), "loss": float(loss.detach()), "implicit_acc": stats.implicit_acc,
                "implicit_margin": stats.implicit_margin, "delta_w": stats.delta_w, "delta_l": stats.delta_l,
                "grad_norm": grad_norm, "samples": 2 * n}

