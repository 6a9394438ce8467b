r"""A learned, differentiable multi-view reward for SolidWorld: our analogue of DreamReward's Reward3D.

DreamReward (Ye et al., 2024, ``ye2024dreamreward``) trains *Reward3D*, a reward model that reads the four
rendered views of a 3D object with its prompt and gives one score for the set: per-view features of an
ImageReward-style image-text encoder, concatenated in camera order, then an MLP. Score distillation then
backpropagates through it into the 3D representation. SolidWorld's exact evaluator fits primitives to the
views and thresholds colours, so it has no gradient; as Reward3D learns human judgements, we learn the
exact evaluator's verdicts:

$$
\hat r_\phi(x, c) = \frac{1}{|\mathcal C(c)|} \sum_{k \in \mathcal C(c)} \sigma\big(f_\phi(x^{(1)}, \dots, x^{(4)}, c)_k\big)
\;\approx\; \frac{1}{|\mathcal C(c)|} \sum_{k \in \mathcal C(c)} \mathbb 1[\text{criterion } k \text{ holds}],
$$

with the criteria appearance, count, cross-view consistency and (for two objects) the relation. $f_\phi$
encodes each view with one small CNN (shared weights, pixel-coordinate channels, FiLM-modulated by the
parsed prompt), concatenates the four pooled view features in camera order as Reward3D does, and maps
them with the prompt embedding to one logit per criterion.

It is trained with a per-criterion binary cross-entropy against the exact evaluator's verdicts on
ground-truth views of train-split prompts and on corruptions of them: one attribute changed (colour,
shape, size or relation), an object dropped, one view swapped for another layout's (inconsistent views),
a view blanked, fog, blur and noise (what a half-fitted 3D field looks like), and samples of the
shipped ``solid-mv-flow`` generator. Everything is labelled for the original prompt. Held-out prompts never
enter training; the provenance records the held-out quality.

Retrain with ``python -m reference_impls.rewards.learned_solid --out reference_impls/checkpoints/solid-reward``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from reference_impls.rewards.criteria_training import (
    criteria_quality,
    fit_criteria_net,
    predicted_score,
    write_reward_checkpoint,
)
from reference_impls.worlds.grammar import COLOURS
from reference_impls.worlds.solid import (
    AZIMUTHS_DEG,
    CRITERIA,
    RELATIONS,
    SHAPES_3D,
    SolidSpec,
    as_solid_spec,
    evaluate_views,
    layout_scene,
    render_scenes,
    solid_prompt_split,
)

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "solid-reward"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VIEWS = len(AZIMUTHS_DEG)
_SIZE_WORDS = (None, "small", "large")
_PHRASE = len(COLOURS) + len(SHAPES_3D) + len(_SIZE_WORDS)
PROMPT_FEATURES = 2 * _PHRASE + 1 + len(RELATIONS)


# --8<-- [start:features]
@lru_cache(maxsize=4096)
def _feature_tuple(prompt: str) -> tuple[float, ...]:
    spec = as_solid_spec(prompt)
    features = np.zeros(PROMPT_FEATURES, dtype=np.float32)
    for slot, obj in enumerate(spec.objects):
        base = slot * _PHRASE
        features[base + COLOURS.index(obj.colour)] = 1
        features[base + len(COLOURS) + SHAPES_3D.index(obj.shape)] = 1
        features[base + len(COLOURS) + len(SHAPES_3D) + _SIZE_WORDS.index(obj.size)] = 1
    relation = 0 if spec.relation is None else 1 + RELATIONS.index(spec.relation)
    features[2 * _PHRASE + relation] = 1
    return tuple(features.tolist())


def solid_prompt_features(prompts: list[str]) -> torch.Tensor:
    """(B, PROMPT_FEATURES): one-hot colour, shape and size of each of up to two objects, and the relation."""
    return torch.tensor([_feature_tuple(p) for p in prompts], dtype=torch.float32)


def solid_criteria_mask(prompts: list[str]) -> torch.Tensor:
    """(B, 4) which of CRITERIA (appearance, count, consistency, relation) each prompt has."""
    return torch.tensor([[1.0, 1.0, 1.0, float(as_solid_spec(p).relation is not None)] for p in prompts],
                        dtype=torch.float32)
# --8<-- [end:features]


@dataclass(frozen=True)
class SolidRewardNetConfig:
    """Sizes of the reward network."""

    widths: tuple[int, int, int, int] = (16, 32, 48, 48)
    """Channels of the four 3x3 conv layers of the per-view encoder (strides 2, 2, 1, 2: 32 -> 4 pixels)."""
    prompt_hidden: int = 64
    """Width of the prompt embedding that modulates every conv layer."""
    head_hidden: int = 128
    """Width of the MLP head on the concatenated view features."""


# --8<-- [start:network]
class SolidRewardNet(nn.Module):
    """f_phi(views, c): per-criterion logits from views (B, 3, V, H, W) in [0, 1] and prompt features."""

    def __init__(self, config: SolidRewardNetConfig | None = None) -> None:
        super().__init__()
        config = config or SolidRewardNetConfig()
        self.config = config
        hidden = config.prompt_hidden
        self.prompt = nn.Sequential(nn.Linear(PROMPT_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        channels = (3 + 2, *config.widths)  # RGB + (y, x) pixel coordinates
        strides = (2, 2, 1, 2)
        self.convs = nn.ModuleList(nn.Conv2d(channels[i], channels[i + 1], 3, stride=strides[i], padding=1)
                                   for i in range(4))
        self.films = nn.ModuleList(nn.Linear(hidden, 2 * width) for width in config.widths)
        per_view = 2 * config.widths[-1]  # mean- and max-pooled
        self.head = nn.Sequential(nn.Linear(VIEWS * per_view + hidden, config.head_hidden), nn.ReLU(),
                                  nn.Linear(config.head_hidden, len(CRITERIA)))

    def forward(self, views: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        b, _, v, h, w = views.shape
        if v != VIEWS:
            raise ValueError(f"the solid reward reads {VIEWS} views (B, 3, {VIEWS}, H, W), got {tuple(views.shape)}")
        # Every view through the same encoder: (B, 3, V, H, W) -> (B * V, 3, H, W).
        images = views.permute(0, 2, 1, 3, 4).reshape(b * v, 3, h, w)
        grid = [torch.linspace(-1, 1, n, device=views.device, dtype=views.dtype) for n in (h, w)]
        y, x = (g.expand(b * v, 1, h, w) for g in torch.meshgrid(*grid, indexing="ij"))
        hidden = torch.cat([images * 2 - 1, y, x], dim=1)
        e = self.prompt(features)
        e_per_view = e.repeat_interleave(v, dim=0)
        for conv, film in zip(self.convs, self.films):
            scale, shift = film(e_per_view).chunk(2, dim=-1)
            hidden = torch.relu(conv(hidden) * (1 + scale[..., None, None]) + shift[..., None, None])
        pooled = torch.cat([hidden.mean(dim=(2, 3)), hidden.amax(dim=(2, 3))], dim=1)
        # Reward3D's fusion: the views' features side by side in camera order, then one MLP.
        return self.head(torch.cat([pooled.view(b, -1), e], dim=1))


# --8<-- [end:network]


@lru_cache(maxsize=4)
def load_solid_reward_net(directory: str = str(CHECKPOINT_DIR), device: str = "cpu") -> SolidRewardNet:
    """The shipped (or a retrained) SolidWorld reward network, frozen, in eval mode."""
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"no learned SolidWorld reward in {path}; train one with: "
                                f"python -m reference_impls.rewards.learned_solid --out {path}")
    meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    network = SolidRewardNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["network"].items()})
    net = SolidRewardNet(network)
    net.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    net.requires_grad_(False).eval()
    return net.to(device)


def learned_solid_reward(views: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Predicted fraction of satisfied criteria, differentiable in ``views`` ((B, 3, 4, 32, 32) in [0, 1])."""
    net = load_solid_reward_net(device=str(views.device))
    features = solid_prompt_features(prompts).to(views.device, views.dtype)
    mask = solid_criteria_mask(prompts).to(views.device, views.dtype)
    return predicted_score(net(views, features), mask)


