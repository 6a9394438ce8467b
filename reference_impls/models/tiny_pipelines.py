"""Tiny random Stable Diffusion pipelines, built entirely offline (tests and benchmarks).

They have the architecture of the real thing (VAE latent space, CLIP tokenizer + text encoders, a
cross-attention UNet or an MMDiT transformer, the pipelines' own schedulers) at a size that runs a
rollout in well under a second on a laptop CPU. Nothing is downloaded: the CLIP tokenizer is built in
code from an in-memory byte-level vocabulary and a few merges, the weights are random (seeded).

* :func:`build_tiny_sd_pipeline`: ``StableDiffusionPipeline``, UNet epsilon model, 4x8x8 latents,
  16x16 images, a ``PNDMScheduler`` configured like Stable Diffusion 1.x (so loading exercises the
  conversion to the project's own schedule).
* :func:`build_tiny_sd3_pipeline`: ``StableDiffusion3Pipeline``, SD3 transformer (velocity model),
  two CLIP text encoders with projection, no T5 (the pipeline feeds zeros in its place), 4x8x8 latents.
* :func:`build_tiny_t2v_pipeline`: ``TextToVideoSDPipeline``, a ``UNet3DConditionModel`` (temporal
  convolutions and attention) on 4x(F)x8x8 video latents, the SD-style VAE per frame, a DDIM scheduler.
* :func:`build_tiny_wan_pipeline`: ``WanPipeline`` (Wan 2.1's architecture), a ``WanTransformer3DModel``
  velocity model, a UMT5 encoder with a T5 tokenizer built in code (a small Unigram vocabulary), the causal
  3D VAE (4x temporal, 8x spatial): clips of 5 frames of 16x16, 2 latent frames of 2x2.
* :func:`build_tiny_flux_pipeline`: ``FluxPipeline`` (FLUX.1-dev's architecture), a
  ``FluxTransformer2DModel`` with double- and single-stream blocks, rotary positions and a guidance
  embedding, CLIP (pooled) and T5 text encoders, FLUX's dynamic-shift scheduler: 4x8x8 latents packed 2x2.
* :func:`save_tiny_pipeline`: ``save_pretrained`` of any of them into a folder ``rlvg`` can load with
  ``--model PATH`` (for Wan with ``rlvg_video.json``, the small clip size; for FLUX with ``rlvg_image.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TinyKind = Literal["sd", "sd3", "t2v", "wan", "flux"]
TINY_KINDS: tuple[str, ...] = ("sd", "sd3", "t2v", "wan", "flux")
TINY_WAN_CLIP = {"frames": 5, "height": 16, "width": 16}
TINY_FLUX_IMAGE = {"height": 16, "width": 16, "guidance": 3.5}

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_TOKENS = 16
"""Prompt length in tokens (BOS and EOS included): CLIP's 77 would only make the tiny models slower."""
TEXT_HIDDEN = 32
"""Width of each tiny CLIP text encoder (and of the SD UNet's cross-attention)."""
LATENT_CHANNELS = 4
LATENT_SIZE = 8
"""Side of the latent grid; the two-level tiny VAE doubles it (16x16 images)."""

# Whole-word merges for the words of ShapeWorld-like prompts, so that tokenisation is not purely
# character-level (as CLIP's own vocabulary is mostly whole words); any other text still tokenises,
# byte by byte, because every byte-level character is in the vocabulary.
_WORDS = (
    "a", "an", "the", "of", "and", "photo", "red", "green", "blue", "yellow", "circle", "circles",
    "square", "squares", "triangle", "triangles", "left", "right", "above", "below", "small", "big",
    "one", "two", "three", "cat", "dog",
)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges as the tokenizer does: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2 :]]
    return pieces


def tiny_clip_vocabulary(words: tuple[str, ...] = _WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges in CLIP's format (``</w>`` marks the end of a word).

    Every one of the 256 byte-level characters appears alone and word-final, so any text encodes
    without unknown tokens; each word in ``words`` then becomes a single token.
    """
    vocab: dict[str, int] = {BOS_TOKEN: 0, EOS_TOKEN: 1}
    for char in sorted(ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # BPE merges by rank, not left to right, so earlier words' merges (e.g. "l"+"e" from "left")
        # apply inside later words ("circle"). Tokenise with the merges so far and append one merge
        # joining the first two pieces until the word is whole: a new merge has the highest rank, so
        # it never changes how the earlier words tokenise.
        pieces = _bpe([*word[:-1], word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _bpe(pieces, ranks)
    return vocab, list(ranks)


def build_tiny_clip_tokenizer(model_max_length: int = MAX_TOKENS) -> CLIPTokenizer:
    """A CLIPTokenizer built in memory (transformers 5 takes ``vocab`` and ``merges`` directly).

    Built this way rather than from a hub test tokenizer because those silently degrade offline.
    """
    vocab, merges = tiny_clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _clip_config(tokenizer: CLIPTokenizer, projection_dim: int = TEXT_HIDDEN) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        # The pooled output is read at the first EOS; pad and EOS share an id, as in CLIP.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_tiny_vae(scaling_factor: float = 0.18215, shift_factor: float | None = None,
                   quant_convs: bool = True) -> AutoencoderKL:
    """Two-level KL autoencoder: 3x16x16 images <-> 4x8x8 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=2 * LATENT_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        # SD3's VAE has no quant convs; SD 1.x's has them.
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
    )


