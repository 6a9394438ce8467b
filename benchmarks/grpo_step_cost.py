"""Cost of one outer iteration (collect + score + update) of each GRPO variant, in the same setting.

Every variant runs with the same model (``shapes-flow``), reward, batch, group size and number of
denoising steps; only its own mechanism differs (Flow-GRPO trains every SDE step, DanceGRPO a random
fraction of them, MixGRPO the steps of its SDE window, TempFlow-GRPO one branching step per group).
Iterations are timed round-robin (A, B, C, D, A, B, ...) and summarised by the median, and each is
reported as a ratio to Flow-GRPO, next to the number of denoiser forward+backward passes per image that
its update made. MixGRPO's saving shows as fewer trained steps and a ratio below 1. DiffusionNFT is timed
beside them: it samples with the ODE and its "trained steps" are the noise levels each clean image is
fitted at (a forward pass of the old and reference models and a forward+backward of the trained one each).
Flow-GRPO is also timed with its KL term (``kl_coef=0.04``, the paper's; the ``cpu`` preset leaves it out): the
term needs a forward pass of the frozen reference at every trained step, and it stayed inert (under 2e-5 per
pixel) in every measured CPU run.

    python -m benchmarks.grpo_step_cost [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import format_table, machine_description, write_results
from reference_impls.algorithms import METHODS
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.training import build_config
from reference_impls.training.method import Method, step_context

# Row label -> (method, settings that differ from its cpu preset).
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "flow-grpo": ("flow-grpo", {}),
    "flow-grpo, with the KL term": ("flow-grpo", {"kl_coef": 0.04}),
    "dance-grpo": ("dance-grpo", {}),
    "mix-grpo": ("mix-grpo", {}),
    "tempflow-grpo": ("tempflow-grpo", {}),
    "diffusion-nft": ("diffusion-nft", {}),
}
SHARED_SETTINGS = dict(model="shapes-flow", reward="shapes-composition", batch_size=32, group_size=8,
                       num_steps=10, minibatch_size=32, eval_every=0, seed=0)


def build(name: str, overrides: dict[str, object]) -> Method:
    cls = METHODS[name]
    config = build_config(cls.config_class, cls.presets, {"preset": "cpu", **SHARED_SETTINGS, **overrides})
    return cls(policy=load_policy(config.model), reward=get_reward(config.reward, config.reward_model or None), config=config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, results not saved")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else 6
    methods = {label: build(name, overrides) for label, (name, overrides) in VARIANTS.items()}
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rollout: dict[str, list[float]] = {name: [] for name in VARIANTS}
    trained: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(rounds + 1):  # round 0 is warm-up
        for name, method in methods.items():
            ctx = step_context(0, round_index, device="cpu")
            start = time.perf_counter()
            metrics = method.train_step(ctx)
            elapsed = time.perf_counter() - start
            if round_index == 0:
                continue
            seconds[name].append(elapsed)
            rollout[name].append(metrics.get("time_rollout_s", float("nan")))
            trained[name].append(metrics.get("trained_steps", float("nan")))
    baseline = statistics.median(seconds["flow-grpo"])
    rows = []
    for name, (method_name, overrides) in VARIANTS.items():
        median = statistics.median(seconds[name])
        rows.append({"method": method_name, "variant": name, "settings": overrides,
                     "bib_key": METHODS[method_name].bib_key, "median_step_s": median,
                     "median_rollout_s": statistics.median(rollout[name]),
                     "trained_steps_per_image": statistics.median(trained[name]),
                     "ratio_to_flow_grpo": median / baseline})
    print(format_table(["variant", "step (s)", "rollout (s)", "trained steps / image", "ratio to Flow-GRPO"],
                       [[r["variant"], r["median_step_s"], r["median_rollout_s"], r["trained_steps_per_image"],
                         r["ratio_to_flow_grpo"]] for r in rows]))
    if args.quick:
        return 0
    settings = {**SHARED_SETTINGS, "rounds": rounds, "timing": "round-robin, median over rounds after one warm-up"}
    path = write_results("grpo_step_cost", {"machine": machine_description(), "settings": settings, "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
