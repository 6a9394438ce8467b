"""Resolve a model name or a local folder to a :class:`GenerativePolicy` (never a hub id).

* ``shapes-diffusion`` / ``shapes-flow`` / ``shapes-flow-clip`` (images), ``motion-diffusion`` / ``motion-flow`` (clips),
  ``solid-mv-flow`` (SolidWorld's four views): the checkpoints shipped in ``reference_impls/checkpoints``.
* a folder with ``rlvg_model.json``: a ShapeWorld checkpoint (e.g. written by ``rlvg pretrain``/``train``).
* a folder with ``model_index.json``: a diffusers pipeline saved with ``save_pretrained``
  (``StableDiffusionPipeline`` or ``StableDiffusion3Pipeline``), loaded with ``from_pretrained(path)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from reference_impls.models.policy import GenerativePolicy

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
SHIPPED_MODELS: dict[str, str] = {
    "shapes-diffusion": "epsilon-prediction UNet2DConditionModel, cosine DDPM schedule, DDIM/DDPM samplers",
    "shapes-flow": "velocity-prediction UNet2DConditionModel with coordinate channels on a frozen T5 text encoder, "
                   "rectified flow, ODE/SDE samplers",
    "shapes-flow-clip": "the first flow base (until 2026-12): velocity-prediction UNet2DConditionModel on a CLIP text "
                        "encoder trained with it; places related objects at random. shapes-diffusion, motion-flow "
                        "and solid-mv-flow were made from it",
    "motion-diffusion": "MotionWorld video model (8x32x32 clips): motion-flow's network as an epsilon model, "
                        "DDIM/DDPM samplers",
    "motion-flow": "MotionWorld video model (8x32x32 clips): shapes-flow-clip inflated with temporal attention, "
                   "rectified flow, ODE/SDE samplers",
    "solid-mv-flow": "SolidWorld multi-view model (4 views of 32x32): shapes-flow-clip inflated with attention across "
                     "views, rectified flow, ODE/SDE samplers",
}


class ModelNotFoundError(ValueError):
    """A model name or path that does not resolve; the message lists what is allowed."""


def resolve_model_dir(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if text in SHIPPED_MODELS:
        directory = CHECKPOINTS_DIR / text
        if not (directory / "rlvg_model.json").exists():
            raise ModelNotFoundError(
                f"the shipped checkpoint {text!r} is missing from {directory}; reinstall the package or "
                f"recreate it with the command in its provenance (docs: Base models)"
            )
        return directory
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "rlvg_model.json").exists() or (path / "model_index.json").exists()):
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is not a model folder: expected rlvg_model.json (a ShapeWorld checkpoint) or "
            "model_index.json (a diffusers pipeline saved with save_pretrained)"
        )
    raise ModelNotFoundError(
        f"unknown model {text!r}: not a shipped name ({', '.join(SHIPPED_MODELS)}) and no such folder. "
        "Hub ids are not supported: save the pipeline locally and pass its folder."
    )


def load_policy(name_or_path: str | Path, device: str = "cpu") -> GenerativePolicy:
    directory = resolve_model_dir(name_or_path)
    if (directory / "rlvg_model.json").exists():
        from reference_impls.models.shapes_model import load_shapes_policy

        return load_shapes_policy(directory, name=str(name_or_path)).to(device)
    index = json.loads((directory / "model_index.json").read_text(encoding="utf-8"))
    from reference_impls.models.pipelines import policy_from_pipeline_dir

    return policy_from_pipeline_dir(directory, index, device=device)


def model_world(name_or_path: str | Path) -> str | None:
    """The synthetic world a model folder was made for (``shapes``, ``motion``), read without loading weights;
    None for a diffusers pipeline folder or a name that does not resolve."""
    try:
        meta_path = resolve_model_dir(name_or_path) / "rlvg_model.json"
        return json.loads(meta_path.read_text(encoding="utf-8")).get("world", "shapes")
    except (ModelNotFoundError, OSError, ValueError):
        return None
