"""Adapters from diffusers pipelines to :class:`GenerativePolicy`, so our samplers can drive them.

The pipeline classes below are supported, loaded from local folders only (``save_pretrained`` output; never a hub id):

* ``StableDiffusionPipeline``: a UNet that predicts the noise (epsilon) in the VAE's latent space.
  The pipeline's scheduler config (PNDM, DDIM, ...) is converted to a ``DDIMScheduler`` with trailing
  spacing and ``set_alpha_to_one=False``: the scheduler our ``ddim``/``ddpm`` samplers reproduce; only
  its ``alphas_cumprod`` and ``num_train_timesteps`` are read by ``make_schedule``.
* ``StableDiffusion3Pipeline``: an MMDiT transformer that predicts the flow velocity (noise - x0);
  the ``FlowMatchEulerDiscreteScheduler``'s ``shift`` sets the sigma schedule and, as in diffusers,
  the transformer is fed ``timestep = sigma * num_train_timesteps``.
* ``TextToVideoSDPipeline`` (ModelScope text-to-video): a ``UNet3DConditionModel`` that predicts the
  noise of (C, F, h, w) video latents, with SD's text encoder and a per-frame VAE; its scheduler is
  converted like SD's. The policy samples ``frames`` frames (16, the pipeline's default).
* ``WanPipeline`` (Wan 2.1 text-to-video): a ``WanTransformer3DModel`` that predicts the flow velocity of
  (C, F', h, w) latents of a causal 3D VAE (F' = (F - 1) / 4 + 1), with a UMT5 text encoder. Its scheduler
  (UniPC with flow sigmas, or flow-matching Euler) becomes a ``FlowMatchEulerDiscreteScheduler`` with the
  same ``shift``, so the flow samplers (ODE/SDE) drive it like SD3. The clip size is Wan's default
  (81 frames of 480x832) unless the folder holds ``rlvg_video.json`` with ``frames``, ``height``, ``width``.
* ``FluxPipeline`` (FLUX.1): a ``FluxTransformer2DModel`` that predicts the flow velocity of 2x2-packed
  latents with rotary positions. The policy's state is the unpacked (C, h, w) latent; every call packs it,
  adds the image and text position ids and the distilled guidance (``guidance_embeds``: FLUX.1-dev's 3.5 by
  default), and unpacks the velocity, as ``pipe(...)`` does. FLUX shifts its sigmas by the image's token
  count (``use_dynamic_shifting``): at a fixed size that is SD3's fixed shift with ``shift = exp(mu)``, which
  is what the policy's scheduler gets. The image is 1024x1024 unless ``rlvg_image.json`` holds ``height``,
  ``width`` (and ``guidance``).

Prompts are encoded with the pipeline's own ``encode_prompt`` (same tokenisation, ``clip_skip`` and
concatenation rules as ``pipe(...)``); the text encoders and the VAE are frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reference_impls.models.policy import Conditioning, GenerativePolicy

SUPPORTED_PIPELINES: tuple[str, ...] = ("StableDiffusionPipeline", "StableDiffusion3Pipeline", "TextToVideoSDPipeline",
                                         "WanPipeline", "FluxPipeline")
DENOISER_COMPONENT: dict[str, str] = {"StableDiffusionPipeline": "unet", "TextToVideoSDPipeline": "unet",
                                      "StableDiffusion3Pipeline": "transformer", "WanPipeline": "transformer",
                                      "FluxPipeline": "transformer"}
"""The pipeline component each supported class trains (the name of its LoRA layers and of its folder)."""
VIDEO_FRAMES = 16
"""Frames of a text-to-video pipeline's samples (``TextToVideoSDPipeline.__call__``'s default)."""
WAN_CLIP = {"frames": 81, "height": 480, "width": 832}
"""``WanPipeline.__call__``'s default clip; a folder's ``rlvg_video.json`` overrides it (small test pipelines)."""
VIDEO_SIZE_FILE = "rlvg_video.json"
FLUX_IMAGE = {"height": 1024, "width": 1024, "guidance": 3.5}
"""``FluxPipeline.__call__``'s defaults (FLUX.1-dev); a folder's ``rlvg_image.json`` overrides them."""
IMAGE_SIZE_FILE = "rlvg_image.json"
UNSUPPORTED_FLOW_OPTIONS: tuple[str, ...] = (
    "use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "invert_sigmas",
)
"""FlowMatchEulerDiscreteScheduler options that change the sigmas in ways ``make_schedule`` ignores."""


class UnsupportedPipelineError(ValueError):
    """A pipeline folder (or object) the adapters cannot drive; the message says what is supported."""


class PipelineTextEncoder(nn.Module):
    """The frozen text side of a pipeline: prompts -> :class:`Conditioning`.

    Holding the text encoders as submodules lets ``GenerativePolicy.to(device)`` move them; encoding
    itself delegates to ``pipe.encode_prompt`` so prompts are embedded exactly as ``pipe(...)`` does.
    """

    def __init__(self, pipe: Any, encoders: list[nn.Module], max_sequence_length: int = 256) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(encoders)
        # A plain attribute, not a submodule: the pipeline is not an nn.Module.
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.pipeline_class = type(pipe).__name__

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    def forward(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        if self.pipeline_class == "StableDiffusion3Pipeline":
            hidden, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
            )
            return Conditioning(hidden, pooled)
        if self.pipeline_class == "FluxPipeline":
            hidden, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
            return Conditioning(hidden, pooled)
        if self.pipeline_class == "WanPipeline":
            hidden, _ = self.pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length, device=self.device)
            return Conditioning(hidden)
        hidden, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return Conditioning(hidden)


def _freeze(module: nn.Module | None) -> None:
    if module is not None:
        module.requires_grad_(False)
        module.eval()


def _latent_shape(channels: int, sample_size: int | list[int] | tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of the latents ``pipe(...)`` samples by default: the denoiser's ``sample_size``
    is already in latent pixels (image side / VAE scale factor)."""
    if isinstance(sample_size, int):
        return (int(channels), sample_size, sample_size)
    height, width = sample_size
    return (int(channels), int(height), int(width))


