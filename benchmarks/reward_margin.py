r"""Is a reward aligned with accuracy *at the margin*, where a policy gradient works?

A reward can be aligned at its optimum (only the requested image scores 1) and still pay, around the images
the model draws now, for something other than accuracy. This benchmark measures the slope a reward gives
before any training. It draws groups of images per prompt from the base with a training sampler, turns each
candidate reward into group-normalised advantages $A$ exactly as the GRPO presets do, and reports for each
metric $m$ (accuracy, objects per image) the mean of $A\,m$ over images:

$$ \text{slope}_r(m) = \frac{1}{N}\sum_i A_r(x_i)\, m(x_i)
   = \mathbb E_\text{prompt}\big[\operatorname{Cov}_\text{group}(A_r, m)\big]. $$

Why that number: an update that tilts each prompt's distribution of images towards positive advantage,
$p'(x) \propto p(x)\,e^{\eta A_r(x)}$ (the maximiser of $\mathbb E_{p'}[A_r] - \mathrm{KL}(p' \Vert p)/\eta$, which
policy-gradient and reward-weighted methods approach in small steps), changes the
expected metric by $\eta\,\operatorname{Cov}(A_r, m) + O(\eta^2)$. So the slope is what one small step
on reward $r$ does to accuracy, or to the number of objects drawn, before the estimator's noise enters.
A reward is aligned at the margin when its accuracy slope is close to that of the binary accuracy reward
(the column *relative to accuracy reward*; the binary reward maximises it up to the advantage
normalisation) and its object slope is no larger than the accuracy reward's own (an exactly right image
may hold more objects than a wrong one that misses some). The random reward is the control: both slopes 0.

Every reward is computed from the same images and the same detections, so differences between rows are
paired. Intervals are 95% bootstrap intervals over prompts (a group of images is resampled whole).

    python -m benchmarks.reward_margin [--prompts 256] [--group-size 8] [--model shapes-flow]

Writes ``benchmarks/results/reward_margin.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from benchmarks.common import format_table, machine_description, write_results
from reference_impls.algorithms.estimators import group_advantages
from reference_impls.evaluation import generate, heldout_prompts
from reference_impls.models import load_policy
from reference_impls.rewards.registry import accuracy_and_matched
from reference_impls.sampling import SamplerConfig
from reference_impls.worlds import Evaluation, matched_score
from reference_impls.worlds.grammar import parse_prompt
from reference_impls.worlds.registry import get_world, to_uint8

# The Flow-GRPO `cpu` preset's rollouts: 8 steps, the SDE in the first 3, groups of 8, 4 prompts a batch.
TRAINING_SAMPLER = SamplerConfig("sde", num_steps=8, stochastic_window=(0, 3))
PROMPTS_PER_BATCH = 4

RewardOfImage = Callable[[Evaluation, np.random.Generator], float]
CANDIDATES: dict[str, RewardOfImage] = {
    "shapes-accuracy (binary)": lambda e, rng: float(e.correct),
    "shapes-matched (matched score, lambda = 1/2)": lambda e, rng: e.score,
    "matched score, lambda = 1": lambda e, rng: matched_score(e.objects, e.prompt, extra_object_cost=1.0),
    "matched score, lambda = 2": lambda e, rng: matched_score(e.objects, e.prompt, extra_object_cost=2.0),
    "shapes-composition: (accuracy + matched score) / 2": lambda e, rng: accuracy_and_matched(e),
    "matched score squared": lambda e, rng: e.score ** 2,
    "shapes-criteria (gameable)": lambda e, rng: e.criteria_score,
    "random (control)": lambda e, rng: float(rng.uniform()),
}


def advantages(rewards: np.ndarray, group_size: int, batch_images: int) -> np.ndarray:
    """Group-normalised advantages with the batch's std, batch by batch (the GRPO `cpu` presets)."""
    out = [group_advantages(torch.as_tensor(rewards[s:s + batch_images]), group_size, std_scope="batch").numpy()
           for s in range(0, len(rewards), batch_images)]
    return np.concatenate(out).astype(np.float64)


