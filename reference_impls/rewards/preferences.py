r"""Synthetic preference feedback with a known truth: a seeded labeller and an offline pair dataset.

Preference methods (Diffusion-DPO, D3PO, Diffusion-KTO, SPO) learn from *choices*, not reward values.
Real choices come from people (Pick-a-Pic) or from a reward model standing in for them. Here a
**synthetic labeller** makes them from an exact score, so the truth behind every label is known and the
effect of label noise can be measured.

Noise model (one family for every kind of judgement). The labeller perceives the utility of an image as
its exact score $s$ (by default the reward ``shapes-composition``: half the ShapeWorld evaluator's accuracy,
half its matched score) plus independent noise at temperature $T$:

* **pairs** (Bradley-Terry): $P(a \succ b) = \sigma\big((s_a - s_b)/T\big)$. A *tie* is reported when
  $|s_a - s_b| \le$ ``tie_margin`` (the evaluator's scores are discrete, so exactly equal scores are
  common): a tie carries no preference, and the builders drop it, as Diffusion-DPO drops Pick-a-Pic's ties.
* **one of k** (SPO's step-level choice among candidates): the labeller ranks $s_i + T g_i$ with
  $g_i$ standard Gumbel, which picks the best with the Plackett-Luce probability
  $\mathrm{softmax}(s/T)_i$ and reduces to Bradley-Terry for $k = 2$.
* **like / dislike** (KTO's per-image feedback): $P(\text{like}) = \sigma\big((s - \tau)/T\big)$, a
  Bradley-Terry comparison against an imagined image of score $\tau$ (``like_threshold``).

$T = 0$ gives a noiseless labeller. Every random draw comes from ``numpy.random.default_rng([seed,
stream, *key])``, so a label depends only on (seed, what is being judged, the caller's key), never on
call order: a resumed run sees the same labels.

The **preference bank** is our Pick-a-Pic analogue: for prompts of the training split, the base model
samples two images per prompt with different seeds; their exact scores are stored with the images, and
pair labels (and KTO's like labels) are derived from the scores with the labeller. The bank is written
once to a cache folder keyed by a fingerprint of the model weights, the prompts, the sampler, the seed
and the score (``images.safetensors`` + ``bank.json``; the labels of each labeller in
``labels-<key>.json``), so later runs and other methods reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

BANK_FORMAT = 1
_PAIR_STREAM, _LIKE_STREAM, _RANK_STREAM = 1, 2, 3


def _key_tuple(key: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(k) for k in key) if isinstance(key, tuple) else (int(key),)


@dataclass(frozen=True)
class Comparison:
    """The labeller's verdicts on B pairs (a_i, b_i)."""

    scores_a: torch.Tensor
    """(B,) exact scores of the first images."""
    scores_b: torch.Tensor
    """(B,) exact scores of the second images."""
    probability_a: torch.Tensor
    """(B,) P(a > b) under the noise model."""
    prefer_a: torch.Tensor
    """(B,) bool: the label (meaningless where ``tie``)."""
    tie: torch.Tensor
    """(B,) bool: no preference (|s_a - s_b| <= tie_margin)."""

    @property
    def agreement(self) -> float:
        """Fraction of non-tied labels that agree with the exact scores (1 - the label noise rate)."""
        keep = ~self.tie
        if not bool(keep.any()):
            return float("nan")
        truth = self.scores_a[keep] > self.scores_b[keep]
        return float((truth == self.prefer_a[keep]).float().mean())


