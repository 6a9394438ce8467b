"""The loop every method runs: step, log, evaluate, checkpoint, resume.

Run directory contract::

    config.json          the full resolved config (method, preset, every setting)
    metrics.jsonl        one JSON object per step: step, reward_mean, reward_std, wall_s, samples_seen,
                         the method's diagnostics, and eval_* keys on evaluation steps (step 0 = before)
    samples/step_XXXXXX.png   grids on fixed held-out prompts (video: frame strips, and a .gif beside them)
    checkpoints/         atomic safetensors checkpoints + ``latest``; ``--resume`` continues from it
    final/               the trained model as a loadable folder (``rlvg eval --model RUN/final``); for a
                         diffusers pipeline, its LoRA (``pipe.load_lora_weights(RUN/final)``) or the
                         fine-tuned ``unet``/``transformer`` folder
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reference_impls.evaluation import (
    default_eval_sampler,
    evaluate_policy,
    heldout_prompts,
    save_gif,
    save_grid,
)
from reference_impls.models.lora import has_lora, merged_state_dict
from reference_impls.training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_extra_tensors,
    prune_checkpoints,
    save_checkpoint,
)
from reference_impls.training.method import Method, NonFiniteLossError, step_context

GRID_PROMPTS = 8


class RunDirectory:
    """Files of one training run."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.metrics_path = self.root / "metrics.jsonl"
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"

    def prepare(self, config: dict[str, Any], resume: bool) -> None:
        if self.root.exists() and any(self.root.iterdir()) and not resume:
            if (self.root / "config.json").exists():
                raise FileExistsError(
                    f"{self.root} already holds a run; pass --resume to continue it or choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        if resume and (self.root / "config.json").exists():
            previous = json.loads((self.root / "config.json").read_text(encoding="utf-8"))
            # A setting missing from an older run's config was added since, with a default that keeps the old
            # behaviour: only settings both configs name can differ.
            changed = {k: (previous[k], v) for k, v in config.items()
                       if k not in ("steps", "device", "threads") and k in previous and previous[k] != v}
            if changed:
                raise ValueError(f"--resume with different settings than the run in {self.root}: {changed}")
        tmp = self.root / "config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2), encoding="utf-8")
        os.replace(tmp, self.root / "config.json")

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def truncate_metrics(self, last_step: int) -> float:
        """Drop records after ``last_step`` (written after the checkpoint we resume from); returns wall_s."""
        if not self.metrics_path.exists():
            return 0.0
        kept = [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line]
        kept = [r for r in kept if r["step"] <= last_step]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)
        return max((r.get("wall_s", 0.0) for r in kept), default=0.0)

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line]


def _evaluate(method: Method, run: RunDirectory, step: int, prompts: list[str]) -> dict[str, float]:
    own = method.evaluate(run.samples, step)
    if own is not None:
        return own
    policy = method.policy
    was_training = policy.denoiser.training
    policy.denoiser.eval()
    sampler = default_eval_sampler(policy, num_steps=max(method.config.num_steps, method.config.eval_num_steps),
                                   guidance_scale=method.config.guidance_scale)
    metrics: dict[str, float] = {}
    if policy.world is not None:
        result = evaluate_policy(policy, prompts, sampler, seed=10_000)
        metrics = {f"eval_{k}": v for k, v in result.metrics.items() if k != "n"}
        rewards = method.reward(result.images, prompts)
        metrics["eval_reward_mean"] = float(rewards.float().mean())
        save_grid(result.images[:GRID_PROMPTS], run.samples / f"step_{step:06d}.png", columns=GRID_PROMPTS)
        if result.images.dim() == 5:
            save_gif(result.images[:GRID_PROMPTS], run.samples / f"step_{step:06d}.gif")
    if was_training:
        policy.denoiser.train()
    return metrics


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


