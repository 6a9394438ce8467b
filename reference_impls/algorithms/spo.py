r"""SPO: step-by-step preference optimisation (Liang et al., 2024).

Bib key: ``liang2024spo``.

D3PO credits every step of a trajectory with the preference between two *final* images. SPO instead
builds the preference **at each step**: from the current state $x_t$ it samples $k$ candidates
$x^1_{t-1}, \dots, x^k_{t-1}$ (same state, different noise), a *step-aware* preference model ranks them,
and the best and worst form a pair $(x^w_{t-1}, x^l_{t-1})$ that shares its state. The chain then
continues from a candidate chosen uniformly at random (so the visited states stay on-policy), and the
pairs are trained with the clipped step-level DPO loss (official ``beta = 10``, ``eps = 0.1``):

$$
L(\theta) = -\,\mathbb E\Big[\log\sigma\Big(\beta\log\mathrm{clip}\frac{\pi_\theta(x^w_{t-1}\mid x_t, c)}{\pi_\text{ref}(x^w_{t-1}\mid x_t, c)}
- \beta\log\mathrm{clip}\frac{\pi_\theta(x^l_{t-1}\mid x_t, c)}{\pi_\text{ref}(x^l_{t-1}\mid x_t, c)}\Big)\Big].
$$

Because both candidates leave the same $x_t$, the two policy terms share one denoiser call.

**Our step-aware preference model.** The paper trains a time-conditioned PickScore on noisy images. We
apply the *exact* ShapeWorld evaluator to each candidate's one-step lookahead: the clean image
$\hat x_0(x^j_{t-1})$ the model predicts from the candidate at the next step (what the official code
feeds its preference model; at the last step, the final images themselves). The synthetic labeller adds
Gumbel noise at temperature $T$ to the scores before taking the best and worst (Plackett-Luce choice,
Bradley-Terry for $k = 2$). A step whose best and worst candidates have equal exact scores gives no pair
(the official code drops pairs whose preference-probability gap is under a threshold).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from reference_impls.algorithms.d3po import eligible_steps, step_dpo_loss
from reference_impls.models.policy import GenerativePolicy
from reference_impls.rewards.preferences import SyntheticLabeller
from reference_impls.sampling import SamplerConfig, apply_step, guided_prediction, make_schedule
from reference_impls.sampling.rollout import Schedule, encode_prompts, initial_noise
from reference_impls.training.config import TrainConfig
from reference_impls.training.method import Method, StepContext
from reference_impls.training.online import minibatch_indices, sampler_from_config


@dataclass
class SPOConfig(TrainConfig):
    """SPO's settings on top of the shared ones. ``batch_size`` is the number of chains (prompts) per step."""

    reward: str = "shapes-composition"
    """Score of the step-aware preference model (applied to each candidate's predicted clean image)."""
    sampler: str = ""
    """Training sampler: ddim (with eta) or ddpm for diffusion models, sde for flow models ('' = ddim / sde)."""
    eta: float = 1.0
    """DDIM stochasticity (SPO uses 1.0: the candidates differ only by the step's noise)."""
    noise_level: float = 0.7
    """Flow SDE noise level a (flow models only)."""
    reduction: str = "mean"
    """Reduction of the per-pixel step log-density: mean (the official code's) or sum."""
    num_candidates: int = 4
    """k: candidates sampled from each state (the SD1.5 config uses 4, SDXL 2)."""
    divert_start_step: int = 2
    """Steps before this index run one chain without candidates (official: 4 of 20)."""
    beta: float = 10.0
    """DPO temperature on the per-step log-ratios (official 10)."""
    ratio_clip: float = 0.1
    """epsilon: each ratio pi_theta / pi_ref is clipped to [1 - eps, 1 + eps] (official 0.1)."""
    minibatch_size: int = 16
    """Step pairs per gradient step."""
    labeller_temperature: float = 0.1
    """Gumbel temperature T of the choice among candidates (0 = always the exact best and worst)."""
    tie_margin: float = 0.0
    """A step whose chosen and rejected candidates' exact scores differ by at most this gives no pair."""
    min_step_std: float = 0.05
    """Branch only at steps whose noise std is at least this (skips the near-deterministic last DDIM step)."""

    def validate(self) -> None:
        super().validate()
        if self.num_candidates < 2:
            raise ValueError(f"--num-candidates must be >= 2, got {self.num_candidates}")
        if not 0 <= self.divert_start_step < self.num_steps:
            raise ValueError(f"--divert-start-step must be in [0, num_steps), got {self.divert_start_step}")