# -- training data: views and corruptions, labelled by the exact evaluator ----------------------------
def _mutated_spec(spec: SolidSpec, rng: np.random.Generator) -> SolidSpec:
    """The spec with one thing changed: an object's colour, shape or size, the relation, or an object dropped.

    The result need not be a valid prompt (a cone may carry a cube): it is only rendered, never parsed.
    """
    options = ["colour", "shape", "size"] + (["relation", "drop"] if spec.relation else [])
    change = str(rng.choice(options))
    objects = list(spec.objects)
    if change == "drop":
        return SolidSpec((objects[int(rng.integers(2))],))
    if change == "relation":
        if spec.relation == "next to" and objects[1].shape in ("cube", "cylinder"):
            return SolidSpec(tuple(objects), "on top of")
        return SolidSpec(tuple(objects[::-1]) if spec.relation == "on top of" and rng.random() < 0.5
                         else tuple(objects), "next to")
    index = int(rng.integers(len(objects)))
    obj = objects[index]
    if change == "colour":
        taken = {o.colour for o in objects}
        value = str(rng.choice([c for c in COLOURS if c not in taken]))
    elif change == "shape":
        value = str(rng.choice([s for s in SHAPES_3D if s != obj.shape]))
    else:
        value = rng.choice([z for z in _SIZE_WORDS if z != obj.size])
        value = None if value is None else str(value)
    objects[index] = dataclasses.replace(obj, **{change: value})
    return SolidSpec(tuple(objects), spec.relation)