def build_tiny_sd_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random ``StableDiffusionPipeline`` with SD 1.x's scheduler settings, safety checker off."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = build_tiny_vae()
    # Stable Diffusion 1.x ships PNDM with the scaled-linear betas below (the values of its
    # scheduler_config.json); the project's samplers read only the betas from it.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A random ``StableDiffusion3Pipeline`` without T5 (``text_encoder_3``/``tokenizer_3`` None).

    The pipeline concatenates the two CLIP encoders' hidden states (2 x 32 wide) and pads them to the
    T5 width, which is the transformer's ``joint_attention_dim``: 64 here, so nothing is cropped. The
    pooled projections (2 x 32) make ``pooled_projection_dim`` 64.
    """
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2))
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=32,  # = heads x head_dim, the transformer's width
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=LATENT_SIZE,
    )
    vae = build_tiny_vae(scaling_factor=1.5305, shift_factor=0.0609, quant_convs=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3's shift
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_t2v_pipeline(seed: int = 0) -> TextToVideoSDPipeline:
    """A random ``TextToVideoSDPipeline`` (ModelScope's architecture) with a DDIM scheduler."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    unet = UNet3DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    pipe = TextToVideoSDPipeline(vae=build_tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_t5_tokenizer(words: tuple[str, ...] = _WORDS):  # noqa: ANN201 - a T5TokenizerFast
    """A T5 tokenizer built in memory: SentencePiece-style pieces ("▁word") in a Unigram model, so that
    ``save_pretrained`` / ``from_pretrained`` round-trip as T5's own tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + word, -1.0) for word in dict.fromkeys(words)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0)


def build_tiny_wan_pipeline(seed: int = 0):  # noqa: ANN201 - a WanPipeline
    """A random ``WanPipeline`` (Wan 2.1's architecture) with a flow-matching Euler scheduler (shift 3)."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=TEXT_HIDDEN, d_kv=8, d_ff=64,
                                               num_layers=1, num_heads=4, relative_attention_num_buckets=8))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                                        text_dim=TEXT_HIDDEN, freq_dim=32, ffn_dim=32, num_layers=1,
                                        cross_attn_norm=True, rope_max_seq_len=32)
    vae = AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1] * LATENT_CHANNELS,
                           latents_std=[1.5] * LATENT_CHANNELS)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux_pipeline(seed: int = 0):  # noqa: ANN201 - a FluxPipeline
    """A random ``FluxPipeline`` with FLUX.1-dev's scheduler settings (dynamic shift) and guidance embedding."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer_2 = build_tiny_t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=TEXT_HIDDEN, d_kv=8, d_ff=64,
                                             num_layers=1, num_heads=4, relative_attention_num_buckets=8))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1,
                                         num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                         joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
                                         guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = build_tiny_vae(scaling_factor=0.3611, shift_factor=0.1159, quant_convs=False)  # FLUX's VAE constants
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(kind: TinyKind, seed: int = 0):  # noqa: ANN201
    """``kind``: "sd" (epsilon UNet), "sd3" (flow transformer), "t2v" (text-to-video UNet), "wan" (flow video
    transformer) or "flux" (FLUX.1 transformer)."""
    if kind == "sd":
        return build_tiny_sd_pipeline(seed)
    if kind == "sd3":
        return build_tiny_sd3_pipeline(seed)
    if kind == "t2v":
        return build_tiny_t2v_pipeline(seed)
    if kind == "wan":
        return build_tiny_wan_pipeline(seed)
    if kind == "flux":
        return build_tiny_flux_pipeline(seed)
    raise ValueError(f"unknown tiny pipeline kind {kind!r}; valid kinds: {', '.join(TINY_KINDS)}")


def save_tiny_pipeline(kind: TinyKind, directory: str | Path, seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it (safetensors) into ``directory``."""
    directory = Path(directory)
    build_tiny_pipeline(kind, seed).save_pretrained(directory, safe_serialization=True)
    if kind == "wan":
        import json

        from reference_impls.models.pipelines import VIDEO_SIZE_FILE

        (directory / VIDEO_SIZE_FILE).write_text(json.dumps(TINY_WAN_CLIP), encoding="utf-8")
    if kind == "flux":
        import json

        from reference_impls.models.pipelines import IMAGE_SIZE_FILE

        (directory / IMAGE_SIZE_FILE).write_text(json.dumps(TINY_FLUX_IMAGE), encoding="utf-8")
    return directory


def save_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random ``CLIPModel`` with its tokenizer and image-processor files: the stand-in for the folders
    of the pretrained rewards (PickScore, the aesthetic predictor's CLIP) in tests."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    text = _clip_config(tokenizer, projection_dim=16)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=16)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(directory)
    return directory
