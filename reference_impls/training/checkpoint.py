"""Atomic checkpoints in safetensors + JSON: nothing is ever unpickled.

A checkpoint is a folder ``checkpoints/step_000012`` written under a temporary name and renamed into
place, then ``checkpoints/latest`` (a one-line file) is replaced atomically. A run killed at any moment
leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(directory: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    extra_state: dict[str, Any], extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:06d}"
    partial = directory / f".step_{step:06d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(weights, str(partial / "model.safetensors"))
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer)
        save_file(tensors, str(partial / "optimizer.safetensors"))
        (partial / "optimizer.json").write_text(json.dumps(meta), encoding="utf-8")
    if extra_tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(partial / "extra.safetensors"))
    (partial / "state.json").write_text(json.dumps({"step": step, **extra_state}), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    latest_tmp = directory / ".latest.tmp"
    latest_tmp.write_text(final.name, encoding="utf-8")
    os.replace(latest_tmp, directory / "latest")
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / "latest"
    if not pointer.exists():
        return None
    path = directory / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.json").exists() else None


def load_checkpoint(path: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    module.load_state_dict(load_file(str(path / "model.safetensors")))
    if optimizer is not None and (path / "optimizer.safetensors").exists():
        meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        _restore_optimizer(optimizer, load_file(str(path / "optimizer.safetensors")), meta)
    return json.loads((path / "state.json").read_text(encoding="utf-8"))


def prune_checkpoints(directory: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` checkpoints (the one ``latest`` names is always among them)."""
    folders = sorted(p for p in directory.glob("step_*") if p.is_dir())
    for old in folders[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_extra_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint saved beside the weights (e.g. an EMA of them); empty if none."""
    extra = path / "extra.safetensors"
    return load_file(str(extra)) if extra.exists() else {}
