"""Per-prompt 3D optimisers, measured: before/after on a fixed prompt set, paired against plain SDS.

A per-prompt method (DreamDPO, DreamReward) trains no generator, so there is no held-out split to compare
on. What it changes is the 3D field it fits for one prompt. The comparison is paired: for every prompt of
a fixed SolidWorld set, and every seed, plain score distillation (DreamFusion's loop: the method with its
``sds_settings``, DreamDPO's ``--use-preferences false`` or DreamReward's ``--reward-weight 0``) and the
method start from the same field and draw the same first noise at every step. The exact evaluator
scores the field's four rendered views after the last step. Reported: the score and accuracy before
(the initial field), after SDS and after the method, and the method's paired gain over SDS with a 95%
bootstrap CI over seeds and prompts, stratified by task.

    python -m benchmarks.field_table dreamdpo --seeds 0 1 2            # writes benchmarks/results/fields.json
    python -m benchmarks.field_table dreamdpo --seeds 0 --out DIR       # one lane; run others, then --reuse

Each (method, seed, prompt) run is cached as JSON under ``--out`` and reused with ``--reuse``, so seeds can
run side by side (one torch thread each) and be merged afterwards.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_description
from reference_impls.algorithms import METHODS
from reference_impls.comparison import bootstrap_interval
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.training import build_config, train
from reference_impls.worlds.solid import TASKS, as_solid_spec, solid_prompt_split

PROMPTS_PER_TASK = 4
RESULTS_FILE = "fields.json"


def fixed_prompts(per_task: int = PROMPTS_PER_TASK) -> list[str]:
    """``per_task`` held-out prompts of every task, evenly spaced through the split (the same every run)."""
    heldout = solid_prompt_split("heldout")
    chosen = []
    for task in TASKS:
        pool = [p for p in heldout if as_solid_spec(p).task == task]
        chosen += [pool[int(i)] for i in np.linspace(0, len(pool) - 1, per_task).round()]
    return chosen


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")


def run_one(method: str, prompt: str, seed: int, out: Path, settings: dict, reuse: bool, sds: bool = False) -> dict:
    """Fit one field (with ``sds``: the method's plain-SDS baseline); returns its record (initial and final
    verdict, wall time), cached as JSON."""
    path = out / method / f"seed{seed}" / f"{_slug(prompt)}.json"
    cls = METHODS[method]
    settings = {**settings, **(cls.sds_settings if sds else {})}
    config = build_config(cls.config_class, cls.presets, {"preset": "cpu", "prompts": prompt, "seed": seed,
                                                           "threads": 1, **settings})
    run_dir = out / "runs" / method / f"seed{seed}-{'sds' if sds else 'method'}" / _slug(prompt)
    if reuse and path.exists():
        record = json.loads(path.read_text(encoding="utf-8"))
        if "reward" not in record and (run_dir / "final" / "field.safetensors").exists():  # older records
            record.update(reward_name=config.reward, reward=final_reward(run_dir / "final", config, prompt))
        return record
    torch.manual_seed(seed)
    started = time.perf_counter()
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config), run_dir,
                    resume=run_dir.exists(), progress=False)
    verdict = json.loads((run_dir / "final" / "verdict.json").read_text(encoding="utf-8"))
    record = {"prompt": prompt, "task": as_solid_spec(prompt).task, "seed": seed,
              "score_before": records[0]["eval_score"], "correct_before": records[0]["eval_correct"],
              "score": verdict["score"], "correct": float(verdict["correct"]), "criteria": verdict["criteria"],
              "reward_name": config.reward, "reward": final_reward(run_dir / "final", config, prompt),
              "minutes": round((time.perf_counter() - started) / 60, 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(path)
    return record


def final_reward(final: Path, config, prompt: str) -> float:  # noqa: ANN001 - the method's FieldConfig
    """The method's own reward (the one it ranks or ascends) of the final field's four renders."""
    from safetensors.torch import load_file

    from reference_impls.models.voxel_field import VoxelField, VoxelFieldConfig

    field = VoxelField(VoxelFieldConfig(resolution=config.resolution, samples_per_ray=config.samples_per_ray))
    field.load_state_dict(load_file(str(final / "field.safetensors")))
    with torch.no_grad():
        views = field.render().permute(1, 0, 2, 3).unsqueeze(0)
    return float(get_reward(config.reward)(views, [prompt])[0])


def summarise(method: str, prompts: list[str], seeds: list[int], baseline: list[dict], trained: list[dict]) -> dict:
    """Before/after means and the paired gain over SDS (95% bootstrap CI over seeds and prompts, by task)."""
    def matrix(records: list[dict], key: str) -> np.ndarray:
        index = {(r["seed"], r["prompt"]): r[key] for r in records}
        return np.array([[index[(s, p)] for p in prompts] for s in seeds], dtype=float)

    tasks = [as_solid_spec(p).task for p in prompts]
    row = {"method": method, "prompts": len(prompts), "seeds": seeds}
    for key in ("score", "correct"):
        before = matrix(trained, f"{key}_before").mean()
        sds, ours = matrix(baseline, key), matrix(trained, key)
        gain = bootstrap_interval(np.zeros(len(prompts)), ours - sds, tasks)
        row[key] = {"before": float(before), "sds": float(sds.mean()), "method": float(ours.mean()),
                    "gain_over_sds": gain.diff, "ci95": [gain.low, gain.high]}
    if all("reward" in r for r in baseline + trained):  # what the method optimises, on the same renders
        sds, ours = matrix(baseline, "reward"), matrix(trained, "reward")
        gain = bootstrap_interval(np.zeros(len(prompts)), ours - sds, tasks)
        row["reward"] = {"name": trained[0]["reward_name"], "sds": float(sds.mean()), "method": float(ours.mean()),
                         "gain_over_sds": gain.diff, "ci95": [gain.low, gain.high]}
    row["minutes_per_field"] = float(np.mean([r["minutes"] for r in trained]))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=[name for name, cls in METHODS.items() if hasattr(cls, "score_renders")],
                        help="a per-prompt 3D method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-task", type=int, default=PROMPTS_PER_TASK, help="prompts of each task")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the cpu preset's)")
    parser.add_argument("--model", default=None, help="the multi-view generator (default: the method's, solid-mv-flow)")
    parser.add_argument("--out", default="runs/bench-fields")
    parser.add_argument("--reuse", action="store_true", help="reuse cached per-field records under --out")
    parser.add_argument("--no-merge", action="store_true", help="only run; do not write benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    prompts = fixed_prompts(args.per_task)
    out = Path(args.out)
    settings = {} if args.steps is None else {"steps": args.steps}
    if args.model:
        settings["model"] = args.model
    baseline, trained = [], []
    for seed in args.seeds:
        for prompt in prompts:
            baseline.append(run_one(args.method, prompt, seed, out / "sds", settings, args.reuse, sds=True))
            trained.append(run_one(args.method, prompt, seed, out, settings, args.reuse))
            print(f"seed {seed} {prompt!r}: SDS {baseline[-1]['score']:.2f}  {args.method} {trained[-1]['score']:.2f}",
                  file=sys.stderr)
    row = summarise(args.method, prompts, args.seeds, baseline, trained)
    row["settings"] = settings or "cpu preset"
    row["command"] = "python -m benchmarks.field_table " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(row, indent=2))
    if not args.no_merge:
        path = RESULTS_DIR / RESULTS_FILE
        table = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"rows": {}}
        table["rows"][args.method] = row
        table["machine"] = machine_description()
        path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