def _degrade(views: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fog, blur or noise on every view (what a half-fitted voxel field renders like)."""
    from scipy import ndimage

    x = views.astype(np.float32) / 255.0
    kind = rng.choice(["fog", "blur", "noise", "fog_noise"])
    if kind in ("fog", "fog_noise"):
        x = x + (1 - x) * rng.uniform(0.15, 0.6)
    if kind == "blur":
        x = ndimage.gaussian_filter(x, sigma=(0, float(rng.uniform(0.4, 1.2)), float(rng.uniform(0.4, 1.2)), 0))
    if kind in ("noise", "fog_noise"):
        x = x + rng.normal(0, rng.uniform(0.02, 0.15), x.shape)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


SYNTHETIC_KINDS = ("correct", "mutated", "mutated", "swapped_view", "blank_view", "other_prompt")
"""How a synthetic example is made (drawn uniformly; ``mutated`` twice as often)."""


def synthetic_views(prompts: list[str], seed: int) -> np.ndarray:
    """uint8 (N, V, 32, 32, 3): per prompt its views, or a corruption of them (labels come from the evaluator)."""
    rng = np.random.default_rng(seed)
    pool = solid_prompt_split("all")
    plans = []  # (kind, scene, second scene or None)
    for prompt in prompts:
        kind = str(rng.choice(SYNTHETIC_KINDS))
        spec = as_solid_spec(prompt)
        if kind == "mutated":
            spec = _mutated_spec(spec, rng)
        elif kind == "other_prompt":
            spec = as_solid_spec(pool[int(rng.integers(len(pool)))])
        second = layout_scene(spec, rng) if kind == "swapped_view" else None
        plans.append((kind, layout_scene(spec, rng), second))
    views = render_scenes([scene for _, scene, _ in plans])[0]
    swapped = [i for i, (kind, _, _) in enumerate(plans) if kind == "swapped_view"]
    if swapped:
        others = render_scenes([plans[i][2] for i in swapped])[0]
        for row, i in enumerate(swapped):
            view = int(rng.integers(VIEWS))
            views[i, view] = others[row, view]
    for i, (kind, _, _) in enumerate(plans):
        if kind == "blank_view":
            views[i, int(rng.integers(VIEWS))] = 255
        if rng.random() < 0.3:
            views[i] = _degrade(views[i], rng)
    return views


def model_views(prompts: list[str], seed: int, model: str = "solid-mv-flow") -> np.ndarray:
    """uint8 (N, V, 32, 32, 3) samples of the shipped multi-view generator, with a mix of samplers and steps."""
    from reference_impls.models import load_policy
    from reference_impls.sampling import SamplerConfig, rollout

    if not prompts:
        return np.empty((0, VIEWS, 32, 32, 3), dtype=np.uint8)
    policy = load_policy(model)
    policy.denoiser.eval()
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, len(prompts), 32):
        sampler = SamplerConfig(str(rng.choice(["ode", "sde"])), num_steps=int(rng.choice([6, 10, 20])))
        generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
        with torch.no_grad():
            views = rollout(policy, prompts[start : start + 32], sampler, generator).images  # (B, 3, V, H, W)
        chunks.append((views.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy())
    return np.concatenate(chunks)


def labelled(views: np.ndarray, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets (N, 4), mask (N, 4), exact criteria scores (N,)) from the exact evaluator."""
    evaluations = evaluate_views(views, prompts)
    mask = solid_criteria_mask(prompts)
    targets = torch.tensor([[float(e.criteria.get(k, False)) for k in CRITERIA] for e in evaluations])
    scores = (targets * mask).sum(1) / mask.sum(1)
    return targets, mask, scores


@dataclass
class SolidRewardTrainConfig:
    """Settings of ``python -m reference_impls.rewards.learned_solid``."""

    seed: int = 0
    """Seeds data generation, initialisation and batch order."""
    synthetic: int = 8000
    """Synthetic training examples (views and corruptions) of train-split prompts."""
    model_samples: int = 1024
    """Training examples sampled from solid-mv-flow on train-split prompts."""
    heldout_synthetic: int = 600
    """Synthetic examples of held-out prompts for the quality report."""
    heldout_model_samples: int = 256
    """Generator samples of held-out prompts for the quality report."""
    steps: int = 3000
    """AdamW steps."""
    batch_size: int = 64
    """Examples per step."""
    learning_rate: float = 2e-3
    """Peak learning rate (cosine decay to 5%)."""


def _prompts(split: str, n: int, rng: np.random.Generator) -> list[str]:
    pool = solid_prompt_split(split)
    return [pool[i] for i in rng.integers(len(pool), size=n)]


def _dataset(split: str, n_synthetic: int, n_model: int, seed: int):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    synthetic_prompts, model_prompts = _prompts(split, n_synthetic, rng), _prompts(split, n_model, rng)
    views = np.concatenate([synthetic_views(synthetic_prompts, seed + 1), model_views(model_prompts, seed + 2)])
    prompts = synthetic_prompts + model_prompts
    targets, mask, scores = labelled(views, prompts)
    x = torch.from_numpy(views).permute(0, 4, 1, 2, 3).contiguous()  # uint8 (N, 3, V, H, W)
    source = torch.tensor([0] * n_synthetic + [1] * n_model)
    return x, solid_prompt_features(prompts), targets, mask, scores, source


def _quality_by_source(net: SolidRewardNet, data: tuple, names: tuple[str, str] = ("synthetic", "solid-mv-flow")):  # noqa: ANN202
    x, features, targets, mask, scores, source = data
    report = {"all": criteria_quality(net, x, features, targets, mask, scores)}
    for code, name in enumerate(names):
        rows = source == code
        if int(rows.sum()) > 1:
            report[name] = criteria_quality(net, x[rows], features[rows], targets[rows], mask[rows], scores[rows])
    return report


def train_solid_reward(out_dir: str | Path, config: SolidRewardTrainConfig | None = None,
                       network: SolidRewardNetConfig | None = None, command: str = "", progress: bool = True) -> dict:
    """Generate labelled views, train the network deterministically, write it with its provenance."""
    config = config or SolidRewardTrainConfig()
    network = network or SolidRewardNetConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    train_data = _dataset("train", config.synthetic, config.model_samples, config.seed)
    heldout_data = _dataset("heldout", config.heldout_synthetic, config.heldout_model_samples, config.seed + 100)
    x, features, targets, mask, _, _ = train_data
    data_s = time.perf_counter() - start
    torch.manual_seed(config.seed)
    net = SolidRewardNet(network)
    losses = fit_criteria_net(net, x, features, targets, mask, steps=config.steps, batch_size=config.batch_size,
                              learning_rate=config.learning_rate, seed=config.seed, desc="solid-reward",
                              progress=progress)
    provenance = {
        "command": command, "config": asdict(config), "network": asdict(network),
        "parameters": sum(p.numel() for p in net.parameters()),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "quality": {"train": _quality_by_source(net, train_data), "heldout": _quality_by_source(net, heldout_data)},
        "data_seconds": round(data_s, 1), "minutes": round((time.perf_counter() - start) / 60, 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    meta = {"network": asdict(network), "criteria": list(CRITERIA), "prompt_features": PROMPT_FEATURES}
    write_reward_checkpoint(out_dir, net, meta, provenance, WEIGHTS_FILE, CONFIG_FILE)
    load_solid_reward_net.cache_clear()
    return provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the learned SolidWorld multi-view reward (solid-learned).")
    parser.add_argument("--out", default=str(CHECKPOINT_DIR))
    parser.add_argument("--steps", type=int, default=SolidRewardTrainConfig.steps)
    parser.add_argument("--synthetic", type=int, default=SolidRewardTrainConfig.synthetic)
    parser.add_argument("--model-samples", type=int, default=SolidRewardTrainConfig.model_samples)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = SolidRewardTrainConfig(seed=args.seed, synthetic=args.synthetic, model_samples=args.model_samples,
                                    steps=args.steps)
    import sys

    command = "python -m reference_impls.rewards.learned_solid " + " ".join(argv if argv is not None else sys.argv[1:])
    provenance = train_solid_reward(args.out, config, command=command.strip())
    print(json.dumps(provenance["quality"], indent=2))


if __name__ == "__main__":
    main()
