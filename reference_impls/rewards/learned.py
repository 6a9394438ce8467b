r"""A learned, differentiable ShapeWorld reward: the atlas's stand-in for ImageReward, HPS or PickScore.

Reward-backpropagation methods (ReFL, DRaFT, AlignProp) need $\nabla_x r(x, c)$, and the exact evaluator
(``shapes-composition``) has none: it thresholds colours and counts connected components. So, as the
real methods do with human-preference models, we *learn* a smooth approximation of the score we care
about and optimise that:

$$
\hat r_\phi(x, c) = \frac{1}{|\mathcal C(c)|} \sum_{k \in \mathcal C(c)} \sigma\big(f_\phi(x, c)_k\big)
\;\approx\; \text{score}(x, c) = \frac{1}{|\mathcal C(c)|} \sum_{k \in \mathcal C(c)} \mathbb 1[\text{criterion } k \text{ holds}],
$$

where $\mathcal C(c)$ are the criteria the prompt has (count, colour, shape, and size or relation when it
names them). $f_\phi$ is a small CNN on the image with coordinate channels (so it can read "left of"),
modulated layer by layer (FiLM) by features of the parsed prompt: one-hot colour, shape, count and size
of each noun phrase and the relation. It is trained with a per-criterion binary cross-entropy against the
exact evaluator's verdicts on

* ground-truth renders of train-split prompts,
* corrupted renders: an object recoloured, reshaped, resized, moved, removed or added, the layout
  mirrored or transposed (which breaks relations), then sometimes blurred, noised, faded or tinted,
* renders of other prompts, blank and noise images,
* samples of the shipped ``shapes-diffusion`` and ``shapes-flow-clip`` models when they are present,

all labelled by the exact evaluator for the original prompt. Held-out prompts never enter training;
the provenance records the held-out correlation with the exact score.

Like any learned reward it can be hacked: its gradient points wherever the network, not the evaluator,
is most easily pleased, which is exactly what the reward-backprop pages show (learned reward up, exact
score flat or down). Retrain with ``python -m reference_impls.rewards.learned --out reference_impls/checkpoints/shapes-reward``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reference_impls.rewards.criteria_training import write_reward_checkpoint
from reference_impls.worlds import (
    COLOURS,
    CRITERIA,
    RELATIONS,
    SHAPES,
    SIZES,
    PlacedObject,
    as_spec,
    draw,
    evaluate_batch,
    layout,
    prompt_split,
)

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "shapes-reward"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_PHRASE_FEATURES = len(COLOURS) + len(SHAPES) + 3 + (1 + len(SIZES))  # colour, shape, count 1-3, size
PROMPT_FEATURES = 2 * _PHRASE_FEATURES + 1 + len(RELATIONS)


# --8<-- [start:features]
@lru_cache(maxsize=4096)
def _prompt_feature_tuple(prompt: str) -> tuple[float, ...]:
    spec = as_spec(prompt)
    features = np.zeros(PROMPT_FEATURES, dtype=np.float32)
    for slot, obj in enumerate(spec.objects):  # conjunctions in canonical order, relations as written
        base = slot * _PHRASE_FEATURES
        features[base + COLOURS.index(obj.colour)] = 1
        features[base + len(COLOURS) + SHAPES.index(obj.shape)] = 1
        features[base + len(COLOURS) + len(SHAPES) + obj.count - 1] = 1
        size_index = 0 if obj.size is None else 1 + SIZES.index(obj.size)
        features[base + len(COLOURS) + len(SHAPES) + 3 + size_index] = 1
    relation_index = 0 if spec.relation is None else 1 + RELATIONS.index(spec.relation.name)
    features[2 * _PHRASE_FEATURES + relation_index] = 1
    return tuple(features.tolist())


def prompt_features(prompts: list[str]) -> torch.Tensor:
    """(B, PROMPT_FEATURES) one-hot colour/shape/count/size per noun phrase, and the relation."""
    return torch.tensor([_prompt_feature_tuple(p) for p in prompts], dtype=torch.float32)


def criteria_mask(prompts: list[str]) -> torch.Tensor:
    """(B, 5) which of CRITERIA (count, colour, shape, size, relation) each prompt has."""
    rows = []
    for prompt in prompts:
        spec = as_spec(prompt)
        has_size = any(o.size is not None for o in spec.objects)
        rows.append([1.0, 1.0, 1.0, float(has_size), float(spec.relation is not None)])
    return torch.tensor(rows, dtype=torch.float32)
# --8<-- [end:features]


@dataclass(frozen=True)
class RewardNetConfig:
    """Sizes of the reward network."""

    widths: tuple[int, int, int, int] = (16, 32, 64, 64)
    """Channels of the four 3x3 conv layers (strides 1, 2, 1, 2: 32 -> 16 -> 8 pixels)."""
    prompt_hidden: int = 64
    """Width of the prompt embedding that modulates every conv layer."""
    head_hidden: int = 128
    """Width of the MLP head on the pooled features."""


# --8<-- [start:network]
class CompositionRewardNet(nn.Module):
    """f_phi(x, c): per-criterion logits from an image in [0, 1] and prompt features."""

    def __init__(self, config: RewardNetConfig | None = None) -> None:
        super().__init__()
        config = config or RewardNetConfig()
        self.config = config
        hidden = config.prompt_hidden
        self.prompt = nn.Sequential(nn.Linear(PROMPT_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        channels = (3 + 2, *config.widths)  # RGB + (y, x) coordinate channels
        strides = (1, 2, 1, 2)
        self.convs = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i + 1], 3, stride=strides[i], padding=1) for i in range(4))
        self.films = nn.ModuleList(nn.Linear(hidden, 2 * width) for width in config.widths)  # FiLM scale, shift
        pooled = 2 * config.widths[-1]
        self.head = nn.Sequential(nn.Linear(pooled + hidden, config.head_hidden), nn.ReLU(),
                                  nn.Linear(config.head_hidden, len(CRITERIA)))

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        b, _, h, w = images.shape
        ys = torch.linspace(-1, 1, h, device=images.device, dtype=images.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=images.device, dtype=images.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        x = torch.cat([images * 2 - 1, ys, xs], dim=1)
        e = self.prompt(features)
        for conv, film in zip(self.convs, self.films):
            scale, shift = film(e).chunk(2, dim=-1)
            x = torch.relu(conv(x) * (1 + scale[..., None, None]) + shift[..., None, None])
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return self.head(torch.cat([pooled, e], dim=1))


def predicted_score(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The learned reward: mean over the prompt's criteria of P(criterion holds), (B,)."""
    return (torch.sigmoid(logits) * mask).sum(dim=1) / mask.sum(dim=1)
