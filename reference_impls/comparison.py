r"""Paired comparison of a trained model with its base, with bootstrap confidence intervals.

An effect of fine-tuning counts only when it is *paired*: both models draw images for the same prompts
from the same initial noise with the same deterministic sampler, so the only difference between two
images of a pair is the weights. For each prompt $p$ (drawn ``samples_per_prompt`` times with different
noise) the difference of a metric is

$$ d_p = \frac1k\sum_{j=1}^{k} \big(m(\text{model}, p, z_j) - m(\text{base}, p, z_j)\big), $$

and the reported gain is the mean of $d_p$ over prompts. Its 95% confidence interval is a percentile
bootstrap with the prompt as the unit (a cluster bootstrap over the $k$ draws), stratified by
GenEval-style task so that every resample keeps the task mix. Several fine-tuning seeds compared on the
same prompts and noise add a second level: each resample draws seeds with replacement and prompts with
replacement, so the interval covers both the prompts' and the training runs' variability. With 3 seeds
the seed level is coarse; we report it as computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from reference_impls.evaluation import generate
from reference_impls.models.policy import GenerativePolicy
from reference_impls.sampling import SamplerConfig

DEFAULT_BOOTSTRAP = 2000
CONFIDENCE = 0.95


@dataclass
class ModelScores:
    """Per-image verdicts of one model on the comparison's prompt list (prompt-major, k draws each)."""

    correct: np.ndarray
    """(N,) 1.0 where every criterion of the prompt holds."""
    score: np.ndarray
    """(N,) the evaluator's matched score in [0, 1] (the ``shapes-matched`` reward; ``shapes-composition`` is
    its mean with accuracy)."""
    reward: np.ndarray | None = None
    """(N,) the named reward, when the comparison was asked for one."""
    objects: np.ndarray | None = None
    """(N,) objects the evaluator detected per image (drawing more than asked is how rewards get gamed)."""

    def metric(self, name: str) -> np.ndarray:
        value = {"accuracy": self.correct, "mean_score": self.score, "reward": self.reward,
                 "objects_per_image": self.objects}[name]
        if value is None:
            raise KeyError(f"no {name!r} was computed")
        return value


@dataclass
class Interval:
    """A difference (model minus base) and its bootstrap interval."""

    base: float
    model: float
    diff: float
    low: float
    high: float
    n_prompts: int

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (otherwise: no effect)."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"base": self.base, "model": self.model, "diff": self.diff, "ci_low": self.low,
                "ci_high": self.high, "n_prompts": self.n_prompts, "significant": self.significant}


@dataclass
class ComparisonReport:
    """Everything ``rlvg compare`` prints: overall and per-task rows."""

    prompts: list[str]
    tasks: list[str]
    samples_per_prompt: int
    n_models: int
    rows: dict[str, Interval] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"settings": self.settings, "n_prompts": len(self.prompts),
                "samples_per_prompt": self.samples_per_prompt, "n_models": self.n_models,
                "rows": {name: row.as_dict() for name, row in self.rows.items()}}


def comparison_prompts(split: str = "heldout", n: int | None = None, world: str = "shapes") -> list[str]:
    """The prompts of a comparison: the whole split in its fixed order, or ``n`` of them (seeded order)."""
    from reference_impls.evaluation import heldout_prompts
    from reference_impls.worlds.registry import get_world

    if n is None:
        return get_world(world).prompt_split(split)
    return heldout_prompts(n, split=split, world=world)


@torch.no_grad()
def score_model(policy: GenerativePolicy, prompts: Sequence[str], sampler: SamplerConfig, seed: int,
                samples_per_prompt: int = 1, reward_name: str | None = None, batch_size: int = 64) -> ModelScores:
    """Draw ``samples_per_prompt`` images per prompt (noise fixed by ``seed``) and score each one.

    The list of prompts is expanded prompt-major, so any two models given the same arguments start every
    image from the same initial noise.
    """
    from reference_impls.worlds.registry import get_world, to_uint8

    world = get_world(policy.world or "shapes")
    expanded = [p for p in prompts for _ in range(samples_per_prompt)]
    was_training = policy.denoiser.training
    policy.denoiser.eval()
    images = generate(policy, expanded, sampler, seed, batch_size)
    if was_training:
        policy.denoiser.train()
    evaluations = world.evaluate(to_uint8(images), expanded)
    rewards = None
    if reward_name is not None:
        from reference_impls.rewards import get_reward

        reward = get_reward(reward_name)
        rewards = np.concatenate([reward(images[i : i + batch_size], expanded[i : i + batch_size]).detach()
                                  .float().cpu().numpy() for i in range(0, len(expanded), batch_size)])
    return ModelScores(correct=np.array([float(e.correct) for e in evaluations]),
                       score=np.array([e.score for e in evaluations]), reward=rewards,
                       objects=np.array([float(len(e.objects)) for e in evaluations]))


def per_prompt(values: np.ndarray, samples_per_prompt: int) -> np.ndarray:
    """Average the k draws of each prompt: (N,) prompt-major -> (N / k,)."""
    return values.reshape(-1, samples_per_prompt).mean(axis=1)


