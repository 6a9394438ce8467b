"""Rewards from pretrained models, loaded from folders the user points at (never from the Hub).

* ``pickscore``: PickScore (Kirstain et al., 2023), a CLIP model fine-tuned on human choices between
  images for a prompt. The reward is the model's logit, ``exp(logit_scale) * cos(image, text)``. The folder
  is a ``CLIPModel`` saved with ``save_pretrained``, with its tokenizer and image-processor files beside it.
* ``aesthetic``: the LAION aesthetic predictor (v2), an MLP on the L2-normalised CLIP ViT-L/14 image
  embedding that predicts a 1-10 rating. The folder holds the CLIP model (``save_pretrained``) and the
  head as ``aesthetic_head.safetensors``; :func:`convert_aesthetic_head` makes that file from the
  released ``.pth`` state dict (read with ``weights_only=True``: no pickled code runs).

* ``hpsv2``: HPSv2 (Wu et al., 2023), an open_clip ViT-H-14 fine-tuned on human preference choices. The
  reward is the cosine of the normalised image and text embeddings, as the authors' scorer computes it.
  The release is an open_clip state dict; :func:`convert_open_clip` rewrites it once as a ``CLIPModel``
  folder (safetensors, tensors read with ``weights_only=True``), which is what ``--reward-model`` takes.

All are differentiable: the images are resized, cropped and normalised with torch operations (the
folder's image-processor settings), so reward-backprop methods can use them. A clip (B, 3, F, H, W) is
scored frame by frame and averaged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reference_impls.rewards.registry import RewardFunction

AESTHETIC_HEAD_FILE = "aesthetic_head.safetensors"


class PretrainedRewardError(ValueError):
    """A pretrained reward's folder is missing or incomplete; the message says what is expected."""


