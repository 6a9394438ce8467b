"""How much of one batch's gradient points the same way as the next batch's? Signal and noise of the estimators.

With the same base (``shapes-flow``), reward (``shapes-accuracy``) and batch (4 prompts x 8 images), DiffusionNFT's
``cpu`` preset raises held-out accuracy and Flow-GRPO's does not. This benchmark measures why, before any
update is taken: for each estimator it collects ``K`` independent batches at the base's weights and keeps the
gradient each batch gives the trainable (LoRA) weights, through the method's own ``train_step`` with the
optimiser step replaced by "keep the gradient, take no step". Then

* **pairwise cosine**: the mean cosine between the gradients of two different batches. With
  $g_k = \\mu + n_k$ (a shared direction plus independent noise of equal size in every batch),
  $\\mathbb E\\cos(g_j, g_k) \\approx \\lVert\\mu\\rVert^2 / \\mathbb E\\lVert g\\rVert^2$, the share of a batch
  gradient's power that is signal; 0 means no batch predicts another.
* **images for a 0.5 cosine**: averaging $m$ batches multiplies the signal-to-noise power ratio
  $s = c / (1 - c)$ by $m$, so two independent estimates agree with cosine 0.5 once $m = 1/s$; in images that
  is $32 / s$. It says how much data an update needs before its direction is mostly signal.
* **random-reward control**: the same with uniform noise as the reward. Group-normalised advantages are then
  pure noise; its cosine is the floor that no reward signal reaches (an estimator with a reward-independent
  drift would show a positive cosine here).

The intervals are 95% bootstrap intervals over batches (pairs of a batch with itself are left out).
Each row runs in its own process so rows can run in parallel (one torch thread each)::

    python -m benchmarks.gradient_agreement [ROW ...] [--batches 30] [--set KEY=VALUE ...]

Rows: flow-grpo (the preset: independent initial noise, SDE in the first 3 of 8 steps), flow-grpo-shared
(``--shared-noise true``), flow-grpo-every-step (the paper's SDE at every step, the last one not trained),
diffusion-nft (its preset), ddpo (on ``shapes-diffusion``), and ``ROW:random`` for the control of any of them. Writes ``benchmarks/results/gradient_agreement.json`` (one entry per row, merged).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_description, merge_results
from benchmarks.method_table import parse_overrides
from reference_impls.algorithms import get_method
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.rewards.registry import RewardFunction
from reference_impls.training import build_config
from reference_impls.training.method import Method, step_context

REWARD = "shapes-accuracy"
BATCH_IMAGES = 32
ROWS: dict[str, tuple[str, str, dict]] = {
    # row: (method, base model, settings on top of its cpu preset)
    "flow-grpo": ("flow-grpo", "shapes-flow", {}),
    "flow-grpo-shared": ("flow-grpo", "shapes-flow", {"shared_noise": True}),
    "flow-grpo-every-step": ("flow-grpo", "shapes-flow", {"sde_steps": 0}),
    "diffusion-nft": ("diffusion-nft", "shapes-flow", {}),
    "ddpo": ("ddpo", "shapes-diffusion", {}),
}
BOOTSTRAP = 2000
RESULTS = RESULTS_DIR / "gradient_agreement.json"


def random_reward(seed: int) -> RewardFunction:
    generator = torch.Generator().manual_seed(seed)
    return RewardFunction("random", lambda images, prompts: torch.rand(images.shape[0], generator=generator),
                          False, "uniform noise (control)")


def parse_row(row: str) -> tuple[str, bool]:
    """(row name, is the random-reward control); exits with the valid names on a bad one."""
    name, control = row.split(":", 1) if ":" in row else (row, "")
    if name not in ROWS or control not in ("", "random"):
        valid = ", ".join([*ROWS, *(f"{r}:random" for r in ROWS)])
        raise SystemExit(f"unknown row {row!r}; valid rows: {valid}")
    return name, bool(control)


def row_config(row: str, seed: int, overrides: dict | None = None):  # noqa: ANN201
    """The row's method class and its validated config (raises ValueError on an unknown or invalid setting)."""
    method_name, model, settings = ROWS[parse_row(row)[0]]
    cls = get_method(method_name)
    config = build_config(cls.config_class, cls.presets, {"preset": "cpu", "model": model, "reward": REWARD,
                                                           "seed": seed, "batch_size": BATCH_IMAGES, **settings,
                                                           **(overrides or {})})
    return cls, config


def build_method(row: str, seed: int, overrides: dict | None = None) -> Method:
    cls, config = row_config(row, seed, overrides)
    reward = random_reward(seed + 7) if parse_row(row)[1] else get_reward(REWARD)
    return cls(policy=load_policy(config.model), reward=reward, config=config)


