"""DDPO epoch time against trl 0.23.1's DDPOTrainer, side by side on the same saved pipeline.

Both train the same tiny Stable Diffusion pipeline (built and saved here) with the anchor's settings:
batch 16 per epoch, minibatch 8, 20 DDIM steps with eta 1, CFG 5, lr 3e-4, clip 1e-4, advantage clip 5,
batch-normalised advantages, prompt "a red circle", reward minus the JPEG size in kB, full fine-tuning,
fp32, one torch thread each. ``rlvg train ddpo`` runs three ways: recomputing one step of a minibatch per
denoiser call (``--steps-per-call 1``, as trl does) and all 20 in one call (``--steps-per-call 0``), and
then the latter with the denoiser's weights in channels-last memory order (``--channels-last true``).

Runs alternate in blocks (trl, ours x3, trl, ours x3, ...) so that a change of machine load hits
every contender; the medians of the per-epoch times are compared. trl is not a dependency (it dropped
DDPO in 0.24): install 0.23.1 beside the project as the anchor's docstring says and pass ``--trl-path``.

    python -m benchmarks.trl_ddpo_speed --trl-path .trl023 [--anchor ../shared/anchors/trl_ddpo_epoch.py]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine_description, write_results

SETTINGS = dict(preset="smoke", reward="jpeg-compressibility", prompts="a red circle", batch_size=16, minibatch_size=8,
                num_steps=20, eta=1.0, guidance_scale=5.0, learning_rate=3e-4, clip_range=1e-4, adv_clip_max=5.0,
                per_prompt_stat_tracking=False, inner_epochs=1, timestep_fraction=1.0, min_step_std=0.0)
VARIANTS = {"ours_steps_per_call_1": {"steps_per_call": 1}, "ours_steps_per_call_all": {"steps_per_call": 0},
            "ours_steps_per_call_all_channels_last": {"steps_per_call": 0, "channels_last": True}}


def trl_epochs(anchor: Path, trl_path: Path, pipeline: Path, epochs: int, work: Path) -> list[float]:
    out = work / f"trl-{time.monotonic_ns()}.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(trl_path), "THREADS": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(anchor), str(pipeline), str(epochs), str(out)], env=env, check=True,
                   capture_output=True)
    return [json.loads(line)["epoch_s"] for line in out.read_text().splitlines()]


def our_methods(pipeline: Path) -> dict:
    from reference_impls.algorithms import get_method
    from reference_impls.models import load_policy
    from reference_impls.rewards import get_reward
    from reference_impls.training import build_config

    cls = get_method("ddpo")
    methods = {}
    for name, variant in VARIANTS.items():
        config = build_config(cls.config_class, cls.presets, {**SETTINGS, "model": str(pipeline), **variant})
        torch.manual_seed(0)
        methods[name] = cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config)
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-path", type=Path, required=True, help="folder with trl 0.23.1 installed (--target)")
    parser.add_argument("--anchor", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "anchors"
                        / "trl_ddpo_epoch.py", help="the anchor script that runs trl's DDPOTrainer")
    parser.add_argument("--blocks", type=int, default=3, help="rounds of (trl, ours x3)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per contender per round (the first is dropped)")
    args = parser.parse_args(argv)
    if not (args.trl_path / "trl").is_dir():
        print(f"no trl under {args.trl_path}: install trl 0.23.1 there as {args.anchor} explains", file=sys.stderr)
        return 2
    if not args.anchor.is_file():
        print(f"anchor script {args.anchor} not found; pass --anchor", file=sys.stderr)
        return 2
    from reference_impls.models.tiny_pipelines import save_tiny_pipeline
    from reference_impls.training.method import step_context

    torch.set_num_threads(1)
    samples: dict[str, list[float]] = {"trl": [], **{name: [] for name in VARIANTS}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pipeline = save_tiny_pipeline("sd", work / "pipeline", seed=0)
        methods = our_methods(pipeline)
        step = 0
        for block in range(args.blocks):
            samples["trl"] += trl_epochs(args.anchor, args.trl_path, pipeline, args.epochs, work)[1:]
            for name, method in methods.items():
                for epoch in range(args.epochs):
                    started = time.perf_counter()
                    method.train_step(step_context(0, step + epoch))
                    if epoch:  # the first epoch of a block warms caches up, as trl's first does
                        samples[name].append(time.perf_counter() - started)
            step += args.epochs
            print(f"block {block + 1}/{args.blocks}: " + ", ".join(
                f"{k} {statistics.median(v):.2f} s" for k, v in samples.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratios = {name: medians[name] / medians["trl"] for name in VARIANTS}
    result = {
        "what": "DDPO epoch time: rlvg train ddpo / trl 0.23.1 DDPOTrainer, same tiny SD pipeline and settings",
        "settings": SETTINGS, "medians_s": medians, "ratio_to_trl": ratios, "samples_s": samples,
        "target_ratio": 0.67, "machine": machine_description(),
        "command": "python -m benchmarks.trl_ddpo_speed --trl-path TRL_DIR",
    }
    write_results("trl_ddpo_speed", result)
    for name, ratio in ratios.items():
        print(f"{name}: {medians[name]:.2f} s per epoch, {ratio:.2f}x trl's {medians['trl']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
