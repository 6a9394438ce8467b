"""Every method in its ``cpu`` preset on ShapeWorld, over seeds, judged by paired comparisons with their base.

For each method and seed the benchmark trains ``rlvg train METHOD --preset cpu --seed S`` (online methods on
``shapes-composition``; reward-backprop methods on the differentiable proxy ``shapes-learned``), then scores
the trained model and its base on

* the whole held-out split, two draws per prompt, the same initial noise and deterministic sampler for both
  (the exact evaluator's accuracy, matched score and per-task accuracy), and
* 128 fixed training prompts, one draw each, with the reward the method trained on,

and merges a row into ``benchmarks/results/methods.json``: the gain over the base averaged over seeds with a
95% bootstrap interval over seeds and prompts (``reference_impls.comparison``), each seed's own comparison,
and each seed's held-out accuracy curve against samples seen. The site's Results page and the method pages
render that file.

    python -m benchmarks.method_table METHOD [METHOD ...] [--seeds 0 1 2] [--reuse] [--quick]

Seeds of one method can run in parallel processes (one thread each) and be gathered afterwards with
``--reuse``: a seed whose run directory already holds ``final/`` and ``scores.json`` is not run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, format_table, machine_description, merge_results
from reference_impls.algorithms import METHODS
from reference_impls.comparison import ModelScores, compare_scores, comparison_prompts, score_model
from reference_impls.evaluation import default_eval_sampler
from reference_impls.models import load_policy
from reference_impls.models.loading import model_world, resolve_model_dir
from reference_impls.rewards import REWARDS, get_reward
from reference_impls.training import build_config, train

RESULTS = RESULTS_DIR / "methods.json"
VARIANTS = RESULTS_DIR / "method_variants.json"
GRIDS = RESULTS_DIR / "grids"
GRID_PROMPTS = 8
HELDOUT_DRAWS = 2
TRAIN_PROMPTS = 128
EVAL_STEPS = 20
SCORE_SEED = 0


def default_reward(cls, world: str = "shapes") -> str:  # noqa: ANN001
    if world == "solid":  # a 3D method's own reward (Carve3D's consistency), else the exact composition
        own = cls.config_class.__dataclass_fields__["reward"].default
        return own if str(own).startswith("solid-") else "solid-composition"
    if world == "motion":
        return "motion-learned" if cls.needs_differentiable_reward else "motion-composition"
    if cls.needs_differentiable_reward:
        return "shapes-learned" if "shapes-learned" in REWARDS else "prompt-colour"
    own = cls.config_class.__dataclass_fields__["reward"].default
    # A method whose config names a ShapeWorld reward is measured with it (DiffusionNFT: shapes-accuracy).
    return own if str(own).startswith("shapes-") else "shapes-composition"


def _default_model(cls) -> str:  # noqa: ANN001
    """The config's default model, or shapes-flow for a flow-only method whose default is a diffusion model."""
    model = cls.config_class.__dataclass_fields__["model"].default
    if "diffusion" not in cls.supported_kinds and not str(model).endswith("-flow"):
        return "shapes-flow"
    return model


def _settings(name: str, quick: bool, overrides: dict | None = None) -> dict:
    cls = METHODS[name]
    model = (overrides or {}).get("model", _default_model(cls))
    settings = {"preset": "cpu", "reward": default_reward(cls, model_world(model) or "shapes"), "threads": 1,
                "model": model}
    settings.update(overrides or {})
    if quick:
        settings.update(steps=2, eval_every=0, eval_prompts=8)
    return settings


