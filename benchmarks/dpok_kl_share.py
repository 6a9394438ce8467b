"""How much of DPOK's update comes from its KL term, for a range of beta.

Adam rescales the whole gradient, so only the ratio beta / alpha matters, and a KL whose gradient is a
fraction of a percent of the surrogate's is inert (the review that asked for this found 0.37% at the old
preset, alpha = 10, beta = 0.01). For each beta the benchmark runs DPOK's ``cpu`` preset for a few
iterations, then measures on one fresh batch the norms of the two gradients separately:

    share = ||beta * grad KL|| / ||alpha * grad surrogate||

and writes ``benchmarks/results/dpok_kl_share.json``. The preset's beta is the one whose share is of order
0.1-1: the KL then visibly shapes the update without freezing the policy.

    python -m benchmarks.dpok_kl_share [--iterations 4] [--betas 0.01 1 10 100 1000]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from benchmarks.common import RESULTS_DIR, format_table, machine_description
from reference_impls.algorithms.ddpo import advantages_from_rewards, draw_prompts
from reference_impls.algorithms.dpok import DPOK, dpok_regulariser
from reference_impls.algorithms.estimators import ppo_clip_loss
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.sampling import transition_log_prob
from reference_impls.training import build_config
from reference_impls.training.method import step_context
from reference_impls.training.online import collect, training_steps


def _grad_norm(loss: torch.Tensor, parameters: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True, retain_graph=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def kl_share(beta: float, iterations: int, seed: int = 0) -> dict:
    config = build_config(DPOK.config_class, DPOK.presets, {"preset": "cpu", "kl_coef": beta, "seed": seed,
                                                            "reward": "shapes-matched", "threads": 1})  # what it was measured with
    method = DPOK(policy=load_policy(config.model), reward=get_reward(config.reward, config.reward_model or None), config=config)
    for step in range(iterations):
        method.train_step(step_context(seed, step))
    ctx = step_context(seed, iterations)
    prompts = draw_prompts(method, config, ctx.rng)
    batch = collect(method, ctx, prompts)
    advantages = advantages_from_rewards(batch.rewards, prompts, config, method.tracker)
    steps = training_steps(batch.trajectory, config.timestep_fraction, ctx.rng, config.min_step_std)
    rows = torch.arange(min(config.minibatch_size, len(prompts)))
    sub = batch.trajectory.subset(rows)
    step = steps[rows, 0]
    new = transition_log_prob(method.policy, sub, step)
    with torch.no_grad():
        reference = transition_log_prob(method.pretrained, sub, step)
    old = sub.log_probs[torch.arange(len(rows)), step]
    surrogate, _ = ppo_clip_loss(new.log_prob, old, advantages[rows], config.clip_range)
    kl = dpok_regulariser(new, reference, config).mean()
    parameters = method.policy.trainable_parameters()
    surrogate_norm = _grad_norm(config.reward_weight * surrogate, parameters)
    kl_norm = _grad_norm(config.kl_coef * kl, parameters)
    return {"beta": beta, "alpha": config.reward_weight, "iterations": iterations, "kl": float(kl.detach()),
            "surrogate_grad_norm": surrogate_norm, "kl_grad_norm": kl_norm,
            "share": kl_norm / max(surrogate_norm, 1e-30)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.01, 1.0, 10.0, 100.0, 1000.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [kl_share(beta, args.iterations) for beta in args.betas]
    out = RESULTS_DIR / "dpok_kl_share.json"
    out.write_text(json.dumps({"machine": machine_description(), "rows": rows}, indent=2) + "\n", encoding="utf-8")
    print(format_table(["beta", "alpha", "KL", "|grad KL|", "|grad surrogate|", "share"],
                       [[r["beta"], r["alpha"], r["kl"], r["kl_grad_norm"], r["surrogate_grad_norm"], r["share"]]
                        for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