def make_vae_decoder(vae: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latents -> RGB in [0, 1], differentiable (reward backprop goes through it).

    Undoes the latent normalisation the pipelines apply (``z / scaling_factor + shift_factor``;
    SD 1.x has no shift), decodes, and maps the VAE's [-1, 1] output to [0, 1].
    """
    scaling = float(vae.config.scaling_factor)
    shift = vae.config.get("shift_factor", None)
    shift = 0.0 if shift is None else float(shift)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        # GenerativePolicy.to() moves only the denoiser and text encoders: follow the latents here.
        if next(vae.parameters()).device != latents.device:
            vae.to(latents.device)
        if latents.dim() == 5:  # video latents (B, C, F, h, w): the VAE decodes every frame on its own
            batch, channels, frames = latents.shape[:3]
            folded = latents.transpose(1, 2).reshape(batch * frames, channels, *latents.shape[3:])
            frames_rgb = decode(folded)
            return frames_rgb.view(batch, frames, *frames_rgb.shape[1:]).transpose(1, 2)
        z = latents / scaling + shift
        image = vae.decode(z).sample
        return ((image + 1) / 2).clamp(0, 1)

    return decode


def make_wan_vae_decoder(vae: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wan latents (B, C, F', h, w) -> RGB clips (B, 3, F, H, W) in [0, 1], differentiable.

    Wan normalises each latent channel by the VAE's ``latents_mean`` / ``latents_std``; the pipeline undoes
    it before decoding (``z = latents * std + mean``), and so do we.
    """
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def decode(latents: torch.Tensor) -> torch.Tensor:
        if next(vae.parameters()).device != latents.device:
            vae.to(latents.device)
        z = latents * std.to(latents) + mean.to(latents)
        return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)

    return decode