# --8<-- [start:labeller]
@dataclass(frozen=True)
class SyntheticLabeller:
    """A seeded stand-in for a human rater that judges images by an exact score plus noise.

    See the module docstring for the noise model: Bradley-Terry for pairs, Plackett-Luce (Gumbel) for
    a choice among k, a Bradley-Terry comparison with ``like_threshold`` for like/dislike.
    """

    reward: str = "shapes-composition"
    """Name of the score the labeller judges with (a registered reward; the exact evaluator by default)."""
    temperature: float = 0.1
    """Noise temperature T on the score's scale: P(a > b) = sigmoid((s_a - s_b) / T); 0 = noiseless."""
    tie_margin: float = 0.0
    """Pairs whose exact scores differ by at most this are ties (no preference)."""
    like_threshold: float = 0.9
    """tau of the like/dislike labels: P(like) = sigmoid((s - tau) / T)."""
    seed: int = 0
    """Seed of every random draw (together with the caller's key)."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """(B,) exact scores of images in [0, 1]."""
        from reference_impls.rewards import get_reward

        return get_reward(self.reward)(images, prompts).detach().float().cpu()

    def _uniform(self, stream: int, key: int | tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, stream, *_key_tuple(key)])
        return torch.from_numpy(rng.random(shape))

    def _sigmoid(self, margin: torch.Tensor) -> torch.Tensor:
        margin = margin.double()
        if self.temperature == 0:
            return (margin > 0).double() + 0.5 * (margin == 0).double()
        return torch.sigmoid(margin / self.temperature)

    def preference_probability(self, scores_a: torch.Tensor, scores_b: torch.Tensor) -> torch.Tensor:
        """Bradley-Terry: P(a > b) = sigmoid((s_a - s_b) / T)."""
        return self._sigmoid(scores_a.double() - scores_b.double())

    def compare_scores(self, scores_a: torch.Tensor, scores_b: torch.Tensor,
                       key: int | tuple[int, ...]) -> Comparison:
        """Label B pairs from their exact scores; ``key`` identifies the judgement (e.g. the step)."""
        scores_a, scores_b = scores_a.detach().double().cpu(), scores_b.detach().double().cpu()
        probability = self.preference_probability(scores_a, scores_b)
        prefer_a = self._uniform(_PAIR_STREAM, key, tuple(scores_a.shape)) < probability
        tie = (scores_a - scores_b).abs() <= self.tie_margin
        return Comparison(scores_a.float(), scores_b.float(), probability.float(), prefer_a, tie)

    def compare(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str],
                key: int | tuple[int, ...]) -> Comparison:
        """Score both images of each pair and label the pair."""
        return self.compare_scores(self.score(images_a, prompts), self.score(images_b, prompts), key)

    def like_probability(self, scores: torch.Tensor) -> torch.Tensor:
        """P(like) = sigmoid((s - tau) / T)."""
        return self._sigmoid(scores.double() - self.like_threshold)

    def like(self, scores: torch.Tensor, key: int | tuple[int, ...]) -> torch.Tensor:
        """(...) bool like (desirable) / dislike labels for images with these exact scores."""
        scores = scores.detach().double().cpu()
        return self._uniform(_LIKE_STREAM, key, tuple(scores.shape)) < self.like_probability(scores)

    def choose(self, scores: torch.Tensor, key: int | tuple[int, ...]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best and worst of k candidates per column of ``scores`` (k, B): argmax / argmin of s + T g.

        Returns (chosen index, rejected index, valid), each (B,); a column is valid when the exact
        scores of its chosen and rejected candidates are not tied.
        """
        scores = scores.detach().double().cpu()
        u = self._uniform(_RANK_STREAM, key, tuple(scores.shape)).clamp(1e-12, 1 - 1e-12)
        perceived = scores + self.temperature * (-torch.log(-torch.log(u)))
        chosen, rejected = perceived.argmax(dim=0), perceived.argmin(dim=0)
        columns = torch.arange(scores.shape[1])
        valid = (scores[chosen, columns] - scores[rejected, columns]).abs() > self.tie_margin
        return chosen, rejected, valid

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
# --8<-- [end:labeller]


