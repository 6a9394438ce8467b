"""Deterministic pretraining of the tiny ShapeWorld base models on ground-truth renders.

Objective (per batch of train-split prompts c and renders x0 in [-1, 1]):

* diffusion: t ~ U{0..999}, eps ~ N(0, I), x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,
  L = ||v_theta(x_t, t, c) - v||^2 with v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (v-prediction; Salimans &
  Ho, 2022). The policy converts v to the noise estimate eps = sqrt(a_t) v + sqrt(1 - a_t) x_t, so the
  DDPM/DDIM samplers and every method see an epsilon-prediction model (Ho et al., 2020).
* flow:      s ~ U(0, 1), x_s = (1 - s) x0 + s eps,  L = ||v_theta(x_s, s, c) - (eps - x0)||^2
  (rectified flow / flow matching; Liu et al., 2023; Lipman et al., 2023)

Prompts are dropped to "" with probability ``cfg_dropout`` so classifier-free guidance works. The text
encoder trains jointly, unless ``text_encoder_from`` names a separately pretrained one
(:mod:`reference_impls.models.text_pretrain`), which stays frozen as in SD3 or FLUX. An exponential moving
average of the trained weights is what gets saved.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from reference_impls.models.components import TinyModelConfig
from reference_impls.models.policy import GenerativePolicy
from reference_impls.models.shapes_model import build_shapes_policy, save_shapes_policy


@dataclass
class PretrainConfig:
    """Settings of ``rlvg pretrain``."""

    kind: str = "diffusion"
    """diffusion (epsilon prediction, DDPM schedule) or flow (velocity prediction, rectified flow)."""
    steps: int = 3000
    """Optimiser steps; the run is deterministic in this number (``minutes`` only caps it)."""
    minutes: float | None = None
    """Optional wall-clock cap; the provenance records the steps actually reached."""
    stop_after: int | None = None
    """Stop after this many steps of the ``steps``-long schedule: replays a run that a ``minutes`` cap ended."""
    batch_size: int = 48
    """Images per step, rendered on the fly from train-split prompts."""
    learning_rate: float = 1e-3
    """AdamW learning rate after a linear warm-up of 200 steps, cosine-decayed to 10%."""
    ema_decay: float = 0.998
    """Decay of the weight average that is saved."""
    cfg_dropout: float = 0.1
    """Probability of training on the empty prompt (classifier-free guidance)."""
    seed: int = 0
    """Seeds torch and the prompt/render stream."""
    init_from: str | None = None
    """Continue from this checkpoint folder's weights (same kind and sizes) instead of a random start;
    the prompt/render stream is seeded afresh, so the continuation sees new images."""
    prompts: str = "train"
    """Data mix: one prompt split, or several joined by commas (``train,train-position``); each image
    first draws a split uniformly, then a prompt of it, so listing a task split raises that task's share."""
    time_shift: float = 1.0
    """Flow models: draw the noise level as s' = k s / (1 + (k - 1) s) from uniform s (SD3's shift k).
    k > 1 spends more of the training on high noise, where the layout (and so a spatial relation) is
    decided; 1 is the uniform draw every shipped model was made with."""
    save_every: int | None = None
    """Write the weight average to the output folder (atomically) every this many steps, so a long run
    can be evaluated while it goes on and a killed run keeps its last snapshot."""
    world: str = "shapes"
    """shapes (32x32 images), motion (MotionWorld clips) or solid (SolidWorld's 4 views). A motion or solid
    model starts from ``inflate_from`` (unless ``init_from`` continues one) and trains on clips of ``frames``
    frames, or on the views of all four cameras."""
    inflate_from: str = "shapes-flow-clip"
    """Motion and solid worlds: the ShapeWorld image model (shipped name or folder) whose weights the 5-D
    model starts from, per frame or view, with zero-initialised attention along the extra axis."""
    frames: int = 8
    """Motion world: frames per training clip (and of the model's samples). The solid world ignores it:
    its samples have one view per camera."""
    text_encoder_from: str | None = None
    """Shapes world: condition on this frozen, separately pretrained text encoder (a ``text_pretrain`` folder)
    and train the UNet only. With ``init_from``, only the UNet's weights are taken from that checkpoint."""


WORLDS = ("shapes", "motion", "solid")


def _axis_length(config: PretrainConfig) -> int:
    """Length of the extra sample axis of a 5-D world: frames of a clip, or SolidWorld's camera count."""
    if config.world == "solid":
        from reference_impls.worlds.solid import AZIMUTHS_DEG

        return len(AZIMUTHS_DEG)
    return config.frames


