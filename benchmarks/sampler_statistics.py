"""Do the training rollouts of the flow GRPO methods draw what the evaluation sampler draws?

GRPO learns from differences inside groups of *training rollouts* (few steps, stochastic), while every
comparison in this atlas evaluates with the deterministic 20-step ODE. If the two samplers fail in
different ways, the advantages teach a correction the evaluation does not need. This benchmark scores one
model with each sampler on the same prompts and initial noise (exact evaluator: accuracy, objects drawn
per image, count and relation criteria) and reports how many objects the prompts ask for:

    python -m benchmarks.sampler_statistics [--model shapes-flow] [--prompts 156] [--split train]

Writes ``benchmarks/results/sampler_statistics.json``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import format_table, machine_description, write_results
from reference_impls.evaluation import evaluate_policy, heldout_prompts
from reference_impls.models import load_policy
from reference_impls.sampling import SamplerConfig
from reference_impls.worlds.grammar import parse_prompt

SAMPLERS = {
    "ode, 20 steps (evaluation)": SamplerConfig("ode", num_steps=20),
    "ode, 8 steps": SamplerConfig("ode", num_steps=8),
    "sde, 8 steps, first 3 stochastic (Flow-GRPO cpu preset)": SamplerConfig("sde", num_steps=8, stochastic_window=(0, 3)),
    "sde, 8 steps, all stochastic": SamplerConfig("sde", num_steps=8),
    "sde, 8 steps, first 3, noise level 0.4": SamplerConfig("sde", num_steps=8, noise_level=0.4,
                                                           stochastic_window=(0, 3)),
    "sde, 12 steps, first 4": SamplerConfig("sde", num_steps=12, stochastic_window=(0, 4)),
    "sde, 20 steps, first 7": SamplerConfig("sde", num_steps=20, stochastic_window=(0, 7)),
    "cps, 8 steps, first 3": SamplerConfig("cps", num_steps=8, stochastic_window=(0, 3)),
    "cps, 8 steps, all stochastic": SamplerConfig("cps", num_steps=8),
}
KEYS = ("accuracy", "mean_score", "objects_per_image", "count", "relation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-flow")
    parser.add_argument("--prompts", type=int, default=156, help="prompts of the split (a fixed seeded order)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(args.model)
    prompts = heldout_prompts(args.prompts, args.split)
    asked = float(np.mean([parse_prompt(p).n_objects for p in prompts]))
    rows = []
    for name, sampler in SAMPLERS.items():
        metrics = evaluate_policy(policy, prompts, sampler, seed=0).metrics
        rows.append({"sampler": name, **{k: float(metrics[k]) for k in KEYS}})
    print(f"{args.model}, {len(prompts)} {args.split} prompts asking {asked:.2f} objects per image on average")
    print(format_table(["sampler", *KEYS], [[r["sampler"], *(r[k] for k in KEYS)] for r in rows]))
    write_results("sampler_statistics", {"machine": machine_description(), "model": args.model, "split": args.split,
                                         "prompts": len(prompts), "objects_asked": asked, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