def _sd_scheduler(scheduler_config: Any) -> Any:
    """The SD pipeline's scheduler config as a DDIM scheduler with the betas it was trained with.

    Rejects what our epsilon samplers cannot drive: v-prediction (SD 2.x 768) or x0 prediction.
    """
    from diffusers import DDIMScheduler

    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UnsupportedPipelineError(
            f"this Stable Diffusion checkpoint's scheduler has prediction_type={prediction!r}; the samplers "
            "support only epsilon-prediction UNets (v-prediction models such as SD 2.x 768 are not supported)"
        )
    # Trailing spacing and alpha_bar[0] as the final target are what make_schedule implements; a
    # scheduler saying so keeps the policy self-describing (and DDIM clip_sample must be off for SD).
    return DDIMScheduler.from_config(
        scheduler_config, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False,
        thresholding=False, prediction_type="epsilon",
    )


def _sd3_scheduler(scheduler_config: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    enabled = [name for name in UNSUPPORTED_FLOW_OPTIONS if scheduler_config.get(name, False)]
    if enabled:
        raise UnsupportedPipelineError(
            f"the flow-matching scheduler enables {', '.join(enabled)}; the samplers support only a fixed "
            "`shift` (as Stable Diffusion 3 uses): set these options to false in scheduler_config.json"
        )
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)


def _sd_policy(pipe: Any, name: str) -> GenerativePolicy:
    unet = pipe.unet
    scheduler = _sd_scheduler(pipe.scheduler.config)
    conditioner = PipelineTextEncoder(pipe, [pipe.text_encoder])

    def call_unet(module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return module(x, t, encoder_hidden_states=cond.hidden_states).sample

    return GenerativePolicy(
        name=name,
        denoiser=unet,
        prediction="epsilon",
        scheduler=scheduler,
        encode_text=conditioner,
        call_denoiser=call_unet,
        latent_shape=_latent_shape(unet.config.in_channels, unet.config.sample_size),
        decode=make_vae_decoder(pipe.vae),
        text_encoder=conditioner,
    )


def _t2v_policy(pipe: Any, name: str, frames: int) -> GenerativePolicy:
    policy = _sd_policy(pipe, name)  # same text side, scheduler conversion and UNet call signature
    channels, height, width = policy.latent_shape
    policy.latent_shape = (channels, frames, height, width)  # type: ignore[assignment]
    return policy


def _sd3_policy(pipe: Any, name: str, max_sequence_length: int) -> GenerativePolicy:
    transformer = pipe.transformer
    scheduler = _sd3_scheduler(pipe.scheduler.config)
    encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]
    conditioner = PipelineTextEncoder(pipe, encoders, max_sequence_length=max_sequence_length)

    def call_transformer(module: nn.Module, x: torch.Tensor, t: torch.Tensor,
                         cond: Conditioning) -> torch.Tensor:
        # diffusers' SD3 pipeline feeds timestep = sigma * 1000, which is make_schedule's model timestep.
        return module(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden_states,
                      pooled_projections=cond.pooled).sample

    return GenerativePolicy(
        name=name,
        denoiser=transformer,
        prediction="velocity",
        scheduler=scheduler,
        encode_text=conditioner,
        call_denoiser=call_transformer,
        latent_shape=_latent_shape(transformer.config.in_channels, transformer.config.sample_size),
        decode=make_vae_decoder(pipe.vae),
        text_encoder=conditioner,
    )


