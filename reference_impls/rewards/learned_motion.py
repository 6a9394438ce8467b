r"""A learned, differentiable MotionWorld reward: the video counterpart of ``shapes-learned``.

VADER and other reward-backpropagation methods need $\nabla_x r(x, c)$ for a clip $x$; MotionWorld's exact
evaluator thresholds colours and links detections into tracks, so it has no gradient. As the video papers
do with learned video reward models (VideoScore, ViCLIP, V-JEPA based rewards), we *learn* a smooth
approximation of what we score:

$$
\hat r_\phi(x, c) = \frac{1}{|\mathcal C(c)|} \sum_{k \in \mathcal C(c)} \sigma\big(f_\phi(x, c)_k\big)
\;\approx\; \frac{1}{|\mathcal C(c)|} \sum_{k \in \mathcal C(c)} \mathbb 1[\text{criterion } k \text{ holds}],
$$

with the criteria appearance, count, consistency, direction and speed (speed only when the prompt names
one). $f_\phi$ is a small 3D CNN over (frames, height, width) with coordinate and time channels, modulated
layer by layer (FiLM) by the parsed prompt (one-hot colour, shape, direction and speed per object). It is
trained with a per-criterion binary cross-entropy against the exact evaluator's verdicts on ground-truth
clips of train-split prompts and on corrupted ones: played backwards, frozen, shuffled, a frame blanked,
or rendered for a prompt with one attribute changed (colour, shape, direction or speed), all labelled for
the original prompt. Held-out prompts never enter training; the provenance records the held-out quality.

Like any learned reward it can be hacked, which is what reward-backpropagation through it shows.
Retrain with ``python -m reference_impls.rewards.learned_motion --out reference_impls/checkpoints/motion-reward``.
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
from reference_impls.worlds.grammar import COLOURS, SHAPES
from reference_impls.worlds.motion import (
    CRITERIA,
    DIRECTIONS,
    SPEEDS,
    as_motion_spec,
    evaluate_clips,
    motion_prompt_split,
    render_clip,
)

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints" / "motion-reward"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_PHRASE = len(COLOURS) + len(SHAPES) + len(DIRECTIONS) + 1 + len(SPEEDS)  # ... speed: none, slowly, quickly
PROMPT_FEATURES = 2 * _PHRASE


# --8<-- [start:features]
@lru_cache(maxsize=4096)
def _feature_tuple(prompt: str) -> tuple[float, ...]:
    features = np.zeros(PROMPT_FEATURES, dtype=np.float32)
    for slot, obj in enumerate(as_motion_spec(prompt).objects):
        base = slot * _PHRASE
        features[base + COLOURS.index(obj.colour)] = 1
        features[base + len(COLOURS) + SHAPES.index(obj.shape)] = 1
        features[base + len(COLOURS) + len(SHAPES) + list(DIRECTIONS).index(obj.direction)] = 1
        speed = 0 if obj.speed is None else 1 + list(SPEEDS).index(obj.speed)
        features[base + len(COLOURS) + len(SHAPES) + len(DIRECTIONS) + speed] = 1
    return tuple(features.tolist())


def motion_prompt_features(prompts: list[str]) -> torch.Tensor:
    """(B, PROMPT_FEATURES): one-hot colour, shape, direction and speed of each of up to two objects."""
    return torch.tensor([_feature_tuple(p) for p in prompts], dtype=torch.float32)


def motion_criteria_mask(prompts: list[str]) -> torch.Tensor:
    """(B, 5) which of CRITERIA (appearance, count, consistency, direction, speed) each prompt has."""
    return torch.tensor([[1.0, 1.0, 1.0, 1.0, float(any(o.speed for o in as_motion_spec(p).objects))]
                         for p in prompts], dtype=torch.float32)
# --8<-- [end:features]


@dataclass(frozen=True)
class MotionRewardNetConfig:
    """Sizes of the reward network."""

    widths: tuple[int, int, int, int] = (16, 32, 32, 48)
    """Channels of the four 3x3x3 conv layers (spatial strides 2, 2, 1, 2: 32 -> 16 -> 8 -> 8 -> 4 pixels)."""
    prompt_hidden: int = 64
    """Width of the prompt embedding that modulates every conv layer."""
    head_hidden: int = 128
    """Width of the MLP head on the pooled features."""


# --8<-- [start:network]
class MotionRewardNet(nn.Module):
    """f_phi(x, c): per-criterion logits from a clip (B, 3, F, H, W) in [0, 1] and prompt features."""

    def __init__(self, config: MotionRewardNetConfig | None = None) -> None:
        super().__init__()
        config = config or MotionRewardNetConfig()
        self.config = config
        hidden = config.prompt_hidden
        self.prompt = nn.Sequential(nn.Linear(PROMPT_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        channels = (3 + 3, *config.widths)  # RGB + (t, y, x) coordinate channels
        strides = ((1, 2, 2), (1, 2, 2), (1, 1, 1), (1, 2, 2))
        self.convs = nn.ModuleList(
            nn.Conv3d(channels[i], channels[i + 1], 3, stride=strides[i], padding=1) for i in range(4))
        self.films = nn.ModuleList(nn.Linear(hidden, 2 * width) for width in config.widths)
        pooled = 2 * config.widths[-1]
        self.head = nn.Sequential(nn.Linear(pooled + hidden, config.head_hidden), nn.ReLU(),
                                  nn.Linear(config.head_hidden, len(CRITERIA)))

    def forward(self, clips: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = clips.shape
        grid = [torch.linspace(-1, 1, n, device=clips.device, dtype=clips.dtype) for n in (f, h, w)]
        t, y, x = (g.expand(b, 1, f, h, w) for g in torch.meshgrid(*grid, indexing="ij"))
        hidden = torch.cat([clips * 2 - 1, t, y, x], dim=1)
        e = self.prompt(features)
        for conv, film in zip(self.convs, self.films):
            scale, shift = film(e).chunk(2, dim=-1)
            hidden = torch.relu(conv(hidden) * (1 + scale[..., None, None, None]) + shift[..., None, None, None])
        pooled = torch.cat([hidden.mean(dim=(2, 3, 4)), hidden.amax(dim=(2, 3, 4))], dim=1)
        return self.head(torch.cat([pooled, e], dim=1))


# --8<-- [end:network]


@lru_cache(maxsize=4)
def load_motion_reward_net(directory: str = str(CHECKPOINT_DIR), device: str = "cpu") -> MotionRewardNet:
    """The shipped (or a retrained) motion reward network, frozen, in eval mode."""
    from safetensors.torch import load_file

    path = Path(directory)
    if not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"no learned motion reward in {path}; train one with: "
                                f"python -m reference_impls.rewards.learned_motion --out {path}")
    meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    network = MotionRewardNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["network"].items()})
    net = MotionRewardNet(network)
    net.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    net.requires_grad_(False).eval()
    return net.to(device)


def learned_motion_reward(clips: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Predicted fraction of satisfied criteria, differentiable in ``clips`` ((B, 3, F, 32, 32) in [0, 1])."""
    net = load_motion_reward_net(device=str(clips.device))
    features = motion_prompt_features(prompts).to(clips.device, clips.dtype)
    mask = motion_criteria_mask(prompts).to(clips.device, clips.dtype)
    return predicted_score(net(clips, features), mask)


