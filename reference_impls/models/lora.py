"""Low-rank adapters (LoRA; Hu et al., 2022) on a denoiser's attention projections, through peft.

The papers of this field fine-tune large denoisers with LoRA (DDPO, DPOK, Flow-GRPO, DanceGRPO all do):
``W = W_0 + (alpha / r) B A`` with ``A`` (r x d_in) and ``B`` (d_out x r), ``B`` starting at zero so the
adapted model starts exactly at the base. Only ``A`` and ``B`` train. On small batches of a policy
gradient this matters beyond memory: the noise of the gradient moves a few thousand adapter weights rather
than every weight of the network.
"""

from __future__ import annotations

from pathlib import Path

import torch

ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(denoiser: torch.nn.Module, rank: int, alpha: float | None = None,
             target_modules: list[str] | None = None) -> None:
    """Freeze ``denoiser`` and attach trainable LoRA adapters of ``rank`` to its attention projections."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    denoiser.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                        target_modules=target_modules or ATTENTION_PROJECTIONS)
    denoiser.add_adapter(config)  # type: ignore[operator]  # diffusers' PeftAdapterMixin


def has_lora(denoiser: torch.nn.Module) -> bool:
    return any("lora_" in name for name, _ in denoiser.named_parameters())


def merged_state_dict(denoiser: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain network with every adapter folded in: W_0 + (alpha / r) B A.

    The keys are those of the network without adapters, so the result loads into a fresh copy of the
    base architecture (and a checkpoint folder made from it needs no peft to be read).
    """
    from peft.tuners.lora import LoraLayer

    merged: dict[str, torch.Tensor] = {}
    adapted: set[str] = set()
    for name, module in denoiser.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            delta = module.get_delta_weight(module.active_adapters[0]).detach()
            merged[f"{name}.weight"] = (base.weight.detach() + delta).clone()
            if base.bias is not None:
                merged[f"{name}.bias"] = base.bias.detach().clone()
            adapted.add(name)
    for key, value in denoiser.state_dict().items():
        if "lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        module_name = plain.rsplit(".", 1)[0]
        if module_name not in adapted:
            merged[plain] = value.detach().clone()
    return merged


def save_pipeline_lora(denoiser: torch.nn.Module, pipeline_class: str, directory: str | Path) -> Path:
    """Write ``denoiser``'s adapters where ``pipe.load_lora_weights(directory)`` finds them.

    The file is diffusers' own format (``pytorch_lora_weights.safetensors``, written by the pipeline
    class's ``save_lora_weights``), with the adapter's rank and alpha as metadata so a loader rebuilds
    the same ``alpha / r`` scale.
    """
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from reference_impls.models.pipelines import DENOISER_COMPONENT

    if pipeline_class not in DENOISER_COMPONENT:
        raise ValueError(f"no LoRA format for pipeline class {pipeline_class!r}; "
                         f"supported: {', '.join(DENOISER_COMPONENT)}")
    component = DENOISER_COMPONENT[pipeline_class]
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    metadata = denoiser.peft_config["default"].to_dict()  # type: ignore[index]
    directory = Path(directory)
    getattr(diffusers, pipeline_class).save_lora_weights(
        directory, safe_serialization=True,
        **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": metadata})
    return directory / "pytorch_lora_weights.safetensors"
