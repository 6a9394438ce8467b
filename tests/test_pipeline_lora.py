"""A run on a real pipeline leaves what diffusers users load: ``pipe.load_lora_weights(RUN/final)``.

Tiny random SD and SD3 pipelines are saved in the test, trained for one step with LoRA (DDPO on the UNet,
Flow-GRPO on the transformer), and the stock pipeline, given the run's ``final/``, must compute exactly
what the trained policy's denoiser computes. Full fine-tuning leaves the denoiser as a component folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from reference_impls.algorithms import get_method
from reference_impls.models import load_policy
from reference_impls.models.tiny_pipelines import save_tiny_pipeline
from reference_impls.rewards import get_reward
from reference_impls.training import build_config, train

METHOD_BY_KIND = {"sd": "ddpo", "sd3": "flow-grpo"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in ("sd", "sd3")}


def _train_one_step(kind: str, model: Path, out: Path, **overrides) -> torch.nn.Module:
    cls = get_method(METHOD_BY_KIND[kind])
    settings = {"preset": "smoke", "model": str(model), "reward": "jpeg-compressibility", "prompts": "a cat",
                "steps": 1, "batch_size": 2, "minibatch_size": 2, "num_steps": 4, "checkpoint_every": 1,
                "learning_rate": 1e-2, **overrides}
    if kind == "sd":
        settings["inner_epochs"] = 1
    else:
        settings["group_size"] = 2
    config = build_config(cls.config_class, cls.presets, settings)
    policy = load_policy(config.model)
    train(cls(policy=policy, reward=get_reward(config.reward), config=config), out, progress=False)
    return policy.denoiser


def _stock(kind: str, path: Path) -> StableDiffusionPipeline | StableDiffusion3Pipeline:
    if kind == "sd":
        return StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    return StableDiffusion3Pipeline.from_pretrained(str(path), local_files_only=True, text_encoder_3=None,
                                                    tokenizer_3=None)


def _denoise(kind: str, module: torch.nn.Module) -> torch.Tensor:
    """One call on fixed random inputs shaped for the module."""
    generator = torch.Generator().manual_seed(0)
    config = module.config
    x = torch.randn(2, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.tensor([250.0, 750.0])
    with torch.no_grad():
        if kind == "sd":
            text = torch.randn(2, 5, config.cross_attention_dim, generator=generator)
            return module(x, t, encoder_hidden_states=text).sample
        text = torch.randn(2, 5, config.joint_attention_dim, generator=generator)
        pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
        return module(hidden_states=x, timestep=t, encoder_hidden_states=text, pooled_projections=pooled).sample


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_lora_run_loads_into_the_stock_pipeline(kind: str, saved: dict[str, Path], tmp_path: Path) -> None:
    trained = _train_one_step(kind, saved[kind], tmp_path / "run", lora_rank=4, lora_alpha=8)
    lora_file = tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors"
    assert lora_file.is_file()
    pipe = _stock(kind, saved[kind])
    denoiser = pipe.unet if kind == "sd" else pipe.transformer
    base_output = _denoise(kind, denoiser)
    trained.eval()
    expected = _denoise(kind, trained)
    assert not torch.allclose(expected, base_output, atol=1e-6), "one LoRA step at lr 1e-2 should move the output"
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    torch.testing.assert_close(_denoise(kind, denoiser), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_full_fine_tuning_leaves_the_denoiser_folder(kind: str, saved: dict[str, Path], tmp_path: Path) -> None:
    trained = _train_one_step(kind, saved[kind], tmp_path / "run")
    component, model_class = ("unet", UNet2DConditionModel) if kind == "sd" else ("transformer", SD3Transformer2DModel)
    loaded = model_class.from_pretrained(str(tmp_path / "run" / "final" / component))
    trained.eval()
    torch.testing.assert_close(_denoise(kind, loaded), _denoise(kind, trained), atol=0, rtol=0)