PRESETS: dict[str, dict[str, Any]] = {
    # JPEG incompressibility with a near-noiseless choice: the exact score ties on "a red circle" (the base draws it
    # right), and the candidates' sizes differ by less than the default temperature of 0.1 (measured: 0.99 -> 1.37).
    "smoke": dict(steps=6, batch_size=4, num_steps=8, num_candidates=4, divert_start_step=2, minibatch_size=12,
                  learning_rate=1e-4, reward="jpeg-incompressibility", labeller_temperature=0.001, eval_every=0,
                  eval_prompts=8, checkpoint_every=3, prompts="a red circle"),
    "cpu": dict(steps=20, batch_size=8, num_steps=10, num_candidates=4, divert_start_step=2, minibatch_size=16,
                learning_rate=3e-5, eval_every=10, eval_prompts=64, checkpoint_every=10),
    "gpu": dict(steps=200, batch_size=10, num_steps=20, num_candidates=4, divert_start_step=4, minibatch_size=10,
                learning_rate=6e-5, eval_every=20, eval_prompts=256, checkpoint_every=20, guidance_scale=5.0),
}


@dataclass
class StepPairs:
    """Step-level preference pairs collected along the chains, and the chains' final images."""

    states: torch.Tensor
    """(P, C, H, W) the shared state x_t of each pair."""
    step_index: torch.Tensor
    """(P,) sampler step i of x_t (0 = pure noise)."""
    chosen: torch.Tensor
    """(P, C, H, W) the preferred next state."""
    rejected: torch.Tensor
    """(P, C, H, W) the dispreferred next state."""
    prompt_index: torch.Tensor
    """(P,) which chain (prompt) the pair belongs to."""
    score_gap: torch.Tensor
    """(P,) exact score of chosen minus rejected (negative where the noisy choice was wrong)."""
    final_images: torch.Tensor
    """(B, 3, H, W) the chains' final images."""
    candidate_scores: torch.Tensor
    """(S, k, B) exact scores of every candidate at each branching step."""
    branch_steps: int


