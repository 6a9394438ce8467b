"""Diffusers pipelines as policies: tiny SD / SD3 pipelines saved to disk, loaded as ``--model PATH``.

Checks the user-facing path (``load_policy(folder)``), the trajectory contract (shapes, finite
log-probs, exact recomputation so the PPO ratio is 1), and agreement with the stock ``pipe(...)``
given the same initial latents and schedule.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

from reference_impls.models import GenerativePolicy, load_policy
from reference_impls.models.loading import ModelNotFoundError
from reference_impls.models.pipelines import UnsupportedPipelineError, policy_from_pipeline
from reference_impls.models.tiny_pipelines import build_tiny_sd_pipeline, save_tiny_pipeline
from reference_impls.sampling import SamplerConfig, rollout, transition_log_prob

PROMPTS = ["a red circle", "two blue squares left of a green triangle"]
SAMPLER_BY_KIND = {"sd": "ddim", "sd3": "sde"}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These models are tiny: on a shared 2-core CPU, two torch threads made a 7 ms UNet call take
    20 ms to 2 s (threads waiting on each other while other jobs hold the cores); one is steady."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in ("sd", "sd3")}


@pytest.fixture(scope="module")
def policies(saved: dict[str, Path]) -> dict[str, GenerativePolicy]:
    """Loaded once per module: loading is most of the cost of these tests on a shared CPU."""
    return {kind: load_policy(str(path)) for kind, path in saved.items()}


@pytest.fixture(scope="module")
def stock(saved: dict[str, Path]) -> dict[str, StableDiffusionPipeline | StableDiffusion3Pipeline]:
    """The same folders loaded as plain diffusers pipelines, the reference our sampler must match."""
    return {kind: _stock_pipeline(kind, path) for kind, path in saved.items()}


def _stock_pipeline(kind: str, path: Path) -> StableDiffusionPipeline | StableDiffusion3Pipeline:
    if kind == "sd":
        pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True, safety_checker=None,
                                                       feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(str(path), local_files_only=True, text_encoder_3=None,
                                                        tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_rollout_through_load_policy(policies: dict[str, GenerativePolicy], stock: dict, kind: str) -> None:
    policy = policies[kind]
    assert policy.prediction == ("epsilon" if kind == "sd" else "velocity")
    assert policy.latent_shape == (4, 8, 8)
    config = SamplerConfig(SAMPLER_BY_KIND[kind], num_steps=3)

    trajectory = rollout(policy, PROMPTS, config, torch.Generator().manual_seed(0))
    assert trajectory.states.shape == (2, 4, 4, 8, 8)
    assert trajectory.log_probs.shape == (2, 3)
    assert torch.isfinite(trajectory.log_probs).all() and (trajectory.log_probs != 0).all()

    # Images: in [0, 1] and of the size the stock pipeline produces by default.
    stock_images = stock[kind](PROMPTS, num_inference_steps=1, guidance_scale=1.0, output_type="pt").images
    assert trajectory.images.shape == stock_images.shape == (2, 3, 16, 16)
    assert trajectory.images.min() >= 0 and trajectory.images.max() <= 1

    again = rollout(policy, PROMPTS, config, torch.Generator().manual_seed(0))
    assert torch.equal(again.states, trajectory.states)
    assert torch.equal(again.log_probs, trajectory.log_probs)
    assert torch.equal(again.images, trajectory.images)

    # Recomputing stored transitions under unchanged weights gives the recorded values exactly,
    # step by step and with per-sample steps (DDPO shuffles the timesteps of each sample).
    with torch.no_grad():
        for step in range(config.num_steps):
            recomputed = transition_log_prob(policy, trajectory, step).log_prob
            assert torch.equal(recomputed, trajectory.log_probs[:, step])
        index = torch.tensor([2, 0])
        recomputed = transition_log_prob(policy, trajectory, index).log_prob
        ratio = torch.exp(recomputed - trajectory.log_probs[torch.arange(2), index])
        assert torch.equal(ratio, torch.ones(2))


@pytest.mark.parametrize(("eta", "guidance_scale"), [(0.0, 1.0), (1.0, 1.0), (0.0, 3.0)])
def test_ddim_matches_stock_pipeline(policies: dict[str, GenerativePolicy], stock: dict, eta: float,
                                     guidance_scale: float) -> None:
    """Same initial latents, same trailing DDIM timesteps, same generator for eta > 0: the results coincide.

    4 steps because 4 divides 1000: make_schedule steps to the next timestep of the list while diffusers'
    DDIM steps to t - 1000 // steps; the two differ by one timestep when the stride is fractional."""
    policy = policies["sd"]
    # A new pipeline over the same loaded modules, so the shared fixture keeps its own scheduler.
    scheduler = DDIMScheduler.from_config(stock["sd"].scheduler.config, timestep_spacing="trailing",
                                          set_alpha_to_one=False, clip_sample=False)
    components = {**stock["sd"].components, "scheduler": scheduler}
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    config = SamplerConfig("ddim", num_steps=4, eta=eta, guidance_scale=guidance_scale)

    ours = rollout(policy, PROMPTS, config, torch.Generator().manual_seed(7), noise=latents)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=guidance_scale, eta=eta,
                   latents=latents.clone(), generator=torch.Generator().manual_seed(7), output_type="latent")
    assert torch.equal(ours.schedule.model_timesteps.long(), pipe.scheduler.timesteps)
    torch.testing.assert_close(ours.states[:, -1], theirs.images, rtol=1e-5, atol=1e-5)
    if eta == 0.0 and guidance_scale == 1.0:
        images = pipe(PROMPTS, num_inference_steps=4, guidance_scale=1.0, eta=0.0, latents=latents.clone(),
                       output_type="pt").images
        torch.testing.assert_close(ours.images, images, rtol=1e-5, atol=1e-5)


