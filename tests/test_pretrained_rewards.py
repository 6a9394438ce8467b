"""Pretrained rewards from local folders (PickScore, the LAION aesthetic predictor), on tiny random stand-ins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reference_impls.models.tiny_pipelines import save_tiny_clip
from reference_impls.rewards import get_reward
from reference_impls.rewards.pretrained import (
    AestheticHead,
    ClipImageInput,
    PretrainedRewardError,
    convert_aesthetic_head,
)

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "pickscore")


def _images(seed: int = 0, size: int = 48) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_pickscore_is_the_scaled_cosine_and_differentiable(clip_folder: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    reward = get_reward("pickscore", str(clip_folder))
    images = _images().requires_grad_(True)
    scores = reward(images, PROMPTS)
    model = CLIPModel.from_pretrained(str(clip_folder))
    tokens = AutoTokenizer.from_pretrained(str(clip_folder))(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_embeds = model.get_image_features(pixel_values=ClipImageInput.from_folder(clip_folder)(images)).pooler_output
        text_embeds = model.get_text_features(**tokens).pooler_output
    expected = model.logit_scale.exp() * F.cosine_similarity(image_embeds, text_embeds, dim=-1)
    torch.testing.assert_close(scores.detach(), expected)
    scores.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_clip_input_matches_the_stock_image_processor(clip_folder: Path) -> None:
    from transformers import CLIPImageProcessor

    images = _images(1)
    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    stock = torch.as_tensor(np.array(CLIPImageProcessor.from_pretrained(str(clip_folder))(
        images=pil, return_tensors="np")["pixel_values"]))
    as_uint8 = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pil])
    ours = ClipImageInput.from_folder(clip_folder)(as_uint8)
    assert ours.shape == stock.shape
    # Pixel noise is the worst case for two bicubic resamplers (PIL's and torch's); smooth images agree better.
    assert float((ours - stock).abs().mean()) < 0.01


def test_a_clip_scores_the_mean_of_its_frames(clip_folder: Path) -> None:
    reward = get_reward("pickscore", str(clip_folder))
    clip = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    per_frame = torch.stack([reward(clip[:, :, f], PROMPTS) for f in range(3)], dim=1)
    torch.testing.assert_close(reward(clip, PROMPTS), per_frame.mean(dim=1))


def test_aesthetic_head_converts_from_a_state_dict_and_rates_the_normalised_embedding(clip_folder: Path,
                                                                                      tmp_path: Path) -> None:
    import shutil

    from transformers import CLIPModel

    folder = tmp_path / "aesthetic"
    shutil.copytree(clip_folder, folder)
    with pytest.raises(PretrainedRewardError, match="aesthetic_head.safetensors"):
        get_reward("aesthetic", str(folder))
    torch.manual_seed(0)
    head = AestheticHead(16)
    torch.save(head.state_dict(), tmp_path / "released.pth")
    convert_aesthetic_head(tmp_path / "released.pth", folder)
    reward = get_reward("aesthetic", str(folder))
    images = _images(3)
    model = CLIPModel.from_pretrained(str(folder))
    with torch.no_grad():
        embedding = model.get_image_features(pixel_values=ClipImageInput.from_folder(folder)(images)).pooler_output
        expected = head.eval()(F.normalize(embedding, dim=-1))
    torch.testing.assert_close(reward(images, PROMPTS).detach(), expected)


def test_missing_or_misplaced_reward_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--reward-model PATH"):
        get_reward("pickscore")
    with pytest.raises(ValueError, match="takes none"):
        get_reward("jpeg-compressibility", str(tmp_path))
    with pytest.raises(PretrainedRewardError, match="config.json"):
        get_reward("pickscore", str(tmp_path))
    with pytest.raises(ValueError, match=r"pickscore \(with --reward-model PATH\)"):
        get_reward("pickscor")


def test_a_method_trains_on_pickscore_from_the_command_line(clip_folder: Path, tmp_path: Path) -> None:
    from reference_impls.cli import main

    code = main(["train", "draft-k", "--model", "shapes-flow", "--reward", "pickscore", "--reward-model",
                 str(clip_folder), "--preset", "smoke", "--steps", "1", "--batch-size", "2", "--num-steps", "4",
                 "--eval-prompts", "2", "--threads", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    assert (tmp_path / "run" / "final").is_dir()


def _random_open_clip_state(width: int = 32, text_width: int = 24, layers: int = 2, patch: int = 8,
                            image_size: int = 32, embed: int = 16, vocab: int = 0, context: int = 77) -> dict:
    """A random state dict in open_clip's ViT layout (the names its VisionTransformer, TextTransformer and
    ResidualAttentionBlock give their parameters)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"visual.conv1.weight": r(width, 3, patch, patch), "visual.class_embedding": r(width),
             "visual.positional_embedding": r((image_size // patch) ** 2 + 1, width),
             "visual.ln_pre.weight": 1 + r(width), "visual.ln_pre.bias": r(width),
             "visual.ln_post.weight": 1 + r(width), "visual.ln_post.bias": r(width), "visual.proj": r(width, embed),
             "token_embedding.weight": r(vocab, text_width), "positional_embedding": r(context, text_width),
             "ln_final.weight": 1 + r(text_width), "ln_final.bias": r(text_width),
             "text_projection": r(text_width, embed), "logit_scale": torch.tensor(4.6)}
    for prefix, w in (("visual.transformer", width), ("transformer", text_width)):
        for i in range(layers):
            b = f"{prefix}.resblocks.{i}"
            state.update({f"{b}.ln_1.weight": 1 + r(w), f"{b}.ln_1.bias": r(w), f"{b}.ln_2.weight": 1 + r(w),
                          f"{b}.ln_2.bias": r(w), f"{b}.attn.in_proj_weight": r(3 * w, w), f"{b}.attn.in_proj_bias": r(3 * w),
                          f"{b}.attn.out_proj.weight": r(w, w), f"{b}.attn.out_proj.bias": r(w),
                          f"{b}.mlp.c_fc.weight": r(4 * w, w), f"{b}.mlp.c_fc.bias": r(4 * w),
                          f"{b}.mlp.c_proj.weight": r(w, 4 * w), f"{b}.mlp.c_proj.bias": r(w)})
    return state


def _open_clip_reference(state: dict, images: torch.Tensor, ids: torch.Tensor, eos: torch.Tensor, heads: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's forward written out with torch's own nn.MultiheadAttention (what its blocks use)."""

    def tower(x: torch.Tensor, prefix: str, mask: torch.Tensor | None) -> torch.Tensor:
        i = 0
        while f"{prefix}.resblocks.{i}.ln_1.weight" in state:
            b = f"{prefix}.resblocks.{i}"
            w = x.shape[-1]
            attention = torch.nn.MultiheadAttention(w, heads, batch_first=True)
            attention.load_state_dict({"in_proj_weight": state[f"{b}.attn.in_proj_weight"],
                                       "in_proj_bias": state[f"{b}.attn.in_proj_bias"],
                                       "out_proj.weight": state[f"{b}.attn.out_proj.weight"],
                                       "out_proj.bias": state[f"{b}.attn.out_proj.bias"]})
            h = F.layer_norm(x, (w,), state[f"{b}.ln_1.weight"], state[f"{b}.ln_1.bias"])
            x = x + attention(h, h, h, need_weights=False, attn_mask=mask)[0]
            h = F.layer_norm(x, (w,), state[f"{b}.ln_2.weight"], state[f"{b}.ln_2.bias"])
            h = F.gelu(F.linear(h, state[f"{b}.mlp.c_fc.weight"], state[f"{b}.mlp.c_fc.bias"]))
            x = x + F.linear(h, state[f"{b}.mlp.c_proj.weight"], state[f"{b}.mlp.c_proj.bias"])
            i += 1
        return x

    patches = F.conv2d(images, state["visual.conv1.weight"], stride=state["visual.conv1.weight"].shape[-1])
    x = patches.flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + state["visual.positional_embedding"]
    w = x.shape[-1]
    x = tower(F.layer_norm(x, (w,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"]), "visual.transformer", None)
    image = F.layer_norm(x[:, 0], (w,), state["visual.ln_post.weight"], state["visual.ln_post.bias"]) @ state["visual.proj"]
    t = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    t = tower(t, "transformer", causal)
    tw = t.shape[-1]
    t = F.layer_norm(t, (tw,), state["ln_final.weight"], state["ln_final.bias"])
    text = t[torch.arange(ids.shape[0]), eos] @ state["text_projection"]  # the end-of-text token's state
    return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def test_hpsv2_converts_an_open_clip_checkpoint_and_scores_its_cosine(clip_folder: Path, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from reference_impls.rewards.pretrained import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, convert_open_clip

    tokenizer = CLIPTokenizer.from_pretrained(str(clip_folder))
    state = _random_open_clip_state(vocab=len(tokenizer), context=tokenizer.model_max_length)
    checkpoint = tmp_path / "hpsv2.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, checkpoint)  # as released (DDP)
    folder = convert_open_clip(checkpoint, tmp_path / "hpsv2", tokenizer_from=clip_folder, vision_heads=4, text_heads=4)
    reward = get_reward("hpsv2", str(folder))
    images = _images(size=32).requires_grad_(True)
    scores = reward(images, PROMPTS)
    tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    eos = (tokens["input_ids"] == tokenizer.eos_token_id).int().argmax(dim=1)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        image_ref, text_ref = _open_clip_reference(state, (images - mean) / std, tokens["input_ids"], eos, heads=4)
    assert scores.detach() == pytest.approx((image_ref * text_ref).sum(-1), abs=1e-5)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(PretrainedRewardError, match="not an open_clip ViT state dict"):
        torch.save({"weight": torch.zeros(1)}, tmp_path / "other.pt")
        convert_open_clip(tmp_path / "other.pt", tmp_path / "x", tokenizer_from=clip_folder)