# --8<-- [start:select]
def select_pair(scores: torch.Tensor, labeller: SyntheticLabeller, key: tuple[int, ...]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen / rejected candidate per chain from scores (k, B): the labeller's noisy best and worst."""
    return labeller.choose(scores, key)
# --8<-- [end:select]


def lookahead_x0(policy: GenerativePolicy, config: SamplerConfig, schedule: Schedule, step: int,
                 candidates: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """x0_hat the model predicts from candidates at step ``step`` (passing the state as next_state only
    avoids drawing noise; the step's mean and log-prob are not used)."""
    index = torch.full((candidates.shape[0],), step, dtype=torch.long)
    return apply_step(policy, config, schedule, index, candidates, prediction, next_state=candidates).predicted_x0


class SPO(Method):
    """SPO: step-aware preferences among k candidates from the same state, DPO on the step pairs."""

    name: ClassVar[str] = "spo"
    bib_key: ClassVar[str] = "liang2024spo"
    config_class: ClassVar[type] = SPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    config: SPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reference = self.frozen_copy()
        self.labeller = SyntheticLabeller(self.config.reward, self.config.labeller_temperature, self.config.tie_margin,
                                          seed=self.config.seed)
        sampler = sampler_from_config(self)
        steps = eligible_steps(self.policy, sampler, make_schedule(self.policy, sampler), self.config.min_step_std)
        self.branch_steps = [i for i in steps if i >= self.config.divert_start_step]
        if not self.branch_steps:
            raise ValueError("no step to branch at: lower --divert-start-step or --min-step-std")

    # --8<-- [start:collect]
    @torch.no_grad()
    def collect_step_pairs(self, prompts: list[str], ctx: StepContext, sampler: SamplerConfig) -> StepPairs:
        policy, k, n = self.policy, self.config.num_candidates, len(prompts)
        policy.denoiser.eval()
        schedule = make_schedule(policy, sampler)
        cond, uncond = encode_prompts(policy, prompts, sampler)
        cond_k, uncond_k = cond.repeat(k), None if uncond is None else uncond.repeat(k)
        t = schedule.model_timesteps.to(policy.device)
        columns = torch.arange(n)
        x = initial_noise(policy, n, ctx.generator)
        out = guided_prediction(policy, x, t[0], cond, uncond, sampler.guidance_scale)
        records, all_scores = [], []
        for i in range(schedule.num_steps):
            index = torch.full((n,), i, dtype=torch.long)
            if i not in self.branch_steps:  # one chain: before divert_start_step, or a near-deterministic step
                x = apply_step(policy, sampler, schedule, index, x, out, generator=ctx.generator).next_state
                if i + 1 < schedule.num_steps:
                    out = guided_prediction(policy, x, t[i + 1], cond, uncond, sampler.guidance_scale)
                continue
            # k candidates from the same state x_t (rows j * n + b: candidate j of chain b).
            candidates = apply_step(policy, sampler, schedule, index.repeat(k), x.repeat(k, 1, 1, 1),
                                    out.repeat(k, 1, 1, 1), generator=ctx.generator).next_state
            # Step-aware score: the exact evaluator on each candidate's one-step lookahead x0_hat.
            if i + 1 < schedule.num_steps:
                out_k = guided_prediction(policy, candidates, t[i + 1], cond_k, uncond_k, sampler.guidance_scale)
                preview = lookahead_x0(policy, sampler, schedule, i + 1, candidates, out_k)
            else:
                out_k, preview = None, candidates
            scores = self.reward(policy.decode(preview), prompts * k).float().cpu().view(k, n)
            chosen, rejected, valid = select_pair(scores, self.labeller, key=(ctx.step, i))
            grid = candidates.view(k, n, *candidates.shape[1:])
            for b in torch.nonzero(valid).flatten().tolist():
                records.append((x[b], i, grid[chosen[b], b], grid[rejected[b], b], b,
                                float(scores[chosen[b], b] - scores[rejected[b], b])))
            all_scores.append(scores)
            # Continue every chain from a uniformly random candidate (reusing its lookahead prediction).
            pick = torch.randint(k, (n,), generator=ctx.generator)
            x = grid[pick, columns]
            if out_k is not None:
                out = out_k.view(k, n, *out_k.shape[1:])[pick, columns]
        policy.denoiser.train()
        final = policy.decode(x)
        empty = x.new_zeros((0, *x.shape[1:]))
        stack = (lambda j: torch.stack([r[j] for r in records])) if records else (lambda j: empty)  # noqa: E731
        return StepPairs(
            states=stack(0), step_index=torch.tensor([r[1] for r in records], dtype=torch.long),
            chosen=stack(2), rejected=stack(3), prompt_index=torch.tensor([r[4] for r in records], dtype=torch.long),
            score_gap=torch.tensor([r[5] for r in records]), final_images=final,
            candidate_scores=torch.stack(all_scores), branch_steps=len(all_scores),
        )
    # --8<-- [end:collect]

    # --8<-- [start:loss]
    def pair_loss(self, pairs: StepPairs, rows: torch.Tensor, schedule: Schedule, sampler: SamplerConfig,
                  cond, uncond):  # noqa: ANN001, ANN201 - Conditioning
        """Step DPO loss of some pairs: one policy and one reference call at the shared state x_t."""
        x, index = pairs.states[rows], pairs.step_index[rows]
        take = pairs.prompt_index[rows]
        c, u = cond.take(take), None if uncond is None else uncond.take(take)
        t = schedule.model_timesteps.to(x.device)[index]
        out = guided_prediction(self.policy, x, t, c, u, sampler.guidance_scale)
        with torch.no_grad():
            ref_out = guided_prediction(self.reference, x, t, c, u, sampler.guidance_scale)

        def log_prob(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return apply_step(self.policy, sampler, schedule, index, x, prediction, next_state=target).log_prob

        return step_dpo_loss(log_prob(out, pairs.chosen[rows]), log_prob(ref_out, pairs.chosen[rows]),
                             log_prob(out, pairs.rejected[rows]), log_prob(ref_out, pairs.rejected[rows]),
                             self.config.beta, self.config.ratio_clip)
    # --8<-- [end:loss]

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config = self.config
        sampler = sampler_from_config(self)
        prompts = self.sample_prompts(config.batch_size, ctx.rng)
        # 1. Sample the chains, branching into k candidates at every step from divert_start_step on.
        pairs = self.collect_step_pairs(prompts, ctx, sampler)
        rewards = self.reward(pairs.final_images, prompts).float()
        # 2. One pass over the step pairs, one optimiser step per minibatch.
        schedule = make_schedule(self.policy, sampler)
        cond, uncond = encode_prompts(self.policy, prompts, sampler)
        losses, stats = [], []
        for rows in minibatch_indices(len(pairs.step_index), config.minibatch_size, ctx.rng):
            loss, stat = self.pair_loss(pairs, torch.as_tensor(rows), schedule, sampler, cond, uncond)
            loss.backward()
            self.apply_gradients()
            losses.append(float(loss.detach()))
            stats.append(stat)
        # --8<-- [end:train_step]
        mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
        possible = max(1, pairs.branch_steps * len(prompts))
        return {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "loss": mean(losses) if losses else math.log(2),
            "implicit_acc": mean([s.implicit_acc for s in stats]) if stats else 0.5,
            "log_ratio_w": mean([s.log_ratio_w for s in stats]),
            "log_ratio_l": mean([s.log_ratio_l for s in stats]),
            "clipfrac": mean([s.clipfrac for s in stats]),
            "pairs": float(len(pairs.step_index)),
            "pair_fraction": len(pairs.step_index) / possible,
            "candidate_score_mean": float(pairs.candidate_scores.mean()) if pairs.branch_steps else 0.0,
            "chosen_minus_rejected": float(pairs.score_gap.mean()) if len(pairs.score_gap) else 0.0,
            "samples": len(prompts),
        }
