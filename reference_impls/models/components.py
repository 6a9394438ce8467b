"""Builders of the tiny diffusers/transformers components behind the shipped ShapeWorld models."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from reference_impls.models.tokenizer import WordTokenizer


@dataclass(frozen=True)
class TinyModelConfig:
    """Sizes of the tiny text-to-image model (pixel space, 32x32 RGB)."""

    image_size: int = 32
    """Side of the square images, in pixels."""
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    """UNet channels per resolution (32, 16, 8 pixels)."""
    text_hidden_size: int = 64
    """Width of the text encoder and the UNet's cross-attention."""
    text_layers: int = 2
    """Transformer layers of the text encoder."""
    max_tokens: int = 16
    """Prompt length in tokens, BOS/EOS included."""
    coordinate_channels: bool = False
    """Feed the UNet two extra input channels holding each pixel's x and y in [-1, 1] (CoordConv). The
    convolutions and the position-free attention otherwise know direction only through the image border,
    and "left of" must be learned from that (the shipped models, made without them, place related objects
    at random)."""
    text_encoder: str = "clip"
    """clip: a causal CLIP text transformer trained together with the UNet (the first shipped models); t5: a
    bidirectional T5 encoder, as SD3 and FLUX use, pretrained on its own and frozen (``text_pretrain``). A
    causal encoder cannot tell the first object's words which side the later relation word puts them on."""


TEXT_ENCODERS = ("clip", "t5")


def coordinate_maps(like: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): x (left -1 to right +1) and y (top -1 to bottom +1) of every pixel of ``like``."""
    height, width = like.shape[-2:]
    y = torch.linspace(-1.0, 1.0, height, device=like.device, dtype=like.dtype)
    x = torch.linspace(-1.0, 1.0, width, device=like.device, dtype=like.dtype)
    grid = torch.stack(torch.meshgrid(x, y, indexing="xy"))
    return grid.unsqueeze(0).expand(like.shape[0], -1, -1, -1)


def build_unet(config: TinyModelConfig) -> UNet2DConditionModel:
    # Cross-attention only at the 8x8 level: global enough for "left of"/"above", and attention at
    # 16x16 doubled the CPU cost of a step (measured: 1.06 s vs 1.81 s per batch of 64).
    return UNet2DConditionModel(
        sample_size=config.image_size,
        in_channels=3 + (2 if config.coordinate_channels else 0),
        out_channels=3,
        block_out_channels=config.block_out_channels,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=config.text_hidden_size,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def build_text_encoder(config: TinyModelConfig, tokenizer: WordTokenizer) -> CLIPTextModel | T5EncoderModel:
    if config.text_encoder not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {config.text_encoder!r}; valid: {', '.join(TEXT_ENCODERS)}")
    if config.text_encoder == "t5":
        return T5EncoderModel(T5Config(
            vocab_size=tokenizer.vocab_size,
            d_model=config.text_hidden_size,
            d_kv=config.text_hidden_size // 4,
            d_ff=2 * config.text_hidden_size,
            num_layers=config.text_layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=config.max_tokens,
            dropout_rate=0.0,
            feed_forward_proj="relu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        ))
    text_config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=config.text_hidden_size,
        intermediate_size=2 * config.text_hidden_size,
        num_hidden_layers=config.text_layers,
        num_attention_heads=4,
        max_position_embeddings=config.max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(text_config)


def build_scheduler(kind: str) -> DDPMScheduler | FlowMatchEulerDiscreteScheduler:
    """The training noise schedule of each model kind."""
    if kind == "diffusion":
        # Cosine schedule: pixel-space 32x32 images lose structure too early under the linear one.
        return DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            # v-prediction: with eps-prediction the 1000-step pretraining reached a low per-step loss but
            # sampled washed-out blobs (errors at high noise are amplified when converting to x0); v
            # balances the error across noise levels, like the flow model's velocity target.
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            clip_sample=True,  # clamp x0_hat to [-1, 1]: at alpha_bar ~ 2e-9 (t = 999) eps errors blow up 1e4-fold
            clip_sample_range=1.0,
        )
    if kind == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    raise ValueError(f"unknown model kind {kind!r}; valid kinds: diffusion, flow")


def config_dict(config: TinyModelConfig) -> dict:
    return asdict(config)