# -- training data: clips and corruptions, labelled by the exact evaluator ----------------------------
def _mutated_spec(prompt: str, rng: np.random.Generator):  # noqa: ANN202
    """The prompt's spec with one attribute of one object changed (colour, shape, direction or speed)."""
    spec = as_motion_spec(prompt)
    index = int(rng.integers(len(spec.objects)))
    obj = spec.objects[index]
    field = rng.choice(["colour", "shape", "direction", "speed"] if len(spec.objects) == 1
                       else ["colour", "shape", "direction"])
    options = {"colour": COLOURS, "shape": SHAPES, "direction": tuple(DIRECTIONS), "speed": tuple(SPEEDS)}[field]
    current = getattr(obj, field)
    choice = rng.choice([o for o in options if o != current])
    objects = list(spec.objects)
    objects[index] = dataclasses.replace(obj, **{field: str(choice)})
    return dataclasses.replace(spec, objects=tuple(objects))


def synthetic_clips(prompts: list[str], seed: int, frames: int = 8) -> np.ndarray:
    """uint8 (N, F, 32, 32, 3): per prompt a correct clip or one corruption of it (for the exact labels)."""
    rng = np.random.default_rng(seed)
    clips = []
    for prompt in prompts:
        kind = rng.choice(["correct", "reversed", "frozen", "shuffled", "blanked", "mutated", "mutated"])
        if kind == "mutated":
            clips.append(render_clip(_mutated_spec(prompt, rng), rng, frames))
            continue
        clip = render_clip(prompt, rng, frames)
        if kind == "reversed":
            clip = clip[::-1]
        elif kind == "frozen":
            still = int(rng.integers(frames))
            clip = np.repeat(clip[still : still + 1], frames, axis=0)
        elif kind == "shuffled":
            clip = clip[rng.permutation(frames)]
        elif kind == "blanked":
            clip = clip.copy()
            clip[int(rng.integers(frames))] = 255
        clips.append(np.ascontiguousarray(clip))
    return np.stack(clips)


