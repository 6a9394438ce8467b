r"""Diffusion-DPO: direct preference optimisation on offline image pairs (Wallace et al., 2024).

Bib key: ``wallace2023diffusiondpo``.

Given pairs $(c, x^w_0, x^l_0)$ where $x^w_0$ was preferred, noise both images with the *same* timestep
$t \sim \mathcal U\{0, \dots, 999\}$ and the *same* noise $\epsilon$, and compare how much better the
model denoises each than the frozen reference does:

$$
\Delta^\bullet = \mathrm{mse}\big(\epsilon_\theta(x^\bullet_t, t, c), \epsilon\big) - \mathrm{mse}\big(\epsilon_\text{ref}(x^\bullet_t, t, c), \epsilon\big),
\qquad
L(\theta) = -\,\mathbb E\Big[\log\sigma\Big(-\frac{\beta}{2}\,\big(\Delta^w - \Delta^l\big)\Big)\Big],
$$

with ``mse`` the squared error **averaged** over the $D$ pixels (or latent dimensions).

**Beta convention.** This is the official code's loss: ``beta`` is its ``--beta_dpo`` (5000 in the released
SD1.5 and SDXL launch scripts), multiplied by $-\tfrac12$ and applied to per-dimension *means*. The paper
writes the coefficient as $\beta T\omega(\lambda_t)$ in front of *summed* squared errors, so the two
numbers are related by $\beta_\text{paper}\, T\,\omega(\lambda_t) = \beta / (2D)$: the code's $\beta$
absorbs the number of timesteps $T$, the weighting $\omega$, the $\tfrac12$ of the Gaussian KL and the
reduction over pixels. Our ShapeWorld images have $D = 3 \times 32 \times 32 = 3072$; SD1.5's latents
$D = 4 \times 64 \times 64$.

For a flow (velocity) model the same loss is written in velocity errors: $x_s = (1 - s)x_0 + s\epsilon$,
target $\epsilon - x_0$, $s \sim \mathcal U(0, 1)$ (the pretraining objective's noising).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from reference_impls.evaluation import default_eval_sampler
from reference_impls.models.policy import Conditioning, GenerativePolicy
from reference_impls.rewards.preferences import SyntheticLabeller, build_preference_bank
from reference_impls.sampling import rollout
from reference_impls.training.config import TrainConfig
from reference_impls.training.method import Method, StepContext


@dataclass
class DiffusionDPOConfig(TrainConfig):
    """Diffusion-DPO's settings: the offline preference bank, the labeller, and beta."""

    reward: str = "shapes-composition"
    """Score the synthetic labeller judges with (it prefers higher scores, with Bradley-Terry noise)."""
    beta: float = 5000.0
    """beta of the official code: the loss is -log sigmoid(-beta/2 (Delta_w - Delta_l)) on per-pixel mean errors."""
    num_pairs: int = 256
    """Prompts in the preference bank (two base-model images each); tied pairs are dropped."""
    bank_steps: int = 20
    """Denoising steps of the deterministic sampler (DDIM eta=0 / flow ODE) that draws the bank's images."""
    bank_guidance_scale: float = 1.0
    """Classifier-free guidance when drawing the bank's images."""
    bank_seed: int = 0
    """Seeds the bank's prompts, noise and labels (independent of --seed, so runs share one bank)."""
    cache_dir: str = ""
    """Folder of cached preference banks ('' = $RLVG_CACHE_DIR/preference-banks or ~/.cache/rlvg/...)."""
    labeller_temperature: float = 0.1
    """Bradley-Terry temperature T of the synthetic labeller: P(a > b) = sigmoid((s_a - s_b) / T)."""
    tie_margin: float = 0.0
    """Pairs whose exact scores differ by at most this are ties and are dropped."""
    monitor_samples: int = 8
    """Fixed training prompts sampled (fixed noise, deterministic sampler) each step to log reward_mean."""

    def validate(self) -> None:
        super().validate()
        if self.num_pairs < 1 or self.monitor_samples < 1:
            raise ValueError("--num-pairs and --monitor-samples must be >= 1")


