"""Every method in its ``cpu`` preset on ShapeWorld: held-out accuracy before and after, samples, wall time.

Each method runs ``rlvg train METHOD --preset cpu`` semantics (the method's own cpu preset; online methods
on the ``shapes-composition`` reward unless the method needs a differentiable one, then ``shapes-learned``)
and the result is merged into ``benchmarks/results/methods.json``, which the site's Results page renders.

    python -m benchmarks.method_table [METHOD ...] [--quick]
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, format_table, machine_description
from reference_impls.algorithms import METHODS
from reference_impls.evaluation import default_eval_sampler, evaluate_policy, heldout_prompts
from reference_impls.models import load_policy
from reference_impls.rewards import REWARDS, get_reward
from reference_impls.training import build_config, train

RESULTS = RESULTS_DIR / "methods.json"
EVAL_PROMPTS = 256


def default_reward(cls) -> str:  # noqa: ANN001
    if cls.needs_differentiable_reward:
        return "shapes-learned" if "shapes-learned" in REWARDS else "prompt-colour"
    return "shapes-composition"


@functools.cache
def base_model_metrics(model: str) -> dict:
    return heldout_accuracy(model)


def heldout_accuracy(model: str | Path) -> dict:
    policy = load_policy(str(model))
    result = evaluate_policy(policy, heldout_prompts(EVAL_PROMPTS), default_eval_sampler(policy, 20), seed=0)
    return result.metrics


def run_method(name: str, out_root: Path, quick: bool) -> dict:
    cls = METHODS[name]
    settings = {"preset": "cpu", "reward": default_reward(cls)}
    if "flow" in cls.supported_kinds and "diffusion" not in cls.supported_kinds:
        settings["model"] = "shapes-flow"
    if quick:
        settings["steps"] = 2
    config = build_config(cls.config_class, cls.presets, settings)
    out = out_root / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    before = base_model_metrics(str(config.model))
    start = time.perf_counter()
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config), out,
                    progress=True)
    wall = time.perf_counter() - start
    after = heldout_accuracy(out / "final")
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    return {
        "method": name, "bib_key": cls.bib_key, "model": config.model, "reward": config.reward,
        "steps": config.steps, "samples_seen": records[-1].get("samples_seen"),
        "train_wall_s": round(wall, 1), "s_per_step": round(wall / config.steps, 2),
        "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
        "heldout_accuracy_before": before["accuracy"], "heldout_accuracy_after": after["accuracy"],
        "heldout_score_before": before["mean_score"], "heldout_score_after": after["mean_score"],
        "heldout_prompts": EVAL_PROMPTS,
        "command": f"rlvg train {name} --preset cpu --reward {config.reward} --model {config.model}",
    }


def merge_row(name: str, row: dict) -> dict:
    """Read-modify-write under a file lock, so that tables run in parallel processes all land."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = json.loads(RESULTS.read_text(encoding="utf-8")) if RESULTS.exists() else {"rows": {}}
        existing["rows"][name] = row
        existing["machine"] = machine_description()
        partial = RESULTS.with_suffix(".partial")
        partial.write_text(json.dumps(existing, indent=2) + "\n", encoding="utf-8")
        partial.replace(RESULTS)
    return existing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="*", help=f"default: all ({', '.join(METHODS)})")
    parser.add_argument("--quick", action="store_true", help="2 steps each, results not saved")
    parser.add_argument("--out", default="runs/bench-methods")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: tiny models gain nothing from more; lets two tables run side by side)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    for name in args.methods or list(METHODS):
        row = run_method(name, Path(args.out), args.quick)
        print(json.dumps(row))
        if not args.quick:
            existing = merge_row(name, row)
    if args.quick:
        return 0
    rows = [[r["method"], r["reward"], r["heldout_accuracy_before"], r["heldout_accuracy_after"],
             r["samples_seen"], r["train_wall_s"]] for r in existing["rows"].values()]
    print(format_table(["method", "reward", "acc before", "acc after", "samples", "wall s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
