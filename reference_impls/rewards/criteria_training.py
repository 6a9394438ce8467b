"""What the learned rewards share: a per-criterion network's training loop, quality report and atomic write.

``shapes-learned``'s ancestor, ``motion-learned`` and ``solid-learned`` all predict the exact evaluator's
criteria with one logit each and are trained the same way: a masked binary cross-entropy (criteria a prompt
does not have are masked out), AdamW with a cosine decay to 5%, minibatches drawn with a seeded generator.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn


def predicted_score(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The learned reward: mean over the prompt's criteria of P(criterion holds), (B,)."""
    return (torch.sigmoid(logits) * mask).sum(dim=1) / mask.sum(dim=1)


def fit_criteria_net(net: nn.Module, x: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
                     mask: torch.Tensor, *, steps: int, batch_size: int, learning_rate: float, seed: int,
                     desc: str, progress: bool = True) -> list[float]:
    """Train ``net(x / 255, features)`` on uint8 inputs with the masked per-criterion BCE; returns the losses."""
    optimiser = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    generator = torch.Generator().manual_seed(seed)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=desc, unit="step")
    losses = []
    for _ in iterator:
        rows = torch.randint(0, len(x), (batch_size,), generator=generator)
        logits = net(x[rows].float() / 255, features[rows])
        loss = (nn.functional.binary_cross_entropy_with_logits(logits, targets[rows], reduction="none")
                * mask[rows]).sum() / mask[rows].sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
    net.eval()
    return losses


def criteria_quality(net: nn.Module, x: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
                     mask: torch.Tensor, scores: torch.Tensor) -> dict[str, float]:
    """Agreement of the learned reward with the exact criteria scores: Pearson r, MAE, per-criterion accuracy."""
    with torch.no_grad():
        logits = torch.cat([net(x[i : i + 256].float() / 255, features[i : i + 256]) for i in range(0, len(x), 256)])
    predicted = predicted_score(logits, mask)
    hits = ((logits > 0).float() == targets).float() * mask
    return {"n": float(len(x)), "pearson_r": float(torch.corrcoef(torch.stack([predicted, scores]))[0, 1]),
            "mae": float((predicted - scores).abs().mean()), "criterion_accuracy": float(hits.sum() / mask.sum()),
            "exact_score_mean": float(scores.mean()), "predicted_score_mean": float(predicted.mean())}


def write_reward_checkpoint(out_dir: str | Path, net: nn.Module, meta: dict, provenance: dict,
                            weights_file: str = "model.safetensors", config_file: str = "config.json") -> None:
    """Weights, config and provenance written to ``OUT.partial`` and renamed into place (a killed run leaves
    the previous checkpoint untouched)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(partial / weights_file))
    (partial / weights_file).chmod(0o644)
    (partial / config_file).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    (partial / "provenance.json").write_text(json.dumps(provenance, indent=2), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