def bootstrap_interval(base: np.ndarray, models: np.ndarray, strata: Sequence[str], n_boot: int = DEFAULT_BOOTSTRAP,
                       seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Gain of ``models`` over ``base`` with a (seed x prompt)-level stratified percentile bootstrap.

    ``base``: (P,) per-prompt values of the base; ``models``: (S, P) per-prompt values of S fine-tuned
    models (seeds) on the same prompts and noise; ``strata``: the task of each prompt. The point estimate is
    the mean over seeds and prompts of the paired difference.
    """
    models = np.atleast_2d(np.asarray(models, dtype=float))
    base = np.asarray(base, dtype=float)
    if models.shape[1] != base.shape[0] or len(strata) != base.shape[0]:
        raise ValueError(f"shapes disagree: base {base.shape}, models {models.shape}, {len(strata)} strata")
    diffs = models - base[None]  # (S, P)
    rng = np.random.default_rng(seed)
    n_seeds, n_prompts = diffs.shape
    strata_array = np.asarray(strata)
    # Prompt resample: within each stratum, draw as many prompts as it has (the task mix stays fixed).
    columns = np.empty((n_boot, n_prompts), dtype=np.int64)
    filled = 0
    for stratum in dict.fromkeys(strata):
        members = np.flatnonzero(strata_array == stratum)
        columns[:, filled : filled + len(members)] = members[rng.integers(0, len(members), (n_boot, len(members)))]
        filled += len(members)
    if n_seeds > 1:
        seeds = rng.integers(0, n_seeds, (n_boot, n_seeds))
        per_seed = diffs[seeds[:, :, None], columns[:, None, :]]  # (B, S, P)
        draws = per_seed.mean(axis=(1, 2))
    else:
        draws = diffs[0][columns].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Interval(base=float(base.mean()), model=float(models.mean()), diff=float(diffs.mean()),
                    low=float(low), high=float(high), n_prompts=n_prompts)


def compare_scores(prompts: Sequence[str], base: ModelScores, models: Sequence[ModelScores],
                   samples_per_prompt: int, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
                   world: str = "shapes") -> ComparisonReport:
    """Overall and per-task rows (accuracy, mean score, reward if present) from already scored models."""
    from reference_impls.worlds.registry import get_world

    spec = get_world(world)
    tasks = [spec.prompt_task(p) for p in prompts]
    report = ComparisonReport(list(prompts), tasks, samples_per_prompt, len(models))
    metrics = ["accuracy", "mean_score"] + (["reward"] if base.reward is not None else [])
    if base.objects is not None and all(m.objects is not None for m in models):
        metrics.append("objects_per_image")
    for metric in metrics:
        b = per_prompt(base.metric(metric), samples_per_prompt)
        m = np.stack([per_prompt(s.metric(metric), samples_per_prompt) for s in models])
        report.rows[metric] = bootstrap_interval(b, m, tasks, n_boot, seed)
    b = per_prompt(base.correct, samples_per_prompt)
    m = np.stack([per_prompt(s.correct, samples_per_prompt) for s in models])
    present = [t for t in spec.tasks if t in tasks]
    for task in present:
        keep = np.array([t == task for t in tasks])
        report.rows[f"task_{task}"] = bootstrap_interval(b[keep], m[:, keep], [task] * int(keep.sum()), n_boot, seed)
    # GenEval's overall score: the unweighted mean of the task accuracies, bootstrapped task by task.
    report.rows["task_mean"] = _task_mean_interval(b, m, tasks, present, n_boot, seed)
    return report


def _task_mean_interval(base: np.ndarray, models: np.ndarray, tasks: list[str], present: list[str],
                        n_boot: int, seed: int) -> Interval:
    # Weight each prompt by 1 / (number of prompts of its task * number of tasks): the weighted mean is
    # the task mean, and resampling within tasks keeps the weights valid.
    counts = {t: tasks.count(t) for t in present}
    weights = np.array([len(tasks) / (counts[t] * len(present)) for t in tasks])
    return bootstrap_interval(base * weights, models * weights[None], tasks, n_boot, seed)


def compare_models(base: GenerativePolicy, models: Sequence[GenerativePolicy], prompts: Sequence[str],
                   sampler: SamplerConfig, seed: int = 0, samples_per_prompt: int = 1,
                   reward_name: str | None = None, n_boot: int = DEFAULT_BOOTSTRAP) -> ComparisonReport:
    """Score the base once and every model on the same prompts and noise; return the paired report."""
    base_scores = score_model(base, prompts, sampler, seed, samples_per_prompt, reward_name)
    model_scores = [score_model(m, prompts, sampler, seed, samples_per_prompt, reward_name) for m in models]
    return compare_scores(prompts, base_scores, model_scores, samples_per_prompt, n_boot, seed,
                          world=base.world or "shapes")


def format_report(report: ComparisonReport, base_name: str, model_names: Sequence[str]) -> str:
    """A plain-text table: one row per metric and task."""
    models = model_names[0] if len(model_names) == 1 else f"{len(model_names)} models (mean)"
    lines = [f"paired comparison: {models} against {base_name}",
             f"  {len(report.prompts)} prompts x {report.samples_per_prompt} draws, same noise and sampler; "
             f"95% bootstrap CI ({'seeds and ' if report.n_models > 1 else ''}prompts, stratified by task)",
             f"  {'metric':<22}{'n':>5}{'base':>8}{'model':>8}{'diff':>9}   95% CI            verdict"]
    for name, row in report.rows.items():
        verdict = ("up" if row.low > 0 else "down") if row.significant else "no effect"
        lines.append(f"  {name:<22}{row.n_prompts:>5}{row.base:>8.3f}{row.model:>8.3f}{row.diff:>+9.3f}   "
                     f"[{row.low:+.3f}, {row.high:+.3f}]  {verdict}")
    return "\n".join(lines)