def slopes_with_interval(adv: np.ndarray, metric: np.ndarray, group_size: int, draws: np.ndarray) -> dict[str, float]:
    """Mean of A * m with a bootstrap interval over prompts (``draws``: resampled group indices)."""
    per_group = (adv * metric).reshape(-1, group_size).mean(axis=1)
    boot = per_group[draws].mean(axis=1)
    return {"mean": float(per_group.mean()), "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975))}


def ratio_with_interval(num: np.ndarray, den: np.ndarray, group_size: int, draws: np.ndarray) -> dict[str, float]:
    """Ratio of two slopes, bootstrapped jointly over prompts."""
    num_g = num.reshape(-1, group_size).mean(axis=1)
    den_g = den.reshape(-1, group_size).mean(axis=1)
    boot = num_g[draws].mean(axis=1) / den_g[draws].mean(axis=1)
    return {"mean": float(num_g.mean() / den_g.mean()), "low": float(np.quantile(boot, 0.025)),
            "high": float(np.quantile(boot, 0.975))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-flow")
    parser.add_argument("--prompts", type=int, default=256, help="training prompts (a fixed seeded order)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.group_size < 2 or args.prompts < 2:
        parser.error(f"--group-size {args.group_size} and --prompts {args.prompts}: both must be at least 2 "
                     "(a group of one image has no advantage; one prompt has no interval)")
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    if policy.kind != "flow":
        raise SystemExit(f"--model {args.model!r} is a {policy.kind} model; this benchmark samples with the "
                         "Flow-GRPO preset's SDE and needs a flow model (shapes-flow)")
    prompts = [p for p in heldout_prompts(args.prompts, "train") for _ in range(args.group_size)]
    images = generate(policy, prompts, TRAINING_SAMPLER, seed=args.seed)
    evaluations = get_world("shapes").evaluate(to_uint8(images), prompts)
    accuracy = np.array([float(e.correct) for e in evaluations])
    objects = np.array([float(len(e.objects)) for e in evaluations])
    asked = np.array([float(parse_prompt(p).n_objects) for p in prompts])
    rng = np.random.default_rng(args.seed)
    groups = len(prompts) // args.group_size
    draws = rng.integers(0, groups, size=(args.bootstrap, groups))
    batch_images = PROMPTS_PER_BATCH * args.group_size
    reward_rng = np.random.default_rng(args.seed + 1)
    adv_accuracy = advantages(accuracy, args.group_size, batch_images)
    rows = []
    for name, reward_of in CANDIDATES.items():
        rewards = np.array([reward_of(e, reward_rng) for e in evaluations])
        adv = advantages(rewards, args.group_size, batch_images)
        varied = rewards.reshape(-1, args.group_size).std(axis=1) > 0
        rows.append({
            "reward": name,
            "mean_reward": float(rewards.mean()),
            "groups_with_signal": float(varied.mean()),
            "accuracy_slope": slopes_with_interval(adv, accuracy, args.group_size, draws),
            "relative_to_accuracy_reward": ratio_with_interval(adv * accuracy, adv_accuracy * accuracy,
                                                               args.group_size, draws),
            "objects_slope": slopes_with_interval(adv, objects, args.group_size, draws),
        })

    def ci(d: dict[str, float]) -> str:
        return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    print(f"{args.model}: {groups} training prompts x {args.group_size} images, Flow-GRPO cpu rollouts; "
          f"accuracy {accuracy.mean():.3f}, objects per image {objects.mean():.2f} for {asked.mean():.2f} asked")
    print(format_table(["reward", "groups with signal", "accuracy slope", "relative to accuracy reward",
                        "objects slope"],
                       [[r["reward"], r["groups_with_signal"], ci(r["accuracy_slope"]),
                         ci(r["relative_to_accuracy_reward"]), ci(r["objects_slope"])] for r in rows]))
    write_results("reward_margin", {
        "machine": machine_description(), "model": args.model, "split": "train", "prompts": groups,
        "group_size": args.group_size, "prompts_per_batch": PROMPTS_PER_BATCH, "seed": args.seed,
        "sampler": "sde, 8 steps, first 3 stochastic (Flow-GRPO cpu preset)",
        "base_accuracy": float(accuracy.mean()), "objects_per_image": float(objects.mean()),
        "objects_asked": float(asked.mean()), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
