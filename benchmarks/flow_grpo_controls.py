"""Two controls for Flow-GRPO's drift towards more objects, each one seed, paired with the base.

On ``shapes-flow`` every Flow-GRPO update large enough to move the model made it draw more objects per
image at evaluation, and accuracy fell. Two explanations can be ruled in or out directly:

* ``random``: the reward is replaced by uniform noise. Group-normalised advantages are then pure noise,
  so any systematic drift would be a bias of the estimator or the optimiser, not something the reward asks for.
* ``lambda=X``: the matched score's cost of an unrequested object (``EXTRA_OBJECT_COST``, 1/2) is set to X
  for the run. With X = 1 an extra object costs as much as a missing one, so a reward-shape explanation
  ("insurance objects are cheap") predicts the drift goes away.

Each control trains ``flow-grpo --preset cpu --learning-rate 1e-3`` as the preset was when they were measured
(60 iterations, KL weight 0.04, reward ``shapes-matched``; the setting whose drift was clearest) and compares
the result with the base on the held-out split, two draws per prompt, same noise and ODE sampler, as
``rlvg compare`` does::

    python -m benchmarks.flow_grpo_controls random lambda=1 [--model shapes-flow] [--seed 0]

Writes ``benchmarks/results/flow_grpo_controls.json``.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_description, merge_results
from reference_impls.algorithms import get_method
from reference_impls.comparison import compare_scores, comparison_prompts, score_model
from reference_impls.evaluation import default_eval_sampler
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.rewards.registry import RewardFunction
from reference_impls.training import build_config, train

LEARNING_RATE = 1e-3
DRAWS = 2
# The cpu preset these controls were measured with, before it went to 5x the images (2026-12-07), and the
# reward it trained on then (the matched score, ``shapes-composition`` at the time).
PRESET_WHEN_MEASURED = {"steps": 60, "kl_coef": 0.04, "eval_every": 20}


def _evaluate_module():  # noqa: ANN202
    """The evaluator's module itself: ``reference_impls.worlds`` re-exports a function named ``evaluate``, so
    ``import reference_impls.worlds.evaluate as m`` would bind that function, and setting an attribute on it
    would change nothing."""
    return importlib.import_module("reference_impls.worlds.evaluate")


def _reward(control: str, seed: int) -> RewardFunction:
    if control == "random":
        generator = torch.Generator().manual_seed(seed + 123)
        return RewardFunction("random", lambda images, prompts: torch.rand(images.shape[0], generator=generator),
                              False, "uniform noise (control)")
    if control.startswith("lambda="):
        _evaluate_module().EXTRA_OBJECT_COST = float(control.split("=", 1)[1])  # read at every call of matched_score
        return get_reward("shapes-matched")
    raise ValueError(f"unknown control {control!r}; valid: random, lambda=X")


def run_control(control: str, model: str, seed: int, out: Path) -> dict:
    cls = get_method("flow-grpo")
    config = build_config(cls.config_class, cls.presets, {"preset": "cpu", "model": model, "seed": seed,
                                                           "reward": "shapes-matched", **PRESET_WHEN_MEASURED,
                                                           "learning_rate": LEARNING_RATE, "threads": 1})
    evaluate = _evaluate_module()
    default_cost = evaluate.EXTRA_OBJECT_COST
    try:
        train(cls(policy=load_policy(model), reward=_reward(control, seed), config=config), out, progress=True)
    finally:
        evaluate.EXTRA_OBJECT_COST = default_cost  # the comparison scores with the shipped definition
    prompts = comparison_prompts("heldout")
    scores = []
    for folder in (model, out / "final"):
        policy = load_policy(str(folder))
        scores.append(score_model(policy, prompts, default_eval_sampler(policy, 20), 0, DRAWS))
    report = compare_scores(prompts, scores[0], [scores[1]], DRAWS)
    return {"control": control, "seed": seed, "learning_rate": LEARNING_RATE,
            "rows": {k: report.rows[k].as_dict() for k in ("accuracy", "mean_score", "objects_per_image",
                                                           "task_position")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("controls", nargs="+", help="random and/or lambda=X")
    parser.add_argument("--model", default="shapes-flow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/flow-grpo-controls")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = [run_control(c, args.model, args.seed, Path(args.out) / c.replace("=", "")) for c in args.controls]
    for result in results:
        rows = result["rows"]
        print(result["control"], " ".join(f"{k} {v['diff']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"
                                          for k, v in rows.items()))
    # one entry per control, merged under a lock, so controls run in separate processes all land
    merge_results(RESULTS_DIR / "flow_grpo_controls.json", "runs", {r["control"]: r for r in results},
                  machine=machine_description(), model=args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