PRESETS: dict[str, dict[str, Any]] = {
    # JPEG compressibility (as DDPO's smoke run): a global image property a few offline updates can move.
    "smoke": dict(steps=8, batch_size=8, num_pairs=32, bank_steps=10, num_steps=6, learning_rate=3e-5,
                  reward="jpeg-compressibility", labeller_temperature=0.02, eval_every=0, eval_prompts=8,
                  checkpoint_every=4, prompts="easy"),
    "cpu": dict(steps=40, batch_size=16, num_pairs=256, bank_steps=10, num_steps=10, learning_rate=1e-5,
                eval_every=20, eval_prompts=64, checkpoint_every=20),
    "gpu": dict(steps=500, batch_size=64, num_pairs=4096, bank_steps=50, bank_guidance_scale=5.0,
                num_steps=20, learning_rate=1e-5, eval_every=50, eval_prompts=256, checkpoint_every=50,
                guidance_scale=5.0),
}


# --8<-- [start:noising]
def sample_noise_levels(policy: GenerativePolicy, n: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels as in pretraining: integer t ~ U{0..T-1} (diffusion) or s ~ U(0, 1) (flow)."""
    if policy.kind == "diffusion":
        return torch.randint(0, int(policy.scheduler.config.num_train_timesteps), (n,), generator=generator)
    return torch.rand(n, generator=generator)


def noised(policy: GenerativePolicy, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, model timestep, regression target) of the pretraining objective.

    diffusion: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, target eps;
    flow:      x_s = (1 - s) x0 + s eps, target eps - x0, model timestep 1000 s.
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    if policy.kind == "diffusion":
        a = policy.scheduler.alphas_cumprod.to(x0.device, torch.float32)[level].view(shape)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, level.to(x0.device), noise
    s = level.to(x0.device, x0.dtype).view(shape)
    steps = float(policy.scheduler.config.num_train_timesteps)
    return (1 - s) * x0 + s * noise, level.to(x0.device) * steps, noise - x0


def denoising_errors(policy: GenerativePolicy, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     target: torch.Tensor) -> torch.Tensor:
    """(B,) squared error of the denoiser's prediction, averaged over pixels (the official reduction)."""
    error = (policy.predict(x_t, timestep, cond).float() - target.float()) ** 2
    return error.mean(dim=tuple(range(1, error.dim())))
# --8<-- [end:noising]


@dataclass
class DPOStats:
    """Diagnostics of one Diffusion-DPO minibatch."""

    implicit_acc: float
    """Fraction of pairs whose implicit reward ranks the winner first (inside term > 0)."""
    implicit_margin: float
    """Mean inside term -beta/2 (Delta_w - Delta_l)."""
    delta_w: float
    """Mean Delta_w: model minus reference error on winners (negative = better than the reference)."""
    delta_l: float
    """Mean Delta_l on losers."""


# --8<-- [start:loss]
def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
                       beta: float) -> tuple[torch.Tensor, DPOStats]:
    """-mean log sigmoid(-beta/2 [(err_w - ref_err_w) - (err_l - ref_err_l)]); errors are per-pixel means.

    Equal errors give log 2. Lowering the winner's error relative to the reference (or raising the
    loser's) lowers the loss.
    """
    delta_w, delta_l = err_w - ref_err_w, err_l - ref_err_l
    inside = -0.5 * beta * (delta_w - delta_l)
    loss = -F.logsigmoid(inside).mean()
    with torch.no_grad():
        stats = DPOStats(float((inside > 0).float().mean()), float(inside.mean()), float(delta_w.mean()),
                         float(delta_l.mean()))
    return loss, stats
# --8<-- [end:loss]


class PreferenceMonitor:
    """reward_mean of offline methods: fresh samples on fixed training prompts with fixed noise.

    The same prompts and noise every step make the curve a paired comparison; the samples are only
    scored, never trained on.
    """

    def __init__(self, method: Method, prompts: list[str], seed: int) -> None:
        self.method, self.prompts, self.seed = method, prompts, seed
        self.sampler = default_eval_sampler(method.policy, num_steps=method.config.num_steps,
                                            guidance_scale=method.config.guidance_scale)

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        policy = self.method.policy
        was_training = policy.denoiser.training
        policy.denoiser.eval()
        generator = torch.Generator(device=policy.device).manual_seed(self.seed)
        images = rollout(policy, self.prompts, self.sampler, generator).images
        policy.denoiser.train(was_training)
        rewards = self.method.reward(images, self.prompts).float()
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std(unbiased=False))}