def _digest(model: str | Path) -> str:
    folder = resolve_model_dir(str(model))
    digest = hashlib.sha256()
    for path in sorted((folder / "unet").glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _as_json(scores: ModelScores) -> dict:
    return {k: (v.tolist() if v is not None else None)
            for k, v in (("correct", scores.correct), ("score", scores.score), ("reward", scores.reward),
                         ("objects", scores.objects))}


def _from_json(data: dict) -> ModelScores:
    return ModelScores(**{k: (np.asarray(v) if v is not None else None) for k, v in data.items()})


def protocol(world: str, quick: bool) -> tuple[list[str], list[str], int]:
    """(held-out prompts, training prompts, draws per held-out prompt) of a world's comparison.

    Clips cost about nine images each (benchmarks/video_cost.py), so the video protocol draws each
    held-out prompt once and scores the trained reward on 64 training prompts instead of 128; SolidWorld's
    four views and its fitting evaluator cost about as much, and it does the same.
    """
    video = world in ("motion", "solid")
    heldout = comparison_prompts("heldout", 16 if quick else None, world=world)
    train_prompts = comparison_prompts("train", 8 if quick else TRAIN_PROMPTS // (2 if video else 1), world=world)
    return heldout, train_prompts, 1 if video else HELDOUT_DRAWS


def score_both_protocols(model: str | Path, reward: str, quick: bool) -> dict[str, ModelScores]:
    """Held-out (exact evaluator) and training-prompt (trained reward) scores of one model."""
    policy = load_policy(str(model))
    sampler = default_eval_sampler(policy, EVAL_STEPS)
    heldout, train_prompts, draws = protocol(policy.world or "shapes", quick)
    return {"heldout": score_model(policy, heldout, sampler, SCORE_SEED, draws),
            "train": score_model(policy, train_prompts, sampler, SCORE_SEED, 1, reward_name=reward)}


def base_scores(model: str, reward: str, quick: bool, cache_dir: Path) -> dict[str, ModelScores]:
    """The base model's scores, cached by the digest of its weights (every seed and method shares them)."""
    path = cache_dir / f"base-{model}-{_digest(model)}-{reward}{'-quick' if quick else ''}.json"
    if path.exists():
        return {k: _from_json(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    scores = score_both_protocols(model, reward, quick)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: _as_json(v) for k, v in scores.items()}), encoding="utf-8")
    tmp.replace(path)
    return scores


def variant_label(name: str, overrides: dict) -> str:
    """``ddpo`` for the preset itself, ``ddpo min_step_std=0.3`` for a variant of it."""
    return " ".join([name, *(f"{k}={v}" for k, v in sorted(overrides.items()))])


def parse_overrides(pairs: list[str]) -> dict:
    """``--set key=value`` pairs; values are read as JSON where they parse (numbers, true/false), else text."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set min_step_std=0.3")
        try:
            overrides[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.replace("-", "_")] = value
    return overrides


def world_setup(name: str, world: str) -> tuple[dict, str]:
    """(settings that put the method on ``world``'s model, the key of its results row)."""
    model = _default_model(METHODS[name])
    if world == "shapes" or model_world(model) == world:
        return {}, name
    if world == "solid":
        return {"model": "solid-mv-flow"}, f"{name}@{world}"
    video_model = "motion-flow" if model.endswith("-flow") else "motion-diffusion"
    return {"model": video_model}, f"{name}@{world}"


# Settings that may differ between a reused run and today's config without changing what was trained.
NOT_TRAINING_SETTINGS = ("threads", "device", "preset")


def check_reused_settings(run_dir: Path, config: Any) -> None:
    """Refuse to reuse a run trained with other settings than the config asked for now.

    A run folder is named by the ``--set`` changes from the preset, so after a preset changes, an old folder can
    sit under the name of today's settings; merging it would publish numbers for training that did not happen.
    """
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return  # runs written before config.json existed: nothing to compare
    saved = json.loads(saved_path.read_text(encoding="utf-8"))
    wanted = dataclasses.asdict(config)
    changed = sorted(k for k in saved.keys() & wanted.keys()
                     if k not in NOT_TRAINING_SETTINGS and saved[k] != wanted[k])
    if changed:
        details = ", ".join(f"{k}: run {saved[k]!r}, asked {wanted[k]!r}" for k in changed)
        raise ValueError(f"--reuse: {run_dir} was trained with other settings than asked ({details}); "
                         "rename or delete the folder, or pass the matching --set")


def run_seed(name: str, seed: int, out_root: Path, quick: bool, reuse: bool, overrides: dict | None = None) -> dict:
    """Train one seed (unless reused) and score its final model; returns the seed's record."""
    cls = METHODS[name]
    overrides = overrides or {}
    config = build_config(cls.config_class, cls.presets, {**_settings(name, quick, overrides), "seed": seed},
                          cls.video_presets)
    out = out_root / variant_label(name, overrides).replace(" ", "_") / f"seed{seed}"
    record_path = out / "scores.json"
    if reuse and record_path.exists() and (out / "final").exists():
        check_reused_settings(out, config)
        return json.loads(record_path.read_text(encoding="utf-8"))
    if out.exists():
        shutil.rmtree(out)
    torch.set_num_threads(config.threads or 1)
    start = time.perf_counter()
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward, config.reward_model or None), config=config), out,
                    progress=True)
    wall = time.perf_counter() - start
    scores = score_both_protocols(out / "final", config.reward, quick)
    record = {
        "seed": seed, "train_wall_s": round(wall, 1), "steps": config.steps,
        "samples_seen": records[-1].get("samples_seen"),
        "curve": [{"samples_seen": r.get("samples_seen", 0), "accuracy": r["eval_accuracy"],
                   "mean_score": r.get("eval_mean_score")} for r in records if "eval_accuracy" in r],
        "scores": {k: _as_json(v) for k, v in scores.items()},
        "config": {k: getattr(config, k) for k in ("model", "reward", "steps", "batch_size", "learning_rate")},
    }
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    tmp.replace(record_path)
    return record