class ClipImageInput(nn.Module):
    """Images in [0, 1] -> CLIP pixel values, differentiably: resize the short side, centre-crop, normalise."""

    def __init__(self, short_side: int, crop: int, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.short_side, self.crop = short_side, crop
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    @classmethod
    def from_folder(cls, folder: Path) -> ClipImageInput:
        config_path = folder / "preprocessor_config.json"
        if not config_path.is_file():
            raise PretrainedRewardError(f"{config_path} is missing: save the CLIP processor into the folder "
                                        "(processor.save_pretrained(PATH))")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        short = size.get("shortest_edge", size.get("height", 224)) if isinstance(size, dict) else int(size)
        crop = crop.get("height", short) if isinstance(crop, dict) else int(crop)
        return cls(int(short), int(crop), config["image_mean"], config["image_std"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        scale = self.short_side / min(height, width)
        size = (max(self.crop, round(height * scale)), max(self.crop, round(width * scale)))
        resized = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        cropped = resized[..., top : top + self.crop, left : left + self.crop]
        return (cropped - self.mean.to(images.dtype)) / self.std.to(images.dtype)


def _features(output: torch.Tensor | object) -> torch.Tensor:
    """Projected embeddings from ``get_*_features`` (a tensor, or an output whose pooler holds them)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


def _frames_averaged(score: Callable[[torch.Tensor, list[str]], torch.Tensor]
                     ) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """Score images, or clips (B, 3, F, H, W) as the mean over their frames."""

    def scored(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.dim() == 4:
            return score(images, prompts)
        batch, _, frames = images.shape[:3]
        flat = images.transpose(1, 2).reshape(batch * frames, *images.shape[1:2], *images.shape[3:])
        return score(flat, [p for p in prompts for _ in range(frames)]).view(batch, frames).mean(dim=1)

    return scored


def _load_clip(folder: Path) -> tuple[nn.Module, ClipImageInput]:
    from transformers import CLIPModel

    if not (folder / "config.json").is_file():
        raise PretrainedRewardError(f"{folder} has no config.json: pass a folder written by CLIPModel.save_pretrained")
    model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
    model.requires_grad_(False).eval()
    return model, ClipImageInput.from_folder(folder)


def _clip_cosine(folder: Path) -> tuple[nn.Module, Callable[[torch.Tensor, list[str]], torch.Tensor]]:
    """A saved CLIP folder's model and its differentiable cos(image, text) of projected embeddings."""
    from transformers import AutoTokenizer

    model, pixels = _load_clip(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def cosine(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(model.parameters()).device
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
        image_embeds = _features(model.get_image_features(pixel_values=pixels.to(device)(images.to(device))))
        text_embeds = _features(model.get_text_features(**tokens))
        return F.cosine_similarity(image_embeds, text_embeds, dim=-1)

    return model, cosine


def load_pickscore(folder: str | Path) -> RewardFunction:
    """PickScore's logit exp(logit_scale) cos(image, text) from a saved CLIP model folder."""
    folder = Path(folder)
    model, cosine = _clip_cosine(folder)

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return model.logit_scale.exp() * cosine(images, prompts)

    return RewardFunction("pickscore", _frames_averaged(score), True,
                          f"PickScore from {folder}: exp(logit_scale) cos(image, text) of a CLIP model tuned on "
                          "human choices", modality="any")


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP (v2): embedding -> 1024 -> 128 -> 64 -> 16 -> rating.

    The layer indices follow the released state dict (dropout layers sit between the linear ones), so
    its keys load as they are.
    """

    def __init__(self, embedding_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


def convert_aesthetic_head(pth_file: str | Path, folder: str | Path) -> Path:
    """The released head (a ``.pth`` state dict) as ``FOLDER/aesthetic_head.safetensors``."""
    from safetensors.torch import save_file

    state = torch.load(str(pth_file), map_location="cpu", weights_only=True)  # tensors only, no pickled code
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    out = Path(folder) / AESTHETIC_HEAD_FILE
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out))
    return out


def load_aesthetic(folder: str | Path) -> RewardFunction:
    """The LAION aesthetic rating of the normalised CLIP image embedding."""
    from safetensors.torch import load_file

    folder = Path(folder)
    head_file = folder / AESTHETIC_HEAD_FILE
    if not head_file.is_file():
        raise PretrainedRewardError(f"{head_file} is missing: convert the released head with "
                                    "reference_impls.rewards.pretrained.convert_aesthetic_head(PTH, FOLDER)")
    model, pixels = _load_clip(folder)
    state = load_file(str(head_file))
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    head.load_state_dict(state)
    head.requires_grad_(False).eval()

    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        del prompts  # the rating ignores the prompt
        device = next(model.parameters()).device
        embedding = _features(model.get_image_features(pixel_values=pixels.to(device)(images.to(device))))
        return head.to(device)(F.normalize(embedding, dim=-1))

    return RewardFunction("aesthetic", _frames_averaged(score), True,
                          f"LAION aesthetic predictor from {folder}: a 1-10 rating of the CLIP image embedding",
                          modality="any")


def load_hpsv2(folder: str | Path) -> RewardFunction:
    """HPSv2's score: cos(image, text) of the converted open_clip model (no logit scale)."""
    folder = Path(folder)
    _, cosine = _clip_cosine(folder)
    return RewardFunction("hpsv2", _frames_averaged(cosine), True,
                          f"HPSv2 from {folder}: cos(image, text) of an open_clip ViT-H-14 tuned on human "
                          "preferences", modality="any")


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
"""The normalisation open_clip's ViT-H-14 (and so HPSv2's scorer) applies to pixels in [0, 1]."""


def _open_clip_tower(state: dict[str, torch.Tensor], prefix: str, target: str, layers: int) -> dict[str, torch.Tensor]:
    """One open_clip transformer stack (``PREFIX.resblocks.N``) in transformers' CLIP encoder names."""
    out = {}
    for i in range(layers):
        block, layer = f"{prefix}.resblocks.{i}", f"{target}.encoder.layers.{i}"
        # nn.MultiheadAttention packs q, k and v into one projection; CLIP's attention keeps three.
        for kind in ("weight", "bias"):
            q, k, v = state[f"{block}.attn.in_proj_{kind}"].chunk(3, dim=0)
            out.update({f"{layer}.self_attn.q_proj.{kind}": q, f"{layer}.self_attn.k_proj.{kind}": k,
                        f"{layer}.self_attn.v_proj.{kind}": v})
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{layer}.{ours}.{kind}"] = state[f"{block}.{theirs}.{kind}"]
    return out


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({key.split(".")[len(prefix.split(".")) + 1] for key in state if key.startswith(f"{prefix}.resblocks.")})


def convert_open_clip(checkpoint: str | Path, folder: str | Path, tokenizer_from: str | Path,
                      vision_heads: int = 16, text_heads: int = 16) -> Path:
    """Rewrite an open_clip ViT checkpoint (HPSv2's release) as a ``CLIPModel`` folder for ``--reward hpsv2``.

    ``checkpoint``: a ``.pt``/``.pth`` (read with ``weights_only=True``; an outer ``state_dict`` key and DDP's
    ``module.`` prefixes are unwrapped) or ``.safetensors`` file. Sizes are read off the tensors; the head
    counts are not stored there and default to ViT-H-14's (16 and 16). ``tokenizer_from``: any folder with
    OpenAI CLIP's BPE tokenizer files (``CLIPTokenizer.save_pretrained``): open_clip tokenizes with the same
    vocabulary. The GELU is the exact one, as in open_clip's non-OpenAI towers."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    checkpoint, folder = Path(checkpoint), Path(folder)
    if checkpoint.suffix == ".safetensors":
        state = load_file(str(checkpoint))
    else:
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)  # tensors only, no code runs
    state = state.get("state_dict", state)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    for needed in ("visual.conv1.weight", "token_embedding.weight", "text_projection", "visual.proj"):
        if needed not in state:
            raise PretrainedRewardError(f"{checkpoint} is not an open_clip ViT state dict: no {needed!r}")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_from), local_files_only=True)

    patch = state["visual.conv1.weight"]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_layers, text_layers = _count_blocks(state, "visual.transformer"), _count_blocks(state, "transformer")
    vision = dict(hidden_size=patch.shape[0], intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads, patch_size=patch.shape[-1],
                  image_size=grid * patch.shape[-1], hidden_act="gelu", layer_norm_eps=1e-5)
    text = dict(vocab_size=state["token_embedding.weight"].shape[0], hidden_size=state["token_embedding.weight"].shape[1],
                intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], num_hidden_layers=text_layers,
                num_attention_heads=text_heads, max_position_embeddings=state["positional_embedding"].shape[0],
                hidden_act="gelu", layer_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    embed_dim = state["visual.proj"].shape[1]
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim))

    mapped = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),  # open_clip multiplies x @ P
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": patch,
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
        **_open_clip_tower(state, "transformer", "text_model", text_layers),
        **_open_clip_tower(state, "visual.transformer", "vision_model", vision_layers),
    }
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise PretrainedRewardError(f"{checkpoint}: the open_clip layout did not map fully (missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]})")
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    size = vision["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(folder)
    return folder


PRETRAINED_REWARDS: dict[str, Callable[[str | Path], RewardFunction]] = {
    "pickscore": load_pickscore,
    "aesthetic": load_aesthetic,
    "hpsv2": load_hpsv2,
}
"""Rewards whose weights come from a folder (``--reward NAME --reward-model PATH``)."""