def train(method: Method, out_dir: Path, resume: bool = False, progress: bool = True,
          on_step: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run ``method`` for ``config.steps`` outer iterations; returns the metrics records.

    In a data-parallel run (``method.distributed``) every process trains; the main one alone evaluates
    and writes the run directory.
    """
    config = method.config
    distributed = method.distributed
    if distributed.enabled and not method.supports_distributed:
        from reference_impls.algorithms import METHODS

        able = [name for name, cls in METHODS.items() if cls.supports_distributed]
        raise ValueError(f"{method.name} runs in one process only; methods that run over several: {', '.join(able)}")
    main = distributed.is_main
    run = RunDirectory(out_dir)
    if main:
        run.prepare({"method": method.name, **dataclasses.asdict(config)}, resume)
    distributed.wait()
    start_step, wall_offset, samples_seen = 0, 0.0, 0
    checkpoint = latest_checkpoint(run.checkpoints) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, method.trained_module(), method.optimizer)
        method.load_state_dict(state.get("method", {}))
        saved = load_extra_tensors(checkpoint)
        for index, average in enumerate(method.ema):
            average.copy_(saved[f"ema.{index}"])
        method.load_extra_tensors(saved)
        start_step, samples_seen = int(state["step"]), int(state.get("samples_seen", 0))
        if main:
            wall_offset = run.truncate_metrics(start_step)
            print(f"resuming {method.name} from {checkpoint} (step {start_step})")
    elif main and run.metrics_path.exists():
        run.metrics_path.unlink()  # --resume without a checkpoint: start clean
    world = method.policy.world
    eval_prompts = heldout_prompts(config.eval_prompts, world=world) if world is not None else []
    started = time.perf_counter()
    if start_step == 0 and main:
        record = {"step": 0, "wall_s": 0.0, "samples_seen": 0, **_evaluate(method, run, 0, eval_prompts)}
        run.log(record)
    distributed.wait()
    bar = None
    if progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc=method.name, unit="step")
    last_good = start_step
    try:
        for step in range(start_step, config.steps):
            ctx = step_context(config.seed, step, device="cpu")
            metrics = distributed.average_metrics(method.train_step(ctx))
            if not _finite(metrics):
                raise NonFiniteLossError(f"non-finite metrics at step {step + 1}: {metrics}")
            samples_seen += int(metrics.pop("samples", config.batch_size))
            done = step + 1
            checkpoint_now = done % config.checkpoint_every == 0 or done == config.steps
            if not main:
                if checkpoint_now:
                    last_good = done
                distributed.wait()  # the main process evaluates and writes before the next step
                continue
            record: dict[str, Any] = {"step": done, **metrics}
            if (config.eval_every and done % config.eval_every == 0) or done == config.steps:
                record.update(_evaluate(method, run, done, eval_prompts))
            record["wall_s"] = round(wall_offset + time.perf_counter() - started, 3)
            record["samples_seen"] = samples_seen
            run.log(record)
            if on_step is not None:
                on_step(record)
            if checkpoint_now:
                save_checkpoint(run.checkpoints, done, method.trained_module(), method.optimizer,
                                {"samples_seen": samples_seen, "method": method.state_dict()},
                                {**{f"ema.{i}": average for i, average in enumerate(method.ema)},
                                 **method.extra_tensors()})
                prune_checkpoints(run.checkpoints)
                last_good = done
            distributed.wait()
            if bar is not None:
                bar.update(1)
                shown = {k: f"{record[k]:.3g}" for k in ("reward_mean", "approx_kl", "loss") if k in record}
                bar.set_postfix(shown)
    except NonFiniteLossError as error:
        kept = latest_checkpoint(run.checkpoints)
        raise NonFiniteLossError(
            f"{error}. Stopped; the last good checkpoint is {kept or 'none'} (step {last_good}). "
            "Lower --learning-rate or --max-grad-norm and resume with --resume.") from error
    finally:
        if bar is not None:
            bar.close()
    if main:
        if method.ema:
            method.use_ema_weights()
        _save_final(method, run)
    distributed.wait()
    return run.read_metrics()


def _save_final(method: Method, run: RunDirectory) -> None:
    """The trained model as a folder ``rlvg eval``/``sample`` accept (ShapeWorld and MotionWorld models), or
    the method's own outputs (a per-prompt 3D method's views, turntable and mesh)."""
    if method.save_final(run.root):
        return
    policy = method.policy
    if policy.world is None:
        _save_pipeline_final(method, run)
        return
    import shutil

    from reference_impls.models.loading import resolve_model_dir
    from reference_impls.models.shapes_model import MODEL_FILE

    base = resolve_model_dir(method.config.model)
    final, partial = run.root / "final", run.root / ".final.partial"
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(base, partial, ignore=shutil.ignore_patterns("unet", "provenance.json"))
    denoiser = policy.denoiser
    if has_lora(denoiser):
        # Fold the adapters into the weights: the final folder is a plain model any loader reads.
        plain = type(denoiser).from_config(denoiser.config)
        plain.load_state_dict(merged_state_dict(denoiser))
        denoiser = plain
    denoiser.save_pretrained(partial / "unet", safe_serialization=True)
    meta = json.loads((partial / MODEL_FILE).read_text(encoding="utf-8"))
    meta["finetuned_from"] = method.config.model
    meta["method"] = method.name
    (partial / MODEL_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)



def _save_pipeline_final(method: Method, run: RunDirectory) -> None:
    """A real pipeline's run: the adapters in diffusers' LoRA format (``pipe.load_lora_weights(RUN/final)``),
    or, after full fine-tuning, the denoiser as a component folder (``final/unet`` or ``final/transformer``)."""
    import shutil

    from reference_impls.models.lora import save_pipeline_lora
    from reference_impls.models.pipelines import DENOISER_COMPONENT

    policy = method.policy
    if policy.pipeline_class not in DENOISER_COMPONENT:
        return
    final, partial = run.root / "final", run.root / ".final.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    if has_lora(policy.denoiser):
        save_pipeline_lora(policy.denoiser, policy.pipeline_class, partial)
    else:
        policy.denoiser.save_pretrained(partial / DENOISER_COMPONENT[policy.pipeline_class], safe_serialization=True)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