def labelled(clips: np.ndarray, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(targets (N, 5), mask (N, 5), exact criteria scores (N,)) from the exact evaluator."""
    evaluations = evaluate_clips(clips, prompts)
    mask = motion_criteria_mask(prompts)
    targets = torch.tensor([[float(e.criteria.get(k, False)) for k in CRITERIA] for e in evaluations])
    scores = (targets * mask).sum(1) / mask.sum(1)
    return targets, mask, scores


@dataclass
class MotionRewardTrainConfig:
    """Settings of ``python -m reference_impls.rewards.learned_motion``."""

    seed: int = 0
    """Seeds data generation, initialisation and batch order."""
    clips: int = 12000
    """Training clips (correct and corrupted) of train-split prompts."""
    heldout_clips: int = 600
    """Clips of held-out prompts for the quality report."""
    steps: int = 3000
    """AdamW steps."""
    batch_size: int = 64
    """Clips per step."""
    learning_rate: float = 2e-3
    """Peak learning rate (cosine decay to 5%)."""


def _dataset(split: str, n: int, seed: int):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    pool = motion_prompt_split(split)
    prompts = [pool[i] for i in rng.integers(len(pool), size=n)]
    clips = synthetic_clips(prompts, seed + 1)
    targets, mask, scores = labelled(clips, prompts)
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous()  # uint8 (N, 3, F, H, W)
    return x, motion_prompt_features(prompts), targets, mask, scores


def train_motion_reward(out_dir: str | Path, config: MotionRewardTrainConfig | None = None,
                        network: MotionRewardNetConfig | None = None, command: str = "", progress: bool = True) -> dict:
    """Generate labelled clips, train the network deterministically, write it with its provenance."""
    config = config or MotionRewardTrainConfig()
    network = network or MotionRewardNetConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    x, features, targets, mask, scores = _dataset("train", config.clips, config.seed)
    hx, hfeatures, htargets, hmask, hscores = _dataset("heldout", config.heldout_clips, config.seed + 100)
    data_s = time.perf_counter() - start
    net = MotionRewardNet(network)
    losses = fit_criteria_net(net, x, features, targets, mask, steps=config.steps, batch_size=config.batch_size,
                              learning_rate=config.learning_rate, seed=config.seed, desc="motion-reward",
                              progress=progress)
    provenance = {
        "command": command, "config": asdict(config), "network": asdict(network),
        "parameters": sum(p.numel() for p in net.parameters()),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "quality": {"train": criteria_quality(net, x, features, targets, mask, scores),
                    "heldout": criteria_quality(net, hx, hfeatures, htargets, hmask, hscores)},
        "data_seconds": round(data_s, 1), "minutes": round((time.perf_counter() - start) / 60, 2),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    meta = {"network": asdict(network), "criteria": list(CRITERIA), "prompt_features": PROMPT_FEATURES}
    write_reward_checkpoint(out_dir, net, meta, provenance, WEIGHTS_FILE, CONFIG_FILE)
    load_motion_reward_net.cache_clear()
    return provenance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the learned MotionWorld reward (motion-learned).")
    parser.add_argument("--out", default=str(CHECKPOINT_DIR))
    parser.add_argument("--steps", type=int, default=MotionRewardTrainConfig.steps)
    parser.add_argument("--clips", type=int, default=MotionRewardTrainConfig.clips)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = MotionRewardTrainConfig(seed=args.seed, clips=args.clips, steps=args.steps)
    import sys

    command = "python -m reference_impls.rewards.learned_motion " + " ".join(argv if argv is not None else sys.argv[1:])
    provenance = train_motion_reward(args.out, config, command=command.strip())
    print(json.dumps(provenance["quality"], indent=2))


if __name__ == "__main__":
    main()
