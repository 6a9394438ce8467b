"""The separately pretrained, frozen T5 text encoder of the ShapeWorld bases (models/text_pretrain.py)."""

from __future__ import annotations

import json

import pytest
import torch

from reference_impls.cli import main
from reference_impls.models.components import TinyModelConfig
from reference_impls.models.shapes_model import shapes_vocabulary
from reference_impls.models.text_pretrain import (
    IGNORE,
    SIDES,
    TextPretrainConfig,
    direction_separation,
    pretrain_text_encoder,
    token_targets,
)
from reference_impls.models.tokenizer import WordTokenizer


@pytest.fixture(scope="module")
def tokenizer() -> WordTokenizer:
    return WordTokenizer(words=shapes_vocabulary(), model_max_length=16)


def test_each_phrase_word_is_taught_its_own_object_and_side(tokenizer) -> None:
    targets = token_targets("a red circle left of a blue square", tokenizer)
    # positions: 0 BOS, 1-3 "a red circle", 4-5 "left of", 6-8 "a blue square", 9 EOS
    assert targets["side"][:10] == [IGNORE, 1, 1, 1, IGNORE, IGNORE, 2, 2, 2, IGNORE]
    assert [SIDES[i] for i in targets["side"][1:4]] == ["left"] * 3
    assert [SIDES[i] for i in targets["side"][6:9]] == ["right"] * 3
    assert targets["colour"][1:9] == [0, 0, 0, IGNORE, IGNORE, 2, 2, 2]  # red, then blue
    assert targets["relation"][4:6] == [1, 1] and targets["relation"][1] == IGNORE  # "left of" names relation 1
    below = token_targets("a blue circle below a green triangle", tokenizer)
    assert [SIDES[i] for i in (below["side"][1], below["side"][5])] == ["below", "above"]
    # a conjunction in the order the prompt gives it, not the canonical one; no side
    conj = token_targets("a red circle and two blue squares", tokenizer)
    assert conj["count"][1:8] == [0, 0, 0, IGNORE, 1, 1, 1] and set(conj["side"][1:8]) - {IGNORE} == {0}


def test_a_short_pretraining_tells_held_out_sides_apart_and_separates_directions(tokenizer) -> None:
    torch.set_num_threads(1)
    model_config = TinyModelConfig(text_encoder="t5")
    encoder, report = pretrain_text_encoder(TextPretrainConfig(steps=600, seed=0), model_config, tokenizer)
    assert report["heldout"]["accuracy"]["side"] > 0.95  # unseen compositions
    assert report["heldout"]["accuracy"]["colour"] > 0.95
    assert not any(p.requires_grad for p in encoder.parameters())
    from reference_impls.worlds import prompt_split

    separation = direction_separation(encoder, tokenizer, prompt_split("heldout"))
    assert separation["direction"] > separation["colour"]  # the jointly trained CLIP encoder: 1.03 vs 13.2


def test_causal_encoder_is_refused_for_text_pretraining(tokenizer) -> None:
    with pytest.raises(ValueError, match="bidirectional t5"):
        pretrain_text_encoder(TextPretrainConfig(steps=1), TinyModelConfig(), tokenizer)


def test_pretraining_on_a_frozen_encoder_trains_the_unet_only_and_zero_coordinates_keep_the_start(tmp_path) -> None:
    from reference_impls.models.loading import load_policy
    from reference_impls.models.policy import Conditioning
    from reference_impls.models.text_pretrain import main as text_main

    assert text_main(["--out", str(tmp_path / "t5"), "--steps", "20"]) == 0
    encoder_file = tmp_path / "t5" / "text_encoder" / "model.safetensors"
    # a clip checkpoint to continue from, made without coordinate channels
    assert main(["pretrain", "--model", "flow", "--steps", "2", "--batch-size", "2", "--eval-n", "0",
                 "--threads", "1", "--out", str(tmp_path / "base")]) == 0
    base = load_policy(str(tmp_path / "base"))
    assert main(["pretrain", "--model", "flow", "--steps", "0", "--batch-size", "2", "--eval-n", "0",
                 "--threads", "1", "--init-from", str(tmp_path / "base"), "--text-encoder-from",
                 str(tmp_path / "t5"), "--coordinate-channels", "--out", str(tmp_path / "start")]) == 0
    start = load_policy(str(tmp_path / "start"))
    assert start.denoiser.config.in_channels == 5
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([700.0, 300.0])
    cond = Conditioning(torch.randn(2, 16, 64))
    with torch.no_grad():  # zero-initialised coordinate weights: the same function as the checkpoint's UNet
        assert torch.equal(start.call_denoiser(start.denoiser, x, t, cond), base.call_denoiser(base.denoiser, x, t, cond))
    assert main(["pretrain", "--model", "flow", "--steps", "2", "--batch-size", "2", "--eval-n", "0",
                 "--threads", "1", "--init-from", str(tmp_path / "base"), "--text-encoder-from",
                 str(tmp_path / "t5"), "--coordinate-channels", "--out", str(tmp_path / "trained")]) == 0
    trained = load_policy(str(tmp_path / "trained"))
    assert (tmp_path / "trained" / "text_encoder" / "model.safetensors").read_bytes() == encoder_file.read_bytes()
    assert not torch.equal(trained.denoiser.conv_in.weight, start.denoiser.conv_in.weight)
    meta = json.loads((tmp_path / "trained" / "rlvg_model.json").read_text())
    assert meta["config"]["text_encoder"] == "t5" and meta["config"]["coordinate_channels"] is True
    assert trained.encode_text(["a red circle left of a blue square"]).hidden_states.shape == (1, 16, 64)


def test_text_encoder_from_must_be_a_text_encoder_folder(tmp_path, capsys) -> None:
    assert main(["pretrain", "--model", "flow", "--steps", "1", "--text-encoder-from", str(tmp_path),
                 "--out", str(tmp_path / "x")]) != 0
    assert "not a text encoder folder" in capsys.readouterr().err