# --8<-- [end:network]


# -- the reward as the registry calls it --------------------------------------------------------------
@lru_cache(maxsize=4)
def load_reward_net(directory: str = str(CHECKPOINT_DIR), device: str = "cpu") -> CompositionRewardNet:
    """The shipped (or a retrained) reward network, frozen, in eval mode."""
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"no learned reward in {path}; train one with: python -m reference_impls.rewards.learned --out {path}")
    meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    net = CompositionRewardNet(RewardNetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                                  for k, v in meta["network"].items()}))
    net.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    net.requires_grad_(False).eval()
    return net.to(device)


def learned_composition_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Predicted fraction of satisfied criteria, differentiable in ``images`` ((B, 3, H, W) in [0, 1])."""
    net = load_reward_net(device=str(images.device))
    features = prompt_features(prompts).to(images.device, images.dtype)
    mask = criteria_mask(prompts).to(images.device, images.dtype)
    if images.shape[-2:] != (32, 32):
        images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    return predicted_score(net(images.to(next(net.parameters()).dtype), features), mask)


# -- training data: renders, corruptions, model samples, all labelled by the exact evaluator ----------
_EXTENTS = (6, 8, 9, 10, 12)
_SIZE = 32


def _separated(a: PlacedObject, b: PlacedObject, gap: int = 2) -> bool:
    return (a.x + a.extent + gap <= b.x or b.x + b.extent + gap <= a.x
            or a.y + a.extent + gap <= b.y or b.y + b.extent + gap <= a.y)


def _place(objects: list[PlacedObject], colour: str, shape: str, extent: int,
           rng: np.random.Generator, skip: int | None = None) -> PlacedObject | None:
    others = [o for i, o in enumerate(objects) if i != skip]
    for _ in range(100):
        y, x = (int(v) for v in rng.integers(1, _SIZE - extent, size=2))
        candidate = PlacedObject(colour, shape, y, x, extent, -1)
        if all(_separated(candidate, o) for o in others):
            return candidate
    return None


def _mutate(objects: list[PlacedObject], rng: np.random.Generator) -> list[PlacedObject]:
    """One random edit of a layout that may break some criteria of its prompt."""
    objects = list(objects)
    kind = rng.choice(["recolour", "reshape", "resize", "move", "remove", "add", "add_same", "mirror", "transpose"])
    i = int(rng.integers(len(objects))) if objects else None
    if i is not None and kind == "recolour":
        o = objects[i]
        objects[i] = PlacedObject(str(rng.choice([c for c in COLOURS if c != o.colour])), o.shape, o.y, o.x,
                                  o.extent, o.phrase)
    elif i is not None and kind == "reshape":
        o = objects[i]
        objects[i] = PlacedObject(o.colour, str(rng.choice([s for s in SHAPES if s != o.shape])), o.y, o.x,
                                  o.extent, o.phrase)
    elif i is not None and kind in ("resize", "move"):
        o = objects[i]
        extent = int(rng.choice(_EXTENTS)) if kind == "resize" else o.extent
        moved = _place(objects, o.colour, o.shape, extent, rng, skip=i)
        if moved is not None:
            objects[i] = moved
    elif i is not None and kind == "remove":
        objects.pop(i)
    elif kind in ("add", "add_same"):
        if kind == "add_same" and objects:
            template = objects[int(rng.integers(len(objects)))]
            colour, shape = template.colour, template.shape
        else:
            colour, shape = str(rng.choice(COLOURS)), str(rng.choice(SHAPES))
        added = _place(objects, colour, shape, int(rng.choice(_EXTENTS)), rng)
        if added is not None:
            objects.append(added)
    elif kind == "mirror":
        horizontal = bool(rng.integers(2))
        objects = [PlacedObject(o.colour, o.shape, o.y if horizontal else _SIZE - o.y - o.extent,
                                _SIZE - o.x - o.extent if horizontal else o.x, o.extent, o.phrase) for o in objects]
    elif kind == "transpose":
        objects = [PlacedObject(o.colour, o.shape, o.x, o.y, o.extent, o.phrase) for o in objects]
    return objects


def _degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise, fade or tint a uint8 image (the evaluator relabels it afterwards)."""
    from scipy import ndimage

    x = image.astype(np.float32) / 255.0
    kind = rng.choice(["blur", "noise", "fade", "tint", "blur_noise"])
    if kind in ("blur", "blur_noise"):
        x = ndimage.gaussian_filter(x, sigma=(float(rng.uniform(0.3, 1.2)),) * 2 + (0,))
    if kind in ("noise", "blur_noise"):
        x = x + rng.normal(0, rng.uniform(0.02, 0.2), x.shape)
    if kind == "fade":
        x = x + (1 - x) * rng.uniform(0.1, 0.6)
    if kind == "tint":
        x = x + rng.uniform(-0.15, 0.15, size=3)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def synthetic_examples(prompts: list[str], seed: int) -> tuple[np.ndarray, list[str]]:
    """One image per prompt: a render, a corrupted render, another prompt's render, blank or noise."""
    rng = np.random.default_rng(seed)
    pool = prompt_split("all")
    images = np.empty((len(prompts), _SIZE, _SIZE, 3), dtype=np.uint8)
    for n, prompt in enumerate(prompts):
        kind = rng.choice(["render", "mutate", "mutate2", "other", "blank"], p=[0.25, 0.4, 0.2, 0.12, 0.03])
        if kind == "blank":
            image = np.full((_SIZE, _SIZE, 3), 255, dtype=np.uint8)
            if rng.integers(2):
                image = (rng.uniform(0, 1, image.shape) * 255).astype(np.uint8)
        else:
            source = pool[int(rng.integers(len(pool)))] if kind == "other" else prompt
            objects = layout(source, rng)
            for _ in range({"mutate": 1, "mutate2": 2}.get(str(kind), 0)):
                objects = _mutate(objects, rng)
            image = draw(objects)
        if rng.uniform() < 0.3:
            image = _degrade(image, rng)
        images[n] = image
    return images, list(prompts)