def _wan_scheduler(scheduler_config: Any) -> Any:
    """Wan ships UniPC with flow sigmas (``flow_shift``); the same sigmas come from flow-matching Euler's
    ``shift``, which is what our flow samplers read."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if "flow_shift" in scheduler_config:
        if not scheduler_config.get("use_flow_sigmas", False):
            raise UnsupportedPipelineError("a WanPipeline scheduler without flow sigmas is not a flow schedule the "
                                           "samplers can follow; use the flow-matching scheduler Wan ships with")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler_config["num_train_timesteps"],
                                               shift=float(scheduler_config["flow_shift"]))
    return _sd3_scheduler(scheduler_config)


def _wan_policy(pipe: Any, name: str, clip: dict[str, int], max_sequence_length: int) -> GenerativePolicy:
    transformer = pipe.transformer
    conditioner = PipelineTextEncoder(pipe, [pipe.text_encoder], max_sequence_length=max_sequence_length)

    def call_transformer(module: nn.Module, x: torch.Tensor, t: torch.Tensor,
                         cond: Conditioning) -> torch.Tensor:
        # As in diffusers' WanPipeline: timestep = sigma * 1000, the output is the velocity (noise - x0).
        return module(hidden_states=x, timestep=t, encoder_hidden_states=cond.hidden_states, return_dict=False)[0]

    frames = (clip["frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    spatial = pipe.vae_scale_factor_spatial
    return GenerativePolicy(
        name=name,
        denoiser=transformer,
        prediction="velocity",
        scheduler=_wan_scheduler(pipe.scheduler.config),
        encode_text=conditioner,
        call_denoiser=call_transformer,
        latent_shape=(int(transformer.config.in_channels), frames, clip["height"] // spatial, clip["width"] // spatial),
        decode=make_wan_vae_decoder(pipe.vae),
        text_encoder=conditioner,
    )


def _flux_scheduler(scheduler_config: Any, image_tokens: int) -> Any:
    """FLUX's resolution-dependent shift, fixed for the policy's image size: the exponential time shift
    exp(mu) / (exp(mu) + 1/s - 1) is SD3's shift k s / (1 + (k - 1) s) with k = exp(mu)."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if not scheduler_config.get("use_dynamic_shifting", False):
        return _sd3_scheduler(scheduler_config)  # FLUX.1-schnell: a fixed shift already
    if scheduler_config.get("time_shift_type", "exponential") != "exponential":
        raise UnsupportedPipelineError("a FLUX scheduler with a linear time shift is not supported")
    mu = calculate_shift(image_tokens, scheduler_config.get("base_image_seq_len", 256),
                         scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                         scheduler_config.get("max_shift", 1.15))
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=scheduler_config["num_train_timesteps"],
                                           shift=math.exp(mu))


