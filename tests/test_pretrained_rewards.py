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