def batch_gradient(method: Method, batch_seed: int) -> torch.Tensor:
    """The gradient one ``train_step`` would apply, summed over its minibatches, with no optimiser step taken
    (so every minibatch sees the base's weights, as the first minibatch of a real run does)."""
    parameters = [p for p in method.policy.trainable_parameters()]
    total = [torch.zeros_like(p) for p in parameters]

    def keep_gradient() -> float:
        for accumulated, parameter in zip(total, parameters):
            if parameter.grad is not None:
                accumulated += parameter.grad
        method.optimizer.zero_grad(set_to_none=True)
        return 0.0

    method.apply_gradients = keep_gradient  # type: ignore[method-assign]
    method.train_step(step_context(batch_seed, 0))
    return torch.cat([g.flatten() for g in total]).double()


def pairwise_cosines(gradients: torch.Tensor) -> np.ndarray:
    """(K, K) cosines between the rows of ``gradients``."""
    unit = gradients / gradients.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (unit @ unit.T).numpy()


def mean_offdiagonal(cosines: np.ndarray, picks: np.ndarray) -> float:
    sub = cosines[np.ix_(picks, picks)]
    different = picks[:, None] != picks[None, :]
    return float(sub[different].mean())


def summarise(gradients: torch.Tensor, seed: int) -> dict:
    cosines = pairwise_cosines(gradients)
    k = gradients.shape[0]
    everyone = np.arange(k)
    mean = mean_offdiagonal(cosines, everyone)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP):
        picks = rng.integers(0, k, size=k)
        if len(set(picks.tolist())) > 1:
            draws.append(mean_offdiagonal(cosines, picks))
    low, high = np.percentile(draws, [2.5, 97.5])
    return {
        "batches": k,
        "pairwise_cosine": mean,
        "ci_low": float(low),
        "ci_high": float(high),
        "signal_to_noise_per_batch": mean / (1 - mean) if 0 < mean < 1 else None,
        # a higher cosine needs fewer images, so the interval's ends swap; no upper end while the CI covers 0
        "images_for_cosine_half": images_for_cosine_half(mean),
        "images_for_cosine_half_low": images_for_cosine_half(float(high)),
        "images_for_cosine_half_high": images_for_cosine_half(float(low)),
        "gradient_norm_mean": float(gradients.norm(dim=1).mean()),
    }


def images_for_cosine_half(cosine: float) -> float | None:
    """Images whose averaged gradients agree with cosine 0.5: batch / s with s = c / (1 - c); None if c <= 0."""
    return BATCH_IMAGES * (1 - cosine) / cosine if 0 < cosine < 1 else None


def describe(result: dict) -> str:
    """'957 [524, 3,105]' or, while the interval covers 0, '>= 917 (no signal detected)'."""
    low, point, high = (result[f"images_for_cosine_half{s}"] for s in ("_low", "", "_high"))
    if low is None:
        return "no signal detected"
    if high is None:
        return f">= {low:,.0f} (no signal detected)"
    return f"{point:,.0f} [{low:,.0f}, {high:,.0f}]"


def row_label(row: str, overrides: dict, seed: int = 0) -> str:
    """The row's key in the results: its name, then any --set changes and a non-default --seed in brackets
    (so a repeat with other batches is stored beside the first measurement, not over it)."""
    return row + "".join(f" [{k}={v}]" for k, v in sorted(overrides.items())) + (f" [seed={seed}]" if seed else "")


def measure(row: str, batches: int, seed: int, overrides: dict | None = None) -> dict:
    torch.manual_seed(seed)
    method = build_method(row, seed, overrides)
    started = time.perf_counter()
    gradients = torch.stack([batch_gradient(method, 10_000 + seed * 1_000 + b) for b in range(batches)])
    summary = summarise(gradients, seed)
    summary.update({"row": row, "settings": overrides or {}, "seed": seed, "seconds": time.perf_counter() - started,
                    "reward": REWARD, "trainable_weights": int(gradients.shape[1])})
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", default=list(ROWS), help=f"default: {' '.join(ROWS)}")
    parser.add_argument("--batches", type=int, default=30, help="independent batches per row (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of every row's preset (repeatable); rows are stored labelled with it")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    if args.batches < 3:
        parser.error(f"--batches must be at least 3, got {args.batches}")
    torch.set_num_threads(1)
    for row in args.rows:  # fail on a bad row name or setting before any row runs
        try:
            row_config(row, args.seed, overrides)
        except ValueError as error:
            parser.error(f"{row}: {error}")
    for row in args.rows:
        result = measure(row, args.batches, args.seed, overrides)
        row = row_label(row, overrides, args.seed)
        print(f"{row:24s} cosine {result['pairwise_cosine']:+.4f} [{result['ci_low']:+.4f}, {result['ci_high']:+.4f}]"
              f"  images for cosine 0.5: {describe(result)}  ({result['seconds']:.0f} s)")
        merge_results(RESULTS, "rows", {row: result}, machine=machine_description(), batch_images=BATCH_IMAGES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