def before_after_grid(name: str, base: str, trained: Path, out: Path) -> None:
    """Base (top row) and trained model (bottom row) on the same held-out prompts and initial noise."""
    from reference_impls.evaluation import generate, save_grid

    world = model_world(base) or "shapes"
    prompts = comparison_prompts("heldout", world=world)[::19][:GRID_PROMPTS // (2 if world in ("motion", "solid") else 1)]
    images = []
    for model in (base, trained):
        policy = load_policy(str(model))
        images.append(generate(policy, prompts, default_eval_sampler(policy, EVAL_STEPS), SCORE_SEED))
    labels = [f"base: {p}" for p in prompts] + [f"{name}: {p}" for p in prompts]
    save_grid(torch.cat(images), out, columns=len(prompts), scale=4, labels=labels)


def method_row(name: str, seeds: list[dict], quick: bool, cache_dir: Path, overrides: dict | None = None) -> dict:
    """Aggregate the seeds of one method into the results row (gains with 95% CIs over seeds and prompts)."""
    cls = METHODS[name]
    config = seeds[0]["config"]
    base = base_scores(config["model"], config["reward"], quick, cache_dir)
    world = model_world(config["model"]) or "shapes"
    heldout_prompts, train_prompts, draws = protocol(world, quick)
    models = {key: [_from_json(s["scores"][key]) for s in seeds] for key in ("heldout", "train")}
    heldout = compare_scores(heldout_prompts, base["heldout"], models["heldout"], draws, world=world)
    trained = compare_scores(train_prompts, base["train"], models["train"], 1, world=world)
    per_seed = [compare_scores(heldout_prompts, base["heldout"], [m], draws, world=world) for m in models["heldout"]]
    settings = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _settings(name, quick, overrides).items()
                        if k != "threads")
    return {
        "method": name, "bib_key": cls.bib_key, "model": config["model"], "reward": config["reward"],
        "seeds": [s["seed"] for s in seeds],
        "minutes_per_run": round(float(np.mean([s["train_wall_s"] for s in seeds])) / 60, 2),
        "samples_seen": seeds[0]["samples_seen"], "steps": seeds[0]["steps"],
        "heldout": {k: v.as_dict() for k, v in heldout.rows.items()},
        "train_reward": trained.rows["reward"].as_dict(),
        "per_seed": [{"seed": s["seed"], "accuracy": r.rows["accuracy"].as_dict(),
                      "train_wall_s": s["train_wall_s"], "curve": s["curve"]} for s, r in zip(seeds, per_seed)],
        "world": world,
        "protocol": {"heldout_prompts": len(heldout_prompts), "heldout_draws": draws,
                     "train_prompts": len(train_prompts), "sampler_steps": EVAL_STEPS, "bootstrap": 2000},
        "command": f"rlvg train {name} {settings} --seed S",
        "compare_command": (f"rlvg compare --base {config['model']} --model RUN/final "
                            f"--samples-per-prompt {draws}"),
    }


def merge_row(name: str, row: dict, results: Path = RESULTS) -> dict:
    """Add one row to the results file, so that tables run in parallel processes all land."""
    return merge_results(results, "rows", {name: row}, machine=machine_description())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("methods", nargs="*", help=f"default: all ({', '.join(METHODS)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--reuse", action="store_true", help="keep seeds already trained and scored")
    parser.add_argument("--no-merge", action="store_true", help="train and score only (gather later with --reuse)")
    parser.add_argument("--quick", action="store_true", help="2 steps each, few prompts, results not saved")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change a setting of the cpu preset (repeatable); the rows go to "
                             "benchmarks/results/method_variants.json, labelled with the change")
    parser.add_argument("--world", choices=["shapes", "motion", "solid"], default="shapes",
                        help="motion: train and score on the MotionWorld video model of the method's kind; solid: "
                             "on the SolidWorld multi-view model (rows keyed METHOD@WORLD unless the method is "
                             "made for that world)")
    parser.add_argument("--out", default="runs/bench-methods")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the runs and the base's scoring alike; the machine record reports it
    out_root = Path(args.out)
    existing = None
    for name in args.methods or list(METHODS):
        world_settings, key = world_setup(name, args.world)
        settings = {**world_settings, **overrides}
        try:
            seeds = [run_seed(name, seed, out_root, args.quick, args.reuse, settings) for seed in args.seeds]
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
        if args.no_merge:
            continue
        row = method_row(name, seeds, args.quick, out_root / "_base", settings)
        label = variant_label(key, overrides)
        accuracy = row["heldout"]["accuracy"]
        print(f"{label}: held-out accuracy {accuracy['base']:.3f} -> {accuracy['model']:.3f} "
              f"({accuracy['diff']:+.3f}, 95% CI [{accuracy['ci_low']:+.3f}, {accuracy['ci_high']:+.3f}]) "
              f"over seeds {row['seeds']}")
        if overrides and not args.quick:
            row["variant"] = {"of": name, "settings": overrides}
            merge_row(label, row, VARIANTS)
        elif not args.quick:
            run_dir = out_root / variant_label(name, settings).replace(" ", "_") / f"seed{args.seeds[0]}"
            before_after_grid(name, row["model"], run_dir / "final", GRIDS / f"{key}.png")
            row["grid"] = f"grids/{key}.png"
            existing = merge_row(key, row)
    if existing:
        rows = [[r["method"], r["reward"], r["heldout"]["accuracy"]["base"], r["heldout"]["accuracy"]["diff"],
                 f"[{r['heldout']['accuracy']['ci_low']:+.3f}, {r['heldout']['accuracy']['ci_high']:+.3f}]",
                 len(r["seeds"]), r["minutes_per_run"]] for r in existing["rows"].values() if "heldout" in r]
        print(format_table(["method", "reward", "base acc", "gain", "95% CI", "seeds", "min/run"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
