"""Reward over-optimisation of reward backpropagation: proxy reward and exact score against KL to the base.

DRaFT-K (``rlvg train draft-k``) follows the gradient of the learned proxy ``shapes-learned``, a small
network trained to imitate the exact ShapeWorld evaluator. The exact evaluator is never seen in training,
so it plays the part that human judgement plays for PickScore or HPS: when the proxy keeps rising and the
exact score stops or falls, the policy has found what the proxy gets wrong (Gao et al.'s over-optimisation
curves; Clark et al. show the same with DRaFT on aesthetics).

For each learning rate the benchmark trains DRaFT-K's ``cpu`` preset and, every ``--eval-every``
iterations, measures on the same held-out prompts and initial noise:

* the proxy reward and the exact evaluator's accuracy and matched score (deterministic sampler);
* the KL divergence from the trained model's sampling chain to the base model's, both run as DDPM chains
  (eta = 1) of ``--kl-steps`` steps. Both chains share each step's variance, so by the chain rule

      KL(p_theta || p_base) = E_{x ~ p_theta} sum_t ||mu_theta(x_t) - mu_base(x_t)||^2 / (2 sigma_t^2),

  summed over pixels and estimated on the trained model's own trajectories (the same quantity DPOK bounds).

    python -m benchmarks.overoptimisation [--learning-rates 1e-4 1e-3] [--steps 60] [--eval-every 10]

Writes ``benchmarks/results/overoptimisation.json``; the site's Results page draws the figure from it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import format_table, machine_description, write_results
from reference_impls.algorithms import METHODS
from reference_impls.algorithms.estimators import gaussian_mean_kl
from reference_impls.evaluation import heldout_prompts
from reference_impls.models import load_policy
from reference_impls.models.policy import GenerativePolicy
from reference_impls.rewards import get_reward
from reference_impls.sampling import SamplerConfig, rollout, transition_log_prob
from reference_impls.training import build_config, train

METHOD = "draft-k"
REWARD = "shapes-learned"
KL_SEED = 1234


@torch.no_grad()
def chain_kl(policy: GenerativePolicy, base: GenerativePolicy, prompts: list[str], num_steps: int) -> float:
    """Mean over prompts of KL(policy chain || base chain), DDPM steps, summed over steps and pixels."""
    config = SamplerConfig(name="ddim", num_steps=num_steps, eta=1.0)
    trajectory = rollout(policy, prompts, config, torch.Generator().manual_seed(KL_SEED))
    total = torch.zeros(len(prompts))
    for i in range(trajectory.num_steps):
        mine = transition_log_prob(policy, trajectory, i)
        theirs = transition_log_prob(base, trajectory, i)
        if float(torch.as_tensor(mine.std).max()) > 1e-8:  # the last DDIM step can be deterministic: no density, no KL term
            total += gaussian_mean_kl(mine.mean, theirs.mean, mine.std, reduction="sum")
    return float(total.mean())


def run(learning_rate: float, steps: int, eval_every: int, eval_prompts: int, kl_prompts: int,
        kl_steps: int, seed: int) -> list[dict]:
    cls = METHODS[METHOD]
    config = build_config(cls.config_class, cls.presets, {
        "preset": "cpu", "reward": REWARD, "learning_rate": learning_rate, "steps": steps,
        "eval_every": eval_every, "eval_prompts": eval_prompts, "checkpoint_every": steps, "seed": seed,
        "threads": 1})
    method = cls(policy=load_policy(config.model), reward=get_reward(REWARD), config=config)
    base = load_policy(config.model)
    prompts = heldout_prompts(kl_prompts)
    points: list[dict] = [{"step": 0, "kl": 0.0}]

    def on_step(record: dict) -> None:
        if "eval_accuracy" in record:
            points.append({"step": record["step"], "kl": chain_kl(method.policy, base, prompts, kl_steps)})

    with tempfile.TemporaryDirectory() as out:
        records = train(method, Path(out), progress=True, on_step=on_step)
    evals = {r["step"]: r for r in records if "eval_accuracy" in r}
    return [{"step": p["step"], "samples_seen": evals[p["step"]]["samples_seen"], "kl": p["kl"],
             "proxy_reward": evals[p["step"]]["eval_reward_mean"], "accuracy": evals[p["step"]]["eval_accuracy"],
             "mean_score": evals[p["step"]]["eval_mean_score"]} for p in points]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-4, 1e-3],
                        help="the cpu preset's rate and a higher one (default 1e-4 1e-3)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-prompts", type=int, default=64, help="held-out prompts of each evaluation")
    parser.add_argument("--kl-prompts", type=int, default=32)
    parser.add_argument("--kl-steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = []
    for rate in args.learning_rates:
        curve = run(rate, args.steps, args.eval_every, args.eval_prompts, args.kl_prompts, args.kl_steps, args.seed)
        runs.append({"learning_rate": rate, "curve": curve})
        print(format_table(["step", "KL", "proxy", "accuracy", "score"],
                           [[p["step"], f"{p['kl']:.2f}", f"{p['proxy_reward']:.3f}", f"{p['accuracy']:.3f}",
                             f"{p['mean_score']:.3f}"] for p in curve]))
    payload = {"machine": machine_description(), "method": METHOD, "reward": REWARD, "seed": args.seed,
               "settings": vars(args), "runs": runs,
               "command": "python -m benchmarks.overoptimisation " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"wrote {write_results('overoptimisation', payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