# -- the preference bank (offline data) -------------------------------------------------------------
@dataclass
class PairSet:
    """Labelled, non-tied pairs: what Diffusion-DPO trains on."""

    prompts: list[str]
    winners: torch.Tensor
    """(P, C, H, W) final sampler states of the preferred images (what the denoiser is trained on)."""
    losers: torch.Tensor
    """(P, C, H, W) final states of the other images."""
    winner_scores: torch.Tensor
    loser_scores: torch.Tensor
    ties_dropped: int
    agreement: float
    """Fraction of kept labels that agree with the exact scores."""

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class LikeSet:
    """Per-image like/dislike labels: what Diffusion-KTO trains on."""

    prompts: list[str]
    states: torch.Tensor
    """(M, C, H, W) final sampler states."""
    desirable: torch.Tensor
    """(M,) bool labels."""
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class PreferenceBank:
    """Two base-model samples per prompt with their exact scores; labels derive from the scores."""

    prompts: list[str]
    states: torch.Tensor
    """(N, 2, C, H, W) float final sampler states (pixels in [-1, 1] for ShapeWorld, latents otherwise)."""
    images: torch.Tensor
    """(N, 2, 3, H, W) uint8 decoded images."""
    scores: torch.Tensor
    """(N, 2) exact scores of the images under ``meta['reward']``."""
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def comparison(self, labeller: SyntheticLabeller) -> Comparison:
        """Pair labels, keyed by the bank's key so they never change between runs."""
        return labeller.compare_scores(self.scores[:, 0], self.scores[:, 1], key=(_bank_seed(self.meta), 0))

    def pairs(self, labeller: SyntheticLabeller) -> PairSet:
        verdict = self.comparison(labeller)
        keep = torch.nonzero(~verdict.tie).flatten()
        first = verdict.prefer_a[keep]
        win_col, lose_col = (~first).long(), first.long()
        rows = keep
        self._write_labels(labeller, verdict)
        return PairSet(
            prompts=[self.prompts[int(i)] for i in rows],
            winners=self.states[rows, win_col],
            losers=self.states[rows, lose_col],
            winner_scores=self.scores[rows, win_col],
            loser_scores=self.scores[rows, lose_col],
            ties_dropped=int(verdict.tie.sum()),
            agreement=verdict.agreement,
        )

    def likes(self, labeller: SyntheticLabeller) -> LikeSet:
        liked = labeller.like(self.scores, key=(_bank_seed(self.meta), 1))
        self._write_labels(labeller, self.comparison(labeller), liked)
        return LikeSet(
            prompts=[p for p in self.prompts for _ in range(2)],
            states=self.states.flatten(0, 1),
            desirable=liked.flatten(),
            scores=self.scores.flatten(),
        )

    def _write_labels(self, labeller: SyntheticLabeller, verdict: Comparison,
                      liked: torch.Tensor | None = None) -> None:
        """Keep the labels beside the images (readable JSON; recomputed identically if deleted)."""
        if self.folder is None:
            return
        if liked is None:
            liked = labeller.like(self.scores, key=(_bank_seed(self.meta), 1))
        record = {"labeller": asdict(labeller), "prefer_first": verdict.prefer_a.int().tolist(),
                  "tie": verdict.tie.int().tolist(), "like": liked.int().tolist(),
                  "pair_agreement": verdict.agreement}
        path = self.folder / f"labels-{labeller.fingerprint()}.json"
        if not path.exists():
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, path)


def _bank_seed(meta: dict[str, Any]) -> int:
    return int(meta.get("seed", 0))