def make_bank(method: Method, config: DiffusionDPOConfig, labeller: SyntheticLabeller):  # noqa: ANN201
    """The offline data: two base-model samples for each of ``num_pairs`` training prompts (cached)."""
    prompts = method.sample_prompts(config.num_pairs, np.random.default_rng([config.bank_seed, 2024]))
    sampler = default_eval_sampler(method.policy, num_steps=config.bank_steps,
                                   guidance_scale=config.bank_guidance_scale)
    return build_preference_bank(method.policy, prompts, sampler, seed=config.bank_seed, reward=labeller.reward,
                                 cache_dir=config.cache_dir or None)


class DiffusionDPO(Method):
    """Diffusion-DPO: offline pairs, shared noise and timestep per pair, frozen reference."""

    name: ClassVar[str] = "diffusion-dpo"
    bib_key: ClassVar[str] = "wallace2023diffusiondpo"
    config_class: ClassVar[type] = DiffusionDPOConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    config: DiffusionDPOConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        config = self.config
        self.reference = self.frozen_copy()
        self.labeller = SyntheticLabeller(config.reward, config.labeller_temperature, config.tie_margin,
                                          seed=config.bank_seed)
        self.bank = make_bank(self, config, self.labeller)
        self.pairs = self.bank.pairs(self.labeller)
        if len(self.pairs) == 0:
            raise ValueError(f"all {len(self.bank)} pairs of the preference bank are ties; raise --num-pairs")
        self.monitor = PreferenceMonitor(self, self.bank.prompts[: config.monitor_samples], seed=config.bank_seed + 1)

    # --8<-- [start:train_step]
    def train_step(self, ctx: StepContext) -> dict[str, float]:
        config, policy, pairs = self.config, self.policy, self.pairs
        device = policy.device
        # 1. A minibatch of preference pairs (c, x_w, x_l).
        rows = torch.as_tensor(ctx.rng.choice(len(pairs), size=min(config.batch_size, len(pairs)), replace=False))
        n = len(rows)
        x0 = torch.cat([pairs.winners[rows], pairs.losers[rows]]).to(device)
        with torch.no_grad():
            cond = policy.encode_text([pairs.prompts[int(i)] for i in rows]).detach()
        # 2. The same timestep and the same noise for both images of a pair.
        level = sample_noise_levels(policy, n, ctx.generator).repeat(2)
        noise = torch.randn((n, *x0.shape[1:]), generator=ctx.generator).to(device)
        noise = torch.cat([noise, noise])
        x_t, timestep, target = noised(policy, x0, noise, level)
        both = Conditioning.cat([cond, cond])
        # 3. Denoising errors of the model and of the frozen reference; the DPO loss on their differences.
        errors = denoising_errors(policy, x_t, timestep, both, target)
        with torch.no_grad():
            ref_errors = denoising_errors(self.reference, x_t, timestep, both, target)
        loss, stats = diffusion_dpo_loss(errors[:n], errors[n:], ref_errors[:n], ref_errors[n:], config.beta)
        loss.backward()
        grad_norm = self.apply_gradients()
        # --8<-- [end:train_step]
        return {
            **self.monitor(),
            "loss": float(loss.detach()),
            "implicit_acc": stats.implicit_acc,
            "implicit_margin": stats.implicit_margin,
            "delta_w": stats.delta_w,
            "delta_l": stats.delta_l,
            "grad_norm": grad_norm,
            "pair_score_gap": float((pairs.winner_scores[rows] - pairs.loser_scores[rows]).mean()),
            "label_agreement": pairs.agreement if math.isfinite(pairs.agreement) else 1.0,
            "samples": 2 * n,
        }
