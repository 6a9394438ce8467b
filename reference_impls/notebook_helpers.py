"""Small helpers that keep the method notebooks short: run a preset, plot the curves, show grids."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from reference_impls.algorithms import get_method
from reference_impls.knowledge.paths import repo_root
from reference_impls.models import load_policy
from reference_impls.rewards import get_reward
from reference_impls.training import build_config, train

SMOKE_NOTEBOOK_STEPS = 3


def run_method(method: str, reward: str, *, smoke: bool, device: str = "cpu", seed: int = 0,
               model: str | None = None, out_root: str = "runs/notebooks", **overrides: Any
               ) -> tuple[list[dict[str, Any]], Path]:
    """Train ``method`` with the smoke or cpu preset into a fresh run directory; returns (metrics, dir).

    In smoke mode the run is cut to ``SMOKE_NOTEBOOK_STEPS`` steps: the site shows the pipeline working
    end to end in seconds; the tests assert that each smoke preset raises its reward.
    """
    cls = get_method(method)
    preset = "smoke" if smoke else "cpu"
    settings: dict[str, Any] = {"preset": preset, "reward": reward, "seed": seed, "device": device}
    if smoke:
        settings["steps"] = min(SMOKE_NOTEBOOK_STEPS, cls.presets.get("smoke", {}).get("steps", SMOKE_NOTEBOOK_STEPS))
        settings["eval_prompts"] = 8
    settings.update(overrides)
    if model is not None:
        settings["model"] = model
    config = build_config(cls.config_class, cls.presets, settings, cls.video_presets)
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # tiny models: extra threads only add contention (papermill cell timeouts)
    policy = load_policy(config.model, device=device)
    instance = cls(policy=policy, reward=get_reward(config.reward, config.reward_model or None), config=config)
    # Relative to the repository root, not the kernel's directory: JupyterLab starts kernels in notebooks/.
    root = Path(out_root) if Path(out_root).is_absolute() else repo_root() / out_root
    out = root / f"{method}-{reward}-{preset}-seed{seed}"
    if out.exists():
        shutil.rmtree(out)
    records = train(instance, out, progress=True)
    return records, out


def plot_run(records: list[dict[str, Any]], keys: tuple[str, ...] = ("reward_mean",), title: str = ""):  # noqa: ANN201
    """Training reward (and any other per-step keys) and held-out accuracy against step."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes[0].plot(*zip(*points), marker="o", ms=3, label=key)
    axes[0].set_xlabel("step")
    axes[0].set_title("training batch")
    axes[0].legend()
    evals = [(r["step"], r["eval_accuracy"], r.get("eval_mean_score")) for r in records if "eval_accuracy" in r]
    if evals:
        steps, accuracy, score = zip(*evals)
        axes[1].plot(steps, accuracy, marker="o", label="held-out accuracy (all criteria)")
        axes[1].plot(steps, score, marker="s", label="held-out mean criterion score")
        axes[1].set_ylim(0, 1)
        axes[1].legend()
    axes[1].set_xlabel("step")
    axes[1].set_title("exact evaluator, held-out prompts")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def show_grids(run_dir: Path):  # noqa: ANN201
    """Before/after sample grids on the same held-out prompts and noise."""
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = sorted(Path(run_dir, "samples").glob("step_*.png"))
    chosen = [grids[0], grids[-1]] if len(grids) > 1 else grids
    pictures = [Image.open(path) for path in chosen]
    width, height = pictures[0].size
    if height > width / 3:  # clips: one frame strip per row, side by side so each stays readable
        fig, axes = plt.subplots(1, len(chosen), figsize=(7 * len(chosen), 7 * height / width + 0.5), squeeze=False)
        axes = axes.T
    else:
        fig, axes = plt.subplots(len(chosen), 1, figsize=(10, 1.8 * len(chosen)), squeeze=False)
    for ax, path, picture in zip(axes[:, 0], chosen, pictures):
        ax.imshow(picture)
        ax.set_title(f"{path.stem.replace('_', ' ')}")
        ax.axis("off")
    fig.tight_layout()
    return fig


def summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers worth printing: first/last training reward, held-out accuracy before/after, wall time."""
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    return {
        "steps": records[-1]["step"],
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "heldout_accuracy_before": evals[0]["eval_accuracy"] if evals else None,
        "heldout_accuracy_after": evals[-1]["eval_accuracy"] if evals else None,
        "samples_seen": records[-1].get("samples_seen"),
        "wall_s": records[-1].get("wall_s"),
    }


def show_measured(method: str):  # noqa: ANN201
    """The committed full-run result of ``method`` (benchmarks/results/methods.json): the paired comparison
    with its base over seeds, the held-out accuracy curves, and the before/after grid. Returns the figure, or
    None (with a message) when the method has not been measured with the paired protocol yet."""
    import json

    import matplotlib.pyplot as plt
    from PIL import Image

    from reference_impls.knowledge.paths import repo_root

    results = repo_root() / "benchmarks" / "results"
    path = results / "methods.json"
    row = json.loads(path.read_text(encoding="utf-8")).get("rows", {}).get(method) if path.exists() else None
    if not row or "heldout" not in row:
        print(f"{method} has not been measured with the paired protocol yet: "
              f"python -m benchmarks.method_table {method} --seeds 0 1 2")
        return None
    accuracy = row["heldout"]["accuracy"]
    verdict = ("up" if accuracy["ci_low"] > 0 else "down") if accuracy["significant"] else "no effect"
    print(f"{row['command']}  ({len(row['seeds'])} seeds, {row['minutes_per_run']:.1f} min per run)")
    print(f"held-out accuracy {accuracy['base']:.3f} -> {accuracy['model']:.3f}: {accuracy['diff']:+.3f}, "
          f"95% CI [{accuracy['ci_low']:+.3f}, {accuracy['ci_high']:+.3f}] ({verdict}; paired, same prompts and noise)")
    reward = row.get("train_reward")
    if reward:
        print(f"trained reward ({row['reward']}) on 128 training prompts: {reward['diff']:+.3f}, "
              f"95% CI [{reward['ci_low']:+.3f}, {reward['ci_high']:+.3f}]")
    grid = results / row["grid"] if row.get("grid") else None
    fig, axes = plt.subplots(1, 2 if grid and grid.exists() else 1, figsize=(13, 3.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.4]} if grid and grid.exists() else None)
    for seed in row["per_seed"]:
        curve = seed.get("curve") or []
        axes[0, 0].plot([p["samples_seen"] for p in curve], [p["accuracy"] for p in curve], marker="o", ms=3,
                        label=f"seed {seed['seed']}")
    axes[0, 0].set_xlabel("samples seen")
    axes[0, 0].set_ylabel("held-out accuracy (in-run)")
    axes[0, 0].legend(fontsize=8)
    if grid and grid.exists():
        axes[0, 1].imshow(Image.open(grid))
        axes[0, 1].set_title("base (top) and trained, seed 0 (bottom): same prompts and noise", fontsize=9)
        axes[0, 1].axis("off")
    fig.tight_layout()
    return fig