def model_samples(prompts: list[str], seed: int, models: tuple[str, ...] = ("shapes-diffusion", "shapes-flow-clip"),
                  ) -> tuple[np.ndarray, list[str], list[str]]:
    """Samples of the shipped base models (those present), with a mix of samplers and step counts."""
    from reference_impls.models.loading import CHECKPOINTS_DIR
    from reference_impls.sampling import SamplerConfig, rollout

    present = [m for m in models if (CHECKPOINTS_DIR / m / "rlvg_model.json").exists()]
    if not present or not prompts:
        return np.empty((0, _SIZE, _SIZE, 3), dtype=np.uint8), [], []
    rng = np.random.default_rng(seed)
    images, used = [], []
    chunk = 64
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        name = present[(start // chunk) % len(present)]
        policy = _cached_policy(name)
        steps = int(rng.choice([6, 10, 20]))
        if policy.kind == "diffusion":
            sampler = SamplerConfig("ddim", num_steps=steps, eta=float(rng.choice([0.0, 1.0])))
        else:
            sampler = SamplerConfig(str(rng.choice(["ode", "sde"])), num_steps=steps)
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        with torch.no_grad():
            batch = rollout(policy, part, sampler, generator).images
        images.append((batch.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        used.extend([name] * len(part))
    return np.concatenate(images), list(prompts), used


@lru_cache(maxsize=2)
def _cached_policy(name: str):  # noqa: ANN202
    from reference_impls.models import load_policy

    policy = load_policy(name)
    policy.denoiser.eval()
    return policy


def _weights_digest(name: str) -> str:
    """SHA-256 (first 16 hex digits) of a shipped model's UNet weights: which model made the samples."""
    import hashlib

    from reference_impls.models.loading import CHECKPOINTS_DIR

    digest = hashlib.sha256()
    for path in sorted((CHECKPOINTS_DIR / name / "unet").glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def labelled(images: np.ndarray, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(criteria targets (N, 5), criteria mask (N, 5), exact scores (N,)) from the exact evaluator."""
    evaluations = evaluate_batch(images, prompts)
    targets = torch.tensor([[float(e.criteria.get(k, False)) for k in CRITERIA] for e in evaluations])
    scores = torch.tensor([e.criteria_score for e in evaluations], dtype=torch.float32)
    return targets, criteria_mask(prompts), scores


@dataclass
class RewardTrainConfig:
    """Settings of ``python -m reference_impls.rewards.learned``."""

    seed: int = 0
    """Seeds data generation, initialisation and batch order."""
    synthetic: int = 24000
    """Renders (correct, corrupted, other prompts) of train-split prompts."""
    model_samples: int = 3072
    """Samples of the shipped base models on train-split prompts (skipped if no model is present)."""
    steps: int = 4000
    """AdamW steps."""
    batch_size: int = 128
    """Examples per step."""
    learning_rate: float = 2e-3
    """Peak learning rate (cosine decay to 5%)."""
    heldout_synthetic: int = 2000
    """Held-out-prompt renders for the quality report."""
    heldout_model_samples: int = 512
    """Held-out-prompt model samples for the quality report."""


def _dataset(prompts_split: str, n_synthetic: int, n_model: int, seed: int):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    pool = prompt_split(prompts_split)
    synth_prompts = [pool[i] for i in rng.integers(len(pool), size=n_synthetic)]
    images, prompts = synthetic_examples(synth_prompts, seed + 1)
    sources = ["synthetic"] * len(prompts)
    model_prompts = [pool[i] for i in rng.integers(len(pool), size=n_model)]
    m_images, m_prompts, m_sources = model_samples(model_prompts, seed + 2)
    images = np.concatenate([images, m_images])
    prompts = prompts + m_prompts
    sources = sources + m_sources
    targets, mask, scores = labelled(images, prompts)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8, (N, 3, H, W)
    return x, prompt_features(prompts), targets, mask, scores, sources


def _quality(net: CompositionRewardNet, x: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
             mask: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = torch.cat([net(x[i : i + 512].float() / 255, features[i : i + 512])
                            for i in range(0, len(x), 512)])
    predicted = predicted_score(logits, mask)
    correct = (targets * mask).sum(1) == mask.sum(1)
    criterion_hits = ((logits > 0).float() == targets).float() * mask
    predicted_correct = ((logits > 0).float() * mask).sum(1) == mask.sum(1)
    return {
        "n": float(len(x)),
        "pearson_r": float(torch.corrcoef(torch.stack([predicted, scores]))[0, 1]),
        "mae": float((predicted - scores).abs().mean()),
        "correct_accuracy": float(predicted_correct.eq(correct).float().mean()),
        "criterion_accuracy": float(criterion_hits.sum() / mask.sum()),
        "exact_score_mean": float(scores.mean()),
        "predicted_score_mean": float(predicted.mean()),
    }


def train_composition_reward(out_dir: str | Path, config: RewardTrainConfig | None = None,
                             network: RewardNetConfig | None = None, command: str = "",
                             progress: bool = True) -> dict:
    """Generate labelled data, train the reward network deterministically, write it with its provenance."""
    config = config or RewardTrainConfig()
    network = network or RewardNetConfig()

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    x, features, targets, mask, scores, sources = _dataset("train", config.synthetic, config.model_samples,
                                                           config.seed)
    hx, hfeatures, htargets, hmask, hscores, hsources = _dataset(
        "heldout", config.heldout_synthetic, config.heldout_model_samples, config.seed + 100)
    data_s = time.perf_counter() - start
    net = CompositionRewardNet(network)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s, config.steps) / config.steps)))
    generator = torch.Generator().manual_seed(config.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="shapes-reward", unit="step")
    losses = []
    for step in range(config.steps):
        rows = torch.randint(0, len(x), (config.batch_size,), generator=generator)
        images = x[rows].float() / 255
        if step % 2 == 1:  # flips keep criteria except relations: only flip prompts without one
            flippable = mask[rows, CRITERIA.index("relation")] == 0
            images = torch.where(flippable.view(-1, 1, 1, 1), images.flip(-1), images)
        logits = net(images, features[rows])
        loss = (nn.functional.binary_cross_entropy_with_logits(logits, targets[rows], reduction="none")
                * mask[rows]).sum() / mask[rows].sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    if bar is not None:
        bar.close()
    net.eval()
    report = {"train": _quality(net, x, features, targets, mask, scores),
              "heldout": _quality(net, hx, hfeatures, htargets, hmask, hscores)}
    model_rows = torch.tensor([s != "synthetic" for s in hsources])
    if model_rows.any():
        report["heldout_model_samples"] = _quality(net, hx[model_rows], hfeatures[model_rows], htargets[model_rows],
                                                   hmask[model_rows], hscores[model_rows])
    provenance = {
        "command": command,
        "config": asdict(config),
        "network": asdict(network),
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_examples": {s: sources.count(s) for s in sorted(set(sources))},
        "heldout_examples": {s: hsources.count(s) for s in sorted(set(hsources))},
        "sampled_models_unet_sha256": {s: _weights_digest(s) for s in sorted(set(sources) - {"synthetic"})},
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "quality": report,
        "data_seconds": round(data_s, 1),
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    meta = {"network": asdict(network), "criteria": list(CRITERIA), "prompt_features": PROMPT_FEATURES}
    write_reward_checkpoint(out_dir, net, meta, provenance, WEIGHTS_FILE, CONFIG_FILE)
    load_reward_net.cache_clear()
    return provenance


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(description="Train the learned ShapeWorld reward (shapes-learned).")
    parser.add_argument("--out", default=str(CHECKPOINT_DIR), help="output folder (default: the shipped one)")
    defaults = RewardTrainConfig()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = RewardTrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    command = "python -m reference_impls.rewards.learned " + " ".join(sys.argv[1:] if argv is None else argv)
    provenance = train_composition_reward(args.out, config, command=command.strip())
    print(json.dumps(provenance["quality"], indent=2))


if __name__ == "__main__":
    main()