def default_cache_dir() -> Path:
    """``$RLVG_CACHE_DIR/preference-banks`` or ``~/.cache/rlvg/preference-banks``."""
    root = os.environ.get("RLVG_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "rlvg"
    return base / "preference-banks"


def model_fingerprint(policy) -> str:  # noqa: ANN001 - a GenerativePolicy
    """sha256 of the denoiser's (and text encoder's) weights: a bank belongs to these exact weights."""
    digest = hashlib.sha256()
    modules = [policy.denoiser] + ([policy.text_encoder] if policy.text_encoder is not None else [])
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def bank_key(fingerprint: str, prompts: list[str], sampler, seed: int, reward: str) -> str:  # noqa: ANN001
    """The cache key of a bank: the model's weights, the prompts, the sampler, the seed and the score.

    The score enters by name and by its registered description, so a reward redefined under the same name
    (``shapes-composition`` became half accuracy, half matched score) does not load banks scored before.
    """
    from reference_impls.rewards import REWARDS

    definition = REWARDS[reward].description if reward in REWARDS else None
    spec = {"format": BANK_FORMAT, "model": fingerprint, "prompts": list(prompts),
            "sampler": asdict(sampler), "seed": seed, "reward": reward, "reward_definition": definition}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    text = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(str(name)).name)
    return text.strip("-")[:40] or "model"


def load_bank(folder: Path) -> PreferenceBank:
    from safetensors.torch import load_file

    meta = json.loads((folder / "bank.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "images.safetensors"))
    return PreferenceBank(meta["prompts"], tensors["states"], tensors["images"], tensors["scores"], meta, folder)


# --8<-- [start:build]
@torch.no_grad()
def build_preference_bank(policy, prompts: list[str], sampler, *, seed: int = 0,  # noqa: ANN001
                          reward: str = "shapes-composition", cache_dir: str | Path | None = None,
                          chunk: int = 64, progress: bool = False) -> PreferenceBank:
    """Sample two images per prompt from ``policy`` (different seeds), score them, cache the result.

    The same (weights, prompts, sampler, seed, reward) finds the folder written before and loads it.
    """
    from safetensors.torch import save_file

    from reference_impls.rewards import get_reward
    from reference_impls.sampling import rollout

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    fingerprint = model_fingerprint(policy)
    key = bank_key(fingerprint, prompts, sampler, seed, reward)
    folder = cache / f"{_slug(policy.name)}-{key}"
    if (folder / "bank.json").exists():
        return load_bank(folder)
    started = time.perf_counter()
    was_training = policy.denoiser.training
    policy.denoiser.eval()
    states, images = [], []
    for start in range(0, len(prompts), chunk):
        part = list(prompts[start : start + chunk])
        pair_states, pair_images = [], []
        for member in range(2):  # two images per prompt, different noise seeds
            generator = torch.Generator(device=policy.device).manual_seed(
                int(np.random.default_rng([seed, start, member]).integers(2**62)))
            trajectory = rollout(policy, part, sampler, generator)
            pair_states.append(trajectory.states[:, -1].float().cpu())
            pair_images.append(trajectory.images.float().cpu())
        states.append(torch.stack(pair_states, dim=1))
        images.append(torch.stack(pair_images, dim=1))
        if progress:
            print(f"preference bank: {min(start + chunk, len(prompts))}/{len(prompts)} prompts")
    policy.denoiser.train(was_training)
    states_t, images_t = torch.cat(states), torch.cat(images)
    flat = images_t.flatten(0, 1)
    scores = get_reward(reward)(flat, [p for p in prompts for _ in range(2)]).float().cpu().view(-1, 2)
    images_u8 = (images_t.clamp(0, 1) * 255).round().to(torch.uint8)
    meta = {"format": BANK_FORMAT, "key": key, "model": policy.name, "model_fingerprint": fingerprint,
            "seed": seed, "reward": reward, "sampler": asdict(sampler), "prompts": list(prompts),
            "build_s": round(time.perf_counter() - started, 2)}
    partial = cache / f".{folder.name}.partial{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    save_file({"states": states_t.contiguous(), "images": images_u8.contiguous(), "scores": scores.contiguous()},
              str(partial / "images.safetensors"))
    (partial / "bank.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    try:
        partial.rename(folder)
    except OSError:  # another process wrote it first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
    return load_bank(folder)
# --8<-- [end:build]