def _render_batch(prompts: list[str], rng: np.random.Generator, world: str = "shapes",
                  frames: int = 8) -> torch.Tensor:
    """Ground truth in [-1, 1]: (B, 3, H, W) images, (B, 3, F, H, W) clips for the motion world, or
    (B, 3, V, H, W) views for the solid world (each scene laid out from a seed drawn from ``rng``)."""
    if world == "solid":
        from reference_impls.worlds.solid import render_views

        views = render_views(prompts, seed=int(rng.integers(0, 2**31))).astype(np.float32) / 127.5 - 1.0
        return torch.from_numpy(views).permute(0, 4, 1, 2, 3).contiguous()
    if world == "motion":
        from reference_impls.worlds.motion import render_clip

        clips = np.stack([render_clip(p, rng, frames) for p in prompts]).astype(np.float32) / 127.5 - 1.0
        return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).contiguous()
    from reference_impls.worlds import render

    images = np.stack([render(p, rng) for p in prompts]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _draw_prompts(pools: list[list[str]], n: int, rng: np.random.Generator) -> list[str]:
    """n prompts: a pool drawn uniformly per image, then a prompt of it (one pool: the old single-split stream)."""
    if len(pools) == 1:
        return [pools[0][i] for i in rng.integers(0, len(pools[0]), n)]
    which = rng.integers(0, len(pools), n)
    return [pools[k][rng.integers(0, len(pools[k]))] for k in which]


def _write_snapshot(policy: GenerativePolicy, modules: torch.nn.ModuleList, ema: torch.nn.ModuleList,
                    out_dir: Path, model_config: TinyModelConfig, config: PretrainConfig, steps_done: int,
                    losses: list[float], command: str) -> None:
    """Save the weight average now without disturbing training (live weights are put back afterwards)."""
    live = copy.deepcopy(modules.state_dict())
    modules.load_state_dict(ema.state_dict())
    provenance = {"command": command, "config": asdict(config), "model_config": asdict(model_config),
                  "steps_done": steps_done, "snapshot": True,
                  "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None, "commit": _git_commit()}
    write_checkpoint_atomically(policy, out_dir, model_config, provenance)
    modules.load_state_dict(live)


def shifted_noise_level(s: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift: maps uniform s in [0, 1] to shift * s / (1 + (shift - 1) s) (identity at 1)."""
    return shift * s / (1 + (shift - 1) * s)


def _loss(policy: GenerativePolicy, x0: torch.Tensor, prompts: list[str], generator: torch.Generator,
          time_shift: float = 1.0) -> torch.Tensor:
    cond = policy.encode_text(prompts)
    noise = torch.randn(x0.shape, generator=generator)
    if policy.kind == "diffusion":
        t = torch.randint(0, 1000, (x0.shape[0],), generator=generator)
        a = policy.scheduler.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1))).float()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
        return torch.mean((policy.call_denoiser.raw(policy.denoiser, x_t, t, cond) - target) ** 2)
    s = torch.rand(x0.shape[0], generator=generator)
    if time_shift != 1.0:
        s = shifted_noise_level(s, time_shift)
    s_ = s.view(-1, *([1] * (x0.dim() - 1)))
    x_s = (1 - s_) * x0 + s_ * noise
    return torch.mean((policy.predict(x_s, s * 1000, cond) - (noise - x0)) ** 2)


def _load_weights_into(policy: GenerativePolicy, folder: Path, kind: str, unet_only: bool = False) -> None:
    """Copy a checkpoint's denoiser and text-encoder weights into a freshly built policy (safetensors).

    ``unet_only``: keep the policy's own text encoder. If the policy's UNet takes coordinate channels and
    the checkpoint's does not, their input weights start at zero, so the copy computes what the checkpoint
    did until training moves them."""
    from reference_impls.models.shapes_model import MODEL_FILE, load_shapes_policy

    meta = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    if meta.get("world", "shapes") != policy.world:
        raise ValueError(f"--init-from {folder} holds a {meta.get('world', 'shapes')} model; this run trains "
                         f"a {policy.world} model")
    if meta["kind"] != kind or meta.get("network", "native") != "native":
        raise ValueError(f"--init-from {folder} holds a {meta['kind']} model with network "
                         f"{meta.get('network', 'native')!r}; pretraining needs a native {kind} checkpoint")
    source = load_shapes_policy(folder)
    state = source.denoiser.state_dict()
    target_in = policy.denoiser.conv_in.weight
    if state["conv_in.weight"].shape[1] < target_in.shape[1]:
        padded = torch.zeros_like(target_in)
        padded[:, : state["conv_in.weight"].shape[1]] = state["conv_in.weight"]
        state["conv_in.weight"] = padded
    policy.denoiser.load_state_dict(state)
    if not unet_only:
        policy.text_encoder.text_encoder.load_state_dict(source.text_encoder.text_encoder.state_dict())


def _use_frozen_text_encoder(policy: GenerativePolicy, folder: Path, model_config: TinyModelConfig) -> None:
    """Swap in a ``text_pretrain`` folder's encoder and tokenizer, frozen."""
    from reference_impls.models.shapes_model import load_text_encoder
    from reference_impls.models.tokenizer import WordTokenizer

    if model_config.text_encoder != "t5":
        raise ValueError(f"--text-encoder-from {folder}: the model config must name the t5 encoder")
    conditioner = policy.text_encoder
    conditioner.tokenizer = WordTokenizer.from_pretrained(folder / "tokenizer")
    conditioner.text_encoder = load_text_encoder(folder / "text_encoder", "t5").eval().requires_grad_(False)


def _inflated_start(config: PretrainConfig, model_config: TinyModelConfig) -> GenerativePolicy:
    """The motion or solid model before training: ``inflate_from`` per frame or view, zero attention along
    that axis, new words."""
    from reference_impls.models.loading import load_policy
    from reference_impls.models.shapes_model import inflate_to_motion_policy

    image = load_policy(config.inflate_from)
    if image.world != "shapes" or image.kind != config.kind:
        raise ValueError(f"--inflate-from {config.inflate_from} is a {image.kind} model of world {image.world}; "
                         f"a {config.world} {config.kind} model inflates a shapes {config.kind} model")
    return inflate_to_motion_policy(image, _axis_length(config), model_config, seed=config.seed,
                                    world=config.world)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pretrain(config: PretrainConfig, out_dir: Path, model_config: TinyModelConfig | None = None,
             progress: bool = True, command: str = "") -> dict:
    """Train from scratch and write a checkpoint folder atomically; returns the provenance record."""
    from reference_impls.worlds import prompt_split

    if config.world not in WORLDS:
        raise ValueError(f"unknown world {config.world!r}; valid worlds: {', '.join(WORLDS)}")
    model_config = model_config or TinyModelConfig()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    split_prompts = prompt_split
    if config.world in ("motion", "solid"):
        from reference_impls.worlds.registry import get_world

        split_prompts = get_world(config.world).prompt_split
        policy = _inflated_start(config, model_config)
    else:
        policy = build_shapes_policy(config.kind, model_config, seed=config.seed)
    if config.text_encoder_from:
        _use_frozen_text_encoder(policy, Path(config.text_encoder_from), model_config)
    if config.init_from:
        _load_weights_into(policy, Path(config.init_from), config.kind, unet_only=bool(config.text_encoder_from))
    trained = [policy.denoiser] if config.text_encoder_from else [policy.denoiser, policy.text_encoder.text_encoder]
    modules = torch.nn.ModuleList(trained)
    modules.train()
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    warmup = 200

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress_)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    prompt_pools = [split_prompts(name.strip()) for name in config.prompts.split(",")]
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"pretrain {config.kind}", unit="step")
    losses: list[float] = []
    step = 0
    for step in range(config.steps):
        prompts = _draw_prompts(prompt_pools, config.batch_size, rng)
        x0 = _render_batch(prompts, rng, config.world, config.frames)
        dropped = rng.random(config.batch_size) < config.cfg_dropout
        prompts = ["" if d else p for p, d in zip(prompts, dropped)]
        loss = _loss(policy, x0, prompts, generator, config.time_shift)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), modules.parameters()):
                p_ema.lerp_(p, 1 - decay)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            _write_snapshot(policy, modules, ema, out_dir, model_config, config, step + 1, losses, command)
        if config.minutes is not None and time.perf_counter() - start > 60 * config.minutes:
            break
        if config.stop_after is not None and step + 1 >= config.stop_after:
            break
    if bar is not None:
        bar.close()
    steps_done = step + 1
    modules.load_state_dict(ema.state_dict())
    modules.eval()
    minutes = (time.perf_counter() - start) / 60
    provenance = {
        "command": command,
        "config": asdict(config),
        "model_config": asdict(model_config),
        "steps_done": steps_done,
        "minutes": round(minutes, 2),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])) if losses else None,
        "commit": _git_commit(),
        "torch": torch.__version__,
        "parameters_denoiser": sum(p.numel() for p in policy.denoiser.parameters()),
        "parameters_text_encoder": sum(p.numel() for p in policy.text_encoder.parameters()),
    }
    write_checkpoint_atomically(policy, out_dir, model_config, provenance)
    return provenance


def write_checkpoint_atomically(policy: GenerativePolicy, out_dir: Path, model_config: TinyModelConfig,
                                provenance: dict) -> None:
    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    save_shapes_policy(policy, partial, model_config)
    (partial / "provenance.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