def test_sd3_ode_matches_stock_pipeline(policies: dict[str, GenerativePolicy], stock: dict) -> None:
    """The stock FlowMatchEuler schedule ends at shift(1/1000) before 0, ours spaces sigmas evenly to 0
    (as Flow-GRPO); passing our unshifted sigmas to pipe(sigmas=...) makes the two walks identical."""
    policy, pipe = policies["sd3"], stock["sd3"]
    latents = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    ours = rollout(policy, PROMPTS, SamplerConfig("ode", num_steps=4), noise=latents)
    sigmas = torch.linspace(1.0, 0.0, 5)[:-1].tolist()
    theirs = pipe(PROMPTS, num_inference_steps=4, sigmas=sigmas, guidance_scale=1.0, latents=latents.clone(),
                   output_type="pt").images
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], ours.schedule.sigma)
    torch.testing.assert_close(ours.images, theirs, rtol=1e-5, atol=1e-5)


def test_decode_is_differentiable(policies: dict[str, GenerativePolicy]) -> None:
    policy = policies["sd3"]
    latents = (0.1 * torch.randn(1, *policy.latent_shape)).requires_grad_(True)
    policy.decode(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_folder_without_model_files_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="model_index.json"):
        load_policy(str(tmp_path))


def test_unsupported_pipeline_class_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}), encoding="utf-8")
    expected = "CogVideoXPipeline.*supported: StableDiffusionPipeline, StableDiffusion3Pipeline.*FluxPipeline"
    with pytest.raises(UnsupportedPipelineError, match=expected):
        load_policy(str(tmp_path))
    with pytest.raises(UnsupportedPipelineError, match="supported: StableDiffusionPipeline"):
        policy_from_pipeline(object())


def test_v_prediction_checkpoint_is_rejected(saved: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(saved["sd"], tmp_path / "sd-v")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["prediction_type"] = "v_prediction"
    config_file.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UnsupportedPipelineError, match="v_prediction"):
        load_policy(str(folder))


def test_in_memory_pipeline_shares_modules() -> None:
    pipe = build_tiny_sd_pipeline(seed=1)
    policy = policy_from_pipeline(pipe)
    assert policy.denoiser is pipe.unet
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    assert all(p.requires_grad for p in policy.trainable_parameters())
    # A frozen reference copy (KL and DPO terms) is evaluated through the same policy.
    x, t = torch.randn(2, *policy.latent_shape), torch.tensor([999.0, 999.0])
    with torch.no_grad():
        cond = policy.encode_text(PROMPTS)
        reference = policy.with_denoiser(copy.deepcopy(pipe.unet))
        torch.testing.assert_close(reference.predict(x, t, cond), policy.predict(x, t, cond))
        next(reference.denoiser.parameters()).add_(1.0)
        assert not torch.allclose(reference.predict(x, t, cond), policy.predict(x, t, cond))


# -- FLUX.1: packed latents, rotary ids, distilled guidance, resolution-dependent shift ---------------
@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline("flux", tmp_path_factory.mktemp("flux") / "pipe")


def test_flux_log_probs_recompute_exactly_and_the_ode_matches_the_stock_pipeline(flux: Path) -> None:
    import math

    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    policy = load_policy(str(flux))
    assert policy.latent_shape == (4, 8, 8) and policy.prediction == "velocity"
    # 16x16 px -> 8x8 latents -> 16 packed tokens; FLUX's exp(mu) shift for that count becomes the fixed shift
    assert policy.scheduler.config.shift == pytest.approx(math.exp(calculate_shift(16)))
    trajectory = rollout(policy, PROMPTS, SamplerConfig("sde", num_steps=3), torch.Generator().manual_seed(0))
    assert trajectory.images.shape == (2, 3, 16, 16)
    with torch.no_grad():
        for step in range(3):
            assert torch.equal(transition_log_prob(policy, trajectory, step).log_prob, trajectory.log_probs[:, step])
    pipe = FluxPipeline.from_pretrained(str(flux), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    ours = rollout(policy, ["a red circle"], SamplerConfig("ode", num_steps=4), noise=noise).states[:, -1]
    # pipe(...) shifts the sigmas it is given with its dynamic shift; ours are the same shifted values
    packed = pipe._pack_latents(noise.clone(), 1, 4, 8, 8)
    latents = pipe("a red circle", height=16, width=16, num_inference_steps=4, guidance_scale=3.5,
                   sigmas=torch.linspace(1.0, 0.0, 5)[:-1].numpy(), latents=packed, output_type="latent",
                   max_sequence_length=256).images
    torch.testing.assert_close(ours, pipe._unpack_latents(latents, 16, 16, pipe.vae_scale_factor), atol=1e-5, rtol=1e-5)


def test_flow_grpo_trains_flux_with_lora_that_the_stock_pipeline_loads(flux: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from reference_impls.algorithms import get_method
    from reference_impls.rewards import get_reward
    from reference_impls.training import build_config, train

    cls = get_method("flow-grpo")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(flux), "reward": "jpeg-compressibility", "prompts": "a cat", "steps": 2,
        "batch_size": 4, "group_size": 2, "minibatch_size": 4, "num_steps": 2, "checkpoint_every": 1,
        "lora_rank": 4})
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config),
                    tmp_path / "run", progress=False)
    assert records[1]["ratio_first"] == pytest.approx(1.0)
    pipe = FluxPipeline.from_pretrained(str(flux), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())
