"""Held-out evaluation shared by ``rlvg eval``, the training loop and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from reference_impls.models.policy import GenerativePolicy
from reference_impls.sampling import SamplerConfig, rollout


@dataclass
class EvalResult:
    """Scores of one evaluation pass."""

    prompts: list[str]
    images: torch.Tensor
    """(N, 3, H, W) images or (N, 3, F, H, W) clips in [0, 1]."""
    metrics: dict[str, float]
    """accuracy (all criteria hold), mean_score, per-criterion and per-task accuracy (the world's evaluator)."""


def default_eval_sampler(policy: GenerativePolicy, num_steps: int = 20, guidance_scale: float = 1.0) -> SamplerConfig:
    """Deterministic samplers for evaluation: DDIM eta=0 or the flow ODE."""
    if policy.kind == "diffusion":
        return SamplerConfig("ddim", num_steps=num_steps, eta=0.0, guidance_scale=guidance_scale)
    return SamplerConfig("ode", num_steps=num_steps, guidance_scale=guidance_scale)


def heldout_prompts(n: int, split: str = "heldout", seed: int = 1234, world: str = "shapes") -> list[str]:
    """A fixed list of n prompts cycling over the world's split in a seeded order (same list every call)."""
    from reference_impls.worlds.registry import get_world

    pool = get_world(world).prompt_split(split)
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[order[i % len(pool)]] for i in range(n)]


@torch.no_grad()
def generate(policy: GenerativePolicy, prompts: list[str], sampler: SamplerConfig, seed: int,
             batch_size: int = 64) -> torch.Tensor:
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        generator = torch.Generator(device=policy.device).manual_seed(seed + start)
        images.append(rollout(policy, chunk, sampler, generator).images.cpu())
    return torch.cat(images)


def evaluate_policy(policy: GenerativePolicy, prompts: list[str], sampler: SamplerConfig, seed: int = 0,
                    batch_size: int = 64) -> EvalResult:
    from reference_impls.worlds.registry import get_world, to_uint8

    world = get_world(policy.world or "shapes")
    images = generate(policy, prompts, sampler, seed, batch_size)
    evaluations = world.evaluate(to_uint8(images), prompts)
    return EvalResult(prompts, images, {k: float(v) for k, v in world.aggregate(evaluations).items()})


def clips_as_strips(clips: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """(N, 3, F, H, W) clips -> (N, 3, H, F W + (F - 1) gap) images: each clip's frames side by side."""
    n, c, frames, h, w = clips.shape
    strip = torch.full((n, c, h, frames * w + (frames - 1) * gap), 0.8, dtype=clips.dtype)
    for f in range(frames):
        strip[..., f * (w + gap) : f * (w + gap) + w] = clips[:, :, f].cpu()
    return strip


def save_gif(clips: torch.Tensor, path, columns: int = 4, scale: int = 3, frame_ms: int = 250) -> None:
    """Write an animated GIF of clips (N, 3, F, H, W) in [0, 1], tiled ``columns`` wide, looping forever."""
    from pathlib import Path

    from PIL import Image

    n, _, frames, h, w = clips.shape
    rows = (n + columns - 1) // columns
    array = (clips.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
    pictures = []
    for f in range(frames):
        canvas = Image.new("RGB", (columns * (w * scale + 2) - 2, rows * (h * scale + 2) - 2), (200, 200, 200))
        for i in range(n):
            r, c = divmod(i, columns)
            tile = Image.fromarray(array[i, f]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (c * (w * scale + 2), r * (h * scale + 2)))
        pictures.append(canvas)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.gif")
    pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)
    tmp.replace(path)


def save_grid(images: torch.Tensor, path, columns: int = 8, scale: int = 3, labels: list[str] | None = None) -> None:
    """Write a PNG grid of images (N, 3, H, W) in [0, 1], upscaled with nearest neighbour.

    Clips (N, 3, F, H, W) are drawn as frame strips, one clip per row.
    """
    from pathlib import Path

    from PIL import Image, ImageDraw

    if images.dim() == 5:
        images, columns = clips_as_strips(images), 1
    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    label_h = 10 if labels else 0
    cell_h, cell_w = h * scale + label_h, w * scale
    canvas = Image.new("RGB", (columns * cell_w + (columns - 1) * 2, rows * cell_h + (rows - 1) * 2), (200, 200, 200))
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, columns)
        tile = Image.fromarray(array[i]).resize((w * scale, h * scale), Image.NEAREST)
        x, y = c * (cell_w + 2), r * (cell_h + 2)
        canvas.paste(tile, (x, y))
        if labels:
            draw.rectangle([x, y + h * scale, x + cell_w, y + cell_h], fill=(255, 255, 255))
            draw.text((x + 1, y + h * scale), labels[i][: cell_w // 5], fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp)
    tmp.replace(path)
