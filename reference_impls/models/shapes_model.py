"""The tiny ShapeWorld text-to-image models: build, save and load as a folder of safetensors.

Layout of a checkpoint folder (every weight file is safetensors; nothing is unpickled)::

    rlvg_model.json      kind (diffusion|flow), prediction, world, sizes
    unet/                diffusers UNet2DConditionModel.save_pretrained
    text_encoder/        transformers CLIPTextModel or T5EncoderModel .save_pretrained (config.text_encoder)
    tokenizer/vocab.json the word-level vocabulary
    scheduler/           diffusers scheduler config
    provenance.json      how it was made (command, seed, commit, minutes, evaluator scores)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, T5EncoderModel

from reference_impls.models.components import (
    TinyModelConfig,
    build_scheduler,
    build_text_encoder,
    build_unet,
    coordinate_maps,
)
from reference_impls.models.policy import Conditioning, GenerativePolicy
from reference_impls.models.tokenizer import WordTokenizer
from reference_impls.models.video_model import InflatedVideoUNet

MODEL_FILE = "rlvg_model.json"


def shapes_vocabulary() -> list[str]:
    """Every word of the ShapeWorld grammar, sorted (the tokenizer's closed vocabulary)."""
    from reference_impls.worlds import all_prompts

    words = {word for prompt in all_prompts() for word in WordTokenizer(words=[]).split(prompt)}
    return sorted(words)


def motion_vocabulary() -> list[str]:
    """ShapeWorld's words and MotionWorld's, sorted: a video model inflated from an image model keeps every
    word embedding it had and learns the new ones (moving, up, down, slowly, quickly)."""
    from reference_impls.worlds.motion import all_motion_prompts

    words = {word for prompt in all_motion_prompts() for word in WordTokenizer(words=[]).split(prompt)}
    return sorted(words | set(shapes_vocabulary()))


def solid_vocabulary() -> list[str]:
    """ShapeWorld's words and SolidWorld's (cube, sphere, cone, cylinder, on, top, of, next, to), sorted: the
    multi-view model inflated from the image model keeps the colour and size words it knows."""
    from reference_impls.worlds.solid import all_solid_prompts

    words = {word for prompt in all_solid_prompts() for word in WordTokenizer(words=[]).split(prompt)}
    return sorted(words | set(shapes_vocabulary()))


AXIS_KEY = {"motion": "frames", "solid": "views"}
"""The checkpoint metadata key of the extra axis of each world with 5-D samples (clips' frames, the views)."""
VOCABULARIES = {"motion": motion_vocabulary, "solid": solid_vocabulary}


class TextConditioner(torch.nn.Module):
    """Tokenizer + frozen-or-trainable text encoder (CLIP or T5) -> cross-attention features."""

    def __init__(self, tokenizer: WordTokenizer, text_encoder: CLIPTextModel | T5EncoderModel) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    def forward(self, prompts: list[str]) -> Conditioning:
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(prompts)
        if isinstance(self.text_encoder, T5EncoderModel):
            # Bidirectional: padding is masked out so a word's state does not depend on the prompt's length.
            output = self.text_encoder(input_ids=tokens["input_ids"].to(device),
                                       attention_mask=tokens["attention_mask"].to(device))
        else:  # the shipped CLIP encoders were trained without a padding mask; keep them as they were made
            output = self.text_encoder(input_ids=tokens["input_ids"].to(device))
        return Conditioning(output.last_hidden_state)


def _vp_epsilon_from_flow(raw_output, module, x, t, cond, alphas_cumprod):  # noqa: ANN001, ANN202
    """Noise estimate of a VP diffusion state from a rectified-flow velocity network, exactly.

    A VP state x_t = a x0 + b eps (a = sqrt(abar_t), b = sqrt(1 - abar_t)) divided by (a + b) is the flow
    state x_s = (1 - s) x0 + s eps with s = b / (a + b), and the same eps. Since eps = x_s + (1 - s) v for
    v = eps - x0, the network's velocity at (x_s, s) gives eps_hat = x_s + (1 - s) v_hat.
    """
    index = (t.round() if t.is_floating_point() else t).long().expand(x.shape[0])
    abar = alphas_cumprod.to(x.device, x.dtype)[index].view(-1, *([1] * (x.dim() - 1)))
    a, b = abar.sqrt(), (1 - abar).sqrt()
    s = b / (a + b)
    x_s = x / (a + b)
    velocity = raw_output(module, x_s, s.flatten() * 1000, cond)
    return x_s + (1 - s) * velocity


def _make_policy(
    name: str,
    kind: str,
    unet: UNet2DConditionModel,
    conditioner: TextConditioner,
    scheduler: object,
    config: TinyModelConfig,
    network: str = "native",
    frames: int | None = None,
    world: str = "shapes",
) -> GenerativePolicy:
    """``frames``: None for the ShapeWorld image model, else the length of the extra axis of a 5-D world's
    samples (MotionWorld's frames, SolidWorld's views)."""
    def raw_output(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if config.coordinate_channels:
            x = torch.cat([x, coordinate_maps(x)], dim=1)
        return module(x, t, encoder_hidden_states=cond.hidden_states).sample

    v_prediction = getattr(scheduler.config, "prediction_type", "epsilon") == "v_prediction"

    def call_unet(module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if kind == "diffusion" and network == "flow-velocity":
            return _vp_epsilon_from_flow(raw_output, module, x, t, cond, scheduler.alphas_cumprod)
        output = raw_output(module, x, t, cond)
        if kind == "diffusion" and v_prediction:
            # eps = sqrt(a_t) v + sqrt(1 - a_t) x_t: samplers work in the epsilon parametrisation
            index = (t.round() if t.is_floating_point() else t).long().expand(x.shape[0])
            a = scheduler.alphas_cumprod.to(x.device, x.dtype)[index].view(-1, *([1] * (x.dim() - 1)))
            return a.sqrt() * output + (1 - a).sqrt() * x
        return output

    call_unet.raw = raw_output  # type: ignore[attr-defined]  # the network's own output (pretraining)

    return GenerativePolicy(
        name=name,
        denoiser=unet,
        prediction="velocity" if kind == "flow" else "epsilon",
        scheduler=scheduler,
        encode_text=conditioner,
        call_denoiser=call_unet,
        latent_shape=(3, config.image_size, config.image_size) if frames is None
        else (3, frames, config.image_size, config.image_size),
        text_encoder=conditioner,
        world=world,
    )


def build_shapes_policy(kind: str, config: TinyModelConfig | None = None, seed: int = 0) -> GenerativePolicy:
    """A randomly initialised ShapeWorld model (the start of pretraining, and of fast unit tests)."""
    config = config or TinyModelConfig()
    torch.manual_seed(seed)
    tokenizer = WordTokenizer(words=shapes_vocabulary(), model_max_length=config.max_tokens)
    unet = build_unet(config)
    conditioner = TextConditioner(tokenizer, build_text_encoder(config, tokenizer))
    return _make_policy(f"random-shapes-{kind}", kind, unet, conditioner, build_scheduler(kind), config)


def save_shapes_policy(policy: GenerativePolicy, directory: str | Path, config: TinyModelConfig) -> None:
    """Write the checkpoint folder; callers wanting atomicity write to a temp folder and rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    conditioner = policy.text_encoder
    assert isinstance(conditioner, TextConditioner)
    policy.denoiser.save_pretrained(directory / "unet", safe_serialization=True)
    conditioner.text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    conditioner.tokenizer.save_pretrained(directory / "tokenizer")
    policy.scheduler.save_pretrained(directory / "scheduler")
    meta = {"format": 1, "kind": policy.kind, "prediction": policy.prediction, "world": policy.world,
            "config": asdict(config)}
    if policy.world in AXIS_KEY:
        meta[AXIS_KEY[policy.world]] = int(policy.latent_shape[1])
    (directory / MODEL_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_text_encoder(folder: Path, kind: str) -> CLIPTextModel | T5EncoderModel:
    """A saved text encoder of ``kind`` (clip or t5), from safetensors."""
    cls = T5EncoderModel if kind == "t5" else CLIPTextModel
    return cls.from_pretrained(folder, use_safetensors=True)


def load_shapes_policy(directory: str | Path, name: str | None = None) -> GenerativePolicy:
    directory = Path(directory)
    meta = json.loads((directory / MODEL_FILE).read_text(encoding="utf-8"))
    raw = dict(meta["config"])
    raw["block_out_channels"] = tuple(raw["block_out_channels"])
    config = TinyModelConfig(**raw)
    kind = meta["kind"]
    world = meta.get("world", "shapes")
    frames = meta.get(AXIS_KEY[world]) if world in AXIS_KEY else None
    unet_class = UNet2DConditionModel if frames is None else InflatedVideoUNet
    unet = unet_class.from_pretrained(directory / "unet", use_safetensors=True, low_cpu_mem_usage=False)
    text_encoder = load_text_encoder(directory / "text_encoder", config.text_encoder)
    tokenizer = WordTokenizer.from_pretrained(directory / "tokenizer")
    scheduler_cls = FlowMatchEulerDiscreteScheduler if kind == "flow" else DDPMScheduler
    scheduler = scheduler_cls.from_pretrained(directory / "scheduler")
    policy = _make_policy(name or str(directory), kind, unet, TextConditioner(tokenizer, text_encoder),
                          scheduler, config, network=meta.get("network", "native"), frames=frames, world=world)
    policy.text_encoder.requires_grad_(False)
    policy.text_encoder.eval()
    unet.eval()
    return policy


def derive_vp_diffusion_from_flow(flow_dir: str | Path, out_dir: str | Path) -> dict:
    """Write a ``diffusion`` checkpoint whose epsilon model is ``flow_dir``'s network, reparametrised.

    The weights are copied; the new folder has a cosine DDPM schedule (epsilon parametrisation, x0
    clipping) and ``network: flow-velocity`` so :func:`load_shapes_policy` applies the exact conversion
    of :func:`_vp_epsilon_from_flow`. Fine-tuning the result changes only its own copy.
    """
    import shutil

    from reference_impls.models.components import build_scheduler

    flow_dir, out_dir = Path(flow_dir), Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    shutil.copytree(flow_dir, partial, ignore=shutil.ignore_patterns("scheduler", "provenance.json"))
    scheduler = build_scheduler("diffusion")
    scheduler.register_to_config(prediction_type="epsilon")
    scheduler.save_pretrained(partial / "scheduler")
    meta = json.loads((partial / MODEL_FILE).read_text(encoding="utf-8"))
    meta.update({"kind": "diffusion", "prediction": "epsilon", "network": "flow-velocity",
                 "derived_from": str(flow_dir)})
    (partial / MODEL_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    partial.rename(out_dir)
    return meta


def inflate_to_motion_policy(image_policy: GenerativePolicy, frames: int, config: TinyModelConfig,
                             seed: int = 0, world: str = "motion") -> GenerativePolicy:
    """A 5-D model (MotionWorld clips, or SolidWorld's views) that starts as ``image_policy`` applied to every
    frame or view.

    The denoiser is inflated with zero-initialised attention along the extra axis (:mod:`video_model`):
    over frames for a video model, across the four views for the multi-view model. The tokenizer gains
    the world's words, whose embeddings start random while every known word keeps its row.
    """
    if world not in VOCABULARIES:
        raise ValueError(f"cannot inflate to world {world!r}; valid: {', '.join(VOCABULARIES)}")
    if image_policy.world != "shapes":
        raise ValueError(f"can only inflate a ShapeWorld image model, got world {image_policy.world!r}")
    torch.manual_seed(seed)
    old = image_policy.text_encoder
    assert isinstance(old, TextConditioner)
    tokenizer = WordTokenizer(words=VOCABULARIES[world](), model_max_length=config.max_tokens)
    text_encoder = build_text_encoder(config, tokenizer)
    state = {k: v for k, v in old.text_encoder.state_dict().items() if "token_embedding" not in k}
    text_encoder.load_state_dict(state, strict=False)
    old_rows = old.text_encoder.get_input_embeddings().weight
    new_rows = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for index, token in enumerate(tokenizer.vocabulary):
            old_index = old.tokenizer.id_of(token)
            if old_index is not None:
                new_rows[index] = old_rows[old_index]
    unet = InflatedVideoUNet.inflate(image_policy.denoiser)
    policy = _make_policy(f"inflated-{image_policy.name}", image_policy.kind, unet,
                          TextConditioner(tokenizer, text_encoder), image_policy.scheduler, config, frames=frames,
                          world=world)
    policy.text_encoder.requires_grad_(True)
    policy.text_encoder.train()
    return policy