def _flux_policy(pipe: Any, name: str, image: dict[str, float], max_sequence_length: int) -> GenerativePolicy:
    transformer = pipe.transformer
    conditioner = PipelineTextEncoder(pipe, [pipe.text_encoder, pipe.text_encoder_2],
                                      max_sequence_length=max_sequence_length)
    height, width = (2 * (int(image[key]) // (pipe.vae_scale_factor * 2)) for key in ("height", "width"))
    channels = transformer.config.in_channels // 4
    guidance_value = float(image["guidance"])

    def call_transformer(module: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch = x.shape[0]
        packed = pipe._pack_latents(x, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, x.device, x.dtype)
        text_ids = torch.zeros(cond.hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = (torch.full((batch,), guidance_value, device=x.device, dtype=torch.float32)
                    if module.config.guidance_embeds else None)
        # As in FluxPipeline: the transformer takes sigma = timestep / 1000 and scales it back itself.
        velocity = module(hidden_states=packed, timestep=t.expand(batch).to(x.dtype) / 1000, guidance=guidance,
                          pooled_projections=cond.pooled, encoder_hidden_states=cond.hidden_states,
                          txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return pipe._unpack_latents(velocity, height * pipe.vae_scale_factor, width * pipe.vae_scale_factor,
                                    pipe.vae_scale_factor)

    return GenerativePolicy(
        name=name,
        denoiser=transformer,
        prediction="velocity",
        scheduler=_flux_scheduler(pipe.scheduler.config, (height // 2) * (width // 2)),
        encode_text=conditioner,
        call_denoiser=call_transformer,
        latent_shape=(int(channels), height, width),
        decode=make_vae_decoder(pipe.vae),
        text_encoder=conditioner,
    )


def policy_from_pipeline(pipe: Any, name: str | None = None, max_sequence_length: int = 256,
                         frames: int = VIDEO_FRAMES, clip: dict[str, int] | None = None,
                         image: dict[str, float] | None = None) -> GenerativePolicy:
    """Wrap an in-memory ``StableDiffusionPipeline``, ``StableDiffusion3Pipeline`` or ``TextToVideoSDPipeline``.

    The policy shares the pipeline's modules (training the policy trains ``pipe.unet`` /
    ``pipe.transformer``). ``max_sequence_length`` is SD3's T5 length, as in ``pipe(...)``; ``frames`` the
    clip length of a text-to-video pipeline; ``clip`` Wan's frames, height and width (``WAN_CLIP`` if None);
    ``image`` FLUX's height, width and distilled guidance (``FLUX_IMAGE`` if None).
    """
    class_name = type(pipe).__name__
    name = name or class_name
    if class_name == "StableDiffusionPipeline":
        policy = _sd_policy(pipe, name)
    elif class_name == "TextToVideoSDPipeline":
        policy = _t2v_policy(pipe, name, frames)
    elif class_name == "StableDiffusion3Pipeline":
        policy = _sd3_policy(pipe, name, max_sequence_length)
    elif class_name == "WanPipeline":
        if getattr(pipe, "transformer_2", None) is not None:
            raise UnsupportedPipelineError("Wan 2.2's two-expert pipeline (transformer_2) is not supported: "
                                           "save a single-transformer WanPipeline (Wan 2.1)")
        policy = _wan_policy(pipe, name, clip or WAN_CLIP, max_sequence_length)
    elif class_name == "FluxPipeline":
        policy = _flux_policy(pipe, name, image or FLUX_IMAGE, max_sequence_length)
    else:
        raise UnsupportedPipelineError(
            f"unsupported pipeline class {class_name!r}; supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    policy.pipeline_class = class_name
    _freeze(policy.text_encoder)
    _freeze(pipe.vae)
    policy.denoiser.eval()  # no dropout while sampling; trainers switch modes themselves
    return policy


def _absent_components(index: dict) -> dict[str, None]:
    """Components saved as ``[null, null]`` (e.g. SD3 without T5) must be passed as None explicitly:
    diffusers only fills in None for the optional ones."""
    return {key: None for key, value in index.items()
            if not key.startswith("_") and (value is None or (isinstance(value, list) and value[0] is None))}


def policy_from_pipeline_dir(directory: Path, index: dict, device: str = "cpu") -> GenerativePolicy:
    """Load a pipeline saved with ``save_pretrained`` (``index`` = its model_index.json) as a policy."""
    directory = Path(directory)
    class_name = index.get("_class_name")
    if class_name not in SUPPORTED_PIPELINES:
        raise UnsupportedPipelineError(
            f"{directory / 'model_index.json'} names pipeline class {class_name!r}, which is not supported; "
            f"supported: {', '.join(SUPPORTED_PIPELINES)}"
        )
    import diffusers

    pipeline_cls = getattr(diffusers, class_name)
    kwargs: dict[str, Any] = _absent_components(index)
    if class_name == "StableDiffusionPipeline":
        # The safety checker is never used by the samplers: don't load its weights.
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_cls.from_pretrained(str(directory), local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    clip = None
    if (directory / VIDEO_SIZE_FILE).exists():
        import json

        clip = {**WAN_CLIP, **json.loads((directory / VIDEO_SIZE_FILE).read_text(encoding="utf-8"))}
    image = None
    if (directory / IMAGE_SIZE_FILE).exists():
        import json

        image = {**FLUX_IMAGE, **json.loads((directory / IMAGE_SIZE_FILE).read_text(encoding="utf-8"))}
    policy = policy_from_pipeline(pipe, name=str(directory), clip=clip, image=image)
    pipe.vae.to(device)
    return policy.to(device)
