"""Video: the inflated text-to-video model, its checkpoints, samplers and rewards on clips, and the CLI.

Every test runs a tiny random model (4 frames of 32x32) so the file stays fast on two cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, VIDEO_FRAMES, tiny_video_pair, write_tiny_video_checkpoints
from PIL import Image

from reference_impls.cli import main
from reference_impls.evaluation import save_gif
from reference_impls.models import load_policy
from reference_impls.models.video_model import InflatedVideoUNet
from reference_impls.rewards import get_reward
from reference_impls.sampling import SamplerConfig, rollout, transition_log_prob
from reference_impls.worlds.motion import render_clips
from reference_impls.worlds.registry import UnknownWorldError, get_world, to_uint8

FRAMES = VIDEO_FRAMES
PROMPTS = ["a red circle moving right", "a blue square moving up quickly"]
_tiny_video = tiny_video_pair


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_video_checkpoints(tmp_path_factory.mktemp("video"))


def test_inflated_model_starts_as_the_image_model_applied_to_every_frame() -> None:
    image, video = _tiny_video()
    x = torch.randn(2, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 200.0])
    with torch.no_grad():
        text = image.encode_text(["a red circle", "a blue square"]).hidden_states
        together = video.denoiser(x, t, encoder_hidden_states=text).sample
        per_frame = torch.stack([image.denoiser(x[:, :, f], t, encoder_hidden_states=text).sample
                                 for f in range(FRAMES)], dim=2)
    assert together.shape == x.shape
    torch.testing.assert_close(together, per_frame, atol=1e-5, rtol=1e-4)


def test_temporal_layers_carry_information_across_frames() -> None:
    _, video = _tiny_video()
    for module in video.denoiser.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.abs().sum() == 0:  # the zero-initialised outputs
            torch.nn.init.normal_(module.weight, std=0.2)
    x = torch.randn(1, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(1))
    changed = x.clone()
    changed[:, :, 0] += 1.0  # touch only the first frame
    text = torch.zeros(1, 16, TINY.text_hidden_size)
    with torch.no_grad():
        a = video.denoiser(x, torch.tensor([500.0]), encoder_hidden_states=text).sample
        b = video.denoiser(changed, torch.tensor([500.0]), encoder_hidden_states=text).sample
    assert (a[:, :, -1] - b[:, :, -1]).abs().max() > 1e-4  # the last frame saw the first one


def test_new_words_are_learned_and_known_words_keep_their_embeddings() -> None:
    image, video = _tiny_video()
    old, new = image.text_encoder, video.text_encoder
    for word in ("red", "circle", "left"):
        torch.testing.assert_close(new.text_encoder.get_input_embeddings().weight[new.tokenizer.id_of(word)],
                                   old.text_encoder.get_input_embeddings().weight[old.tokenizer.id_of(word)])
    for word in ("moving", "up", "down", "slowly", "quickly"):
        assert old.tokenizer.id_of(word) is None and new.tokenizer.id_of(word) is not None


def test_video_checkpoint_round_trip(checkpoints) -> None:
    policy = load_policy(checkpoints["video"])
    assert policy.world == "motion" and policy.latent_shape == (3, FRAMES, 32, 32)
    assert isinstance(policy.denoiser, InflatedVideoUNet)
    _, fresh = _tiny_video()
    x = torch.randn(1, 3, FRAMES, 32, 32)
    with torch.no_grad():
        cond = fresh.encode_text(PROMPTS[:1])
        torch.testing.assert_close(policy.predict(x, torch.tensor([300.0]), cond),
                                   fresh.predict(x, torch.tensor([300.0]), cond))


@pytest.mark.parametrize(("which", "sampler"), [("video", "sde"), ("video-diffusion", "ddim")])
def test_log_probs_of_a_video_rollout_are_recomputed_exactly(checkpoints, which, sampler) -> None:
    policy = load_policy(checkpoints[which])
    config = SamplerConfig(sampler, num_steps=3, eta=1.0)
    trajectory = rollout(policy, PROMPTS, config, torch.Generator().manual_seed(0))
    assert trajectory.images.shape == (2, 3, FRAMES, 32, 32)
    assert trajectory.states.shape == (2, 4, 3, FRAMES, 32, 32)
    with torch.no_grad():
        for step in range(3):
            recomputed = transition_log_prob(policy, trajectory, step).log_prob
            torch.testing.assert_close(recomputed, trajectory.log_probs[:, step], atol=1e-5, rtol=0)


def test_motion_reward_scores_ground_truth_one_and_a_still_clip_lower() -> None:
    reward = get_reward("motion-composition")
    clips = torch.from_numpy(render_clips(PROMPTS, seed=0, frames=FRAMES)).permute(0, 4, 1, 2, 3).float() / 255
    assert reward(clips, PROMPTS).tolist() == [1.0, 1.0]
    still = clips[:, :, :1].expand_as(clips).contiguous()  # the right objects, not moving
    assert (reward(still, PROMPTS) < 1).all()
    assert get_reward("motion-accuracy")(clips, PROMPTS).tolist() == [1.0, 1.0]


def test_rewards_refuse_the_wrong_modality() -> None:
    with pytest.raises(ValueError, match=r"scores videos of shape \(B, 3, F, H, W\)"):
        get_reward("motion-composition")(torch.zeros(2, 3, 32, 32), PROMPTS)
    with pytest.raises(ValueError, match=r"scores images of shape \(B, 3, H, W\)"):
        get_reward("shapes-composition")(torch.zeros(2, 3, FRAMES, 32, 32), ["a red circle"] * 2)
    clips = torch.rand(2, 3, FRAMES, 32, 32, generator=torch.Generator().manual_seed(0))
    frames = clips.transpose(1, 2).flatten(0, 1)  # a clip's JPEG reward is the mean over its frames
    per_frame = get_reward("jpeg-compressibility")(frames, ["x"] * len(frames)).view(2, FRAMES)
    torch.testing.assert_close(get_reward("jpeg-compressibility")(clips, ["x", "y"]), per_frame.mean(dim=1))


def test_a_method_refuses_a_reward_of_another_world(checkpoints) -> None:
    from reference_impls.algorithms import get_method
    from reference_impls.training import build_config

    cls = get_method("dance-grpo")
    config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "reward": "shapes-composition"})
    with pytest.raises(ValueError, match="rewards that fit it: .*motion-composition"):
        cls(policy=load_policy(checkpoints["video"]), reward=get_reward("shapes-composition"), config=config)


def test_dance_grpo_trains_on_clips_and_writes_a_loadable_video_model(checkpoints, tmp_path) -> None:
    from reference_impls.algorithms import get_method
    from reference_impls.training import build_config, train

    cls = get_method("dance-grpo")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "reward": "motion-composition", "model": str(checkpoints["video"]), "steps": 2,
        "batch_size": 4, "group_size": 2, "minibatch_size": 4, "num_steps": 3, "eval_prompts": 2,
        "checkpoint_every": 1})
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config),
                    tmp_path / "run", progress=False)
    assert records[1]["ratio_first"] == 1.0
    assert "eval_task_mean" in records[0] and "eval_direction" in records[0]
    assert (tmp_path / "run/samples/step_000000.gif").exists()
    trained = load_policy(tmp_path / "run/final")
    assert trained.world == "motion" and trained.latent_shape == (3, FRAMES, 32, 32)


def test_sample_writes_an_animated_gif_and_a_frame_strip(checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "clip.gif"
    assert main(["sample", "--model", str(checkpoints["video"]), "--prompt", "A red circle moving right",
                 "--n", "2", "--steps", "2", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompt"] == "a red circle moving right" and summary["frames"] == FRAMES
    with Image.open(out) as gif:
        assert gif.n_frames == FRAMES
    assert Path(summary["strip"]).exists()


def test_eval_scores_a_video_model_per_motion_task(checkpoints, capsys) -> None:
    assert main(["eval", "--model", str(checkpoints["video"]), "--n", "3", "--steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["world"] == "motion"
    assert {"accuracy", "mean_score", "direction", "consistency", "task_mean"} <= set(report)


@pytest.mark.parametrize(("args", "expected"), [
    (["sample", "--prompt", "a red circle", "--out", "x.gif"], "expected the word 'moving'"),
    (["sample", "--prompt", "a red circle moving right", "--out", "x.png"], "animated .gif"),
    (["eval", "--split", "train-position"], "valid splits: train, heldout, easy, all"),
])
def test_bad_video_input_exits_2_with_what_is_allowed(checkpoints, args, expected, capsys) -> None:
    assert main([args[0], "--model", str(checkpoints["video"]), *args[1:]]) == 2
    assert expected in capsys.readouterr().err


def test_pretrain_motion_inflates_the_image_model_and_rejects_unknown_worlds(checkpoints, tmp_path, capsys) -> None:
    out = tmp_path / "motion"
    assert main(["pretrain", "--world", "motion", "--model", "flow", "--steps", "2", "--batch-size", "2",
                 "--frames", str(FRAMES), "--inflate-from", str(checkpoints["image"]), "--eval-n", "0",
                 "--out", str(out)]) == 0
    policy = load_policy(out)
    assert policy.world == "motion" and policy.latent_shape == (3, FRAMES, 32, 32)
    assert main(["pretrain", "--world", "motions", "--model", "flow", "--out", str(tmp_path / "x")]) == 2
    assert "valid worlds: shapes, motion" in capsys.readouterr().err


def test_world_registry_and_media_layout() -> None:
    assert get_world("motion").modality == "video" and get_world("shapes").modality == "image"
    with pytest.raises(UnknownWorldError, match="Did you mean motion"):
        get_world("motoin")
    assert to_uint8(torch.ones(2, 3, 32, 32)).shape == (2, 32, 32, 3)
    clips = to_uint8(torch.ones(2, 3, FRAMES, 32, 32))
    assert clips.shape == (2, FRAMES, 32, 32, 3) and clips.dtype == np.uint8


def test_save_gif_writes_one_picture_per_frame(tmp_path) -> None:
    clips = torch.rand(3, 3, 5, 8, 8)
    save_gif(clips, tmp_path / "a.gif", columns=2, scale=2)
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 5 and gif.size == (2 * 16 + 2, 2 * 16 + 2)


def test_video_presets_apply_to_video_models_only_and_flags_still_win(checkpoints) -> None:
    from reference_impls.algorithms import get_method
    from reference_impls.training import build_config

    cls = get_method("dance-grpo")
    video = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": str(checkpoints["video"])},
                         cls.video_presets)
    image = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": str(checkpoints["image"])},
                         cls.video_presets)
    flagged = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": str(checkpoints["video"]),
                                                           "batch_size": 12}, cls.video_presets)
    assert video.batch_size == cls.video_presets["smoke"]["batch_size"]
    assert image.batch_size == cls.presets["smoke"]["batch_size"] != video.batch_size
    assert flagged.batch_size == 12


# -- a real text-to-video pipeline (tiny, random, saved locally) ------------------------------------
@pytest.fixture(scope="module")
def t2v(tmp_path_factory) -> Path:
    from reference_impls.models.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline("t2v", tmp_path_factory.mktemp("t2v") / "pipe")


def test_text_to_video_pipeline_log_probs_recompute_exactly_and_ddim_matches_the_stock_pipeline(t2v) -> None:
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    policy = load_policy(t2v)
    assert policy.latent_shape == (4, 16, 8, 8) and policy.world is None
    trajectory = rollout(policy, ["a red circle", "two cats"], SamplerConfig("ddim", num_steps=3, eta=1.0),
                         torch.Generator().manual_seed(0))
    assert trajectory.images.shape == (2, 3, 16, 16, 16)
    with torch.no_grad():
        for step in range(3):
            assert torch.equal(transition_log_prob(policy, trajectory, step).log_prob, trajectory.log_probs[:, step])
    pipe = TextToVideoSDPipeline.from_pretrained(str(t2v), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=False)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    # 4 steps: 4 divides 1000, so our strided DDIM and diffusers' step to the same timesteps (test_pipelines.py)
    ours = rollout(policy, ["a red circle"], SamplerConfig("ddim", num_steps=4, eta=0.0), noise=noise).states[:, -1]
    stock = pipe("a red circle", num_inference_steps=4, guidance_scale=1.0, latents=noise.clone(),
                 output_type="latent").frames
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_ddpo_trains_a_text_to_video_pipeline_for_two_steps(t2v, tmp_path) -> None:
    from reference_impls.algorithms import get_method
    from reference_impls.training import build_config, train

    cls = get_method("ddpo")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(t2v), "reward": "jpeg-compressibility", "prompts": "a cat", "steps": 2,
        "batch_size": 2, "minibatch_size": 2, "num_steps": 2, "inner_epochs": 1, "checkpoint_every": 1})
    policy = load_policy(config.model)
    before = [p.detach().clone() for p in policy.trainable_parameters()]
    records = train(cls(policy=policy, reward=get_reward(config.reward), config=config), tmp_path / "run",
                    progress=False)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["ratio_first"] == pytest.approx(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.trainable_parameters()))


# -- a flow-matching text-to-video pipeline: Wan 2.1's architecture (tiny, random, saved locally) ----
@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    from reference_impls.models.tiny_pipelines import save_tiny_pipeline

    return save_tiny_pipeline("wan", tmp_path_factory.mktemp("wan") / "pipe")


def test_wan_pipeline_log_probs_recompute_exactly_and_the_ode_matches_the_stock_pipeline(wan) -> None:
    from diffusers import WanPipeline

    policy = load_policy(wan)
    assert policy.latent_shape == (4, 2, 2, 2) and policy.prediction == "velocity" and policy.world is None
    trajectory = rollout(policy, ["a red circle", "two cats"], SamplerConfig("sde", num_steps=3),
                         torch.Generator().manual_seed(0))
    assert trajectory.images.shape == (2, 3, 5, 16, 16)  # 2 latent frames decode to 5 (the VAE's 4x in time)
    with torch.no_grad():
        for step in range(3):
            assert torch.equal(transition_log_prob(policy, trajectory, step).log_prob, trajectory.log_probs[:, step])
    pipe = WanPipeline.from_pretrained(str(wan), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # As for SD3 (test_pipelines.py): the stock schedule ends at shift(1/1000), ours spaces sigmas evenly to
    # 0 (as Flow-GRPO). WanPipeline takes no sigmas argument, so its scheduler is handed ours.
    set_timesteps = pipe.scheduler.set_timesteps
    even = torch.linspace(1.0, 0.0, 5)[:-1].tolist()
    pipe.scheduler.set_timesteps = lambda steps, device=None, **_: set_timesteps(sigmas=even, device=device)
    noise = torch.randn(1, 4, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    ours = rollout(policy, ["a red circle"], SamplerConfig("ode", num_steps=4), noise=noise).states[:, -1]
    stock = pipe("a red circle", height=16, width=16, num_frames=5, num_inference_steps=4, guidance_scale=1.0,
                 latents=noise.clone(), output_type="latent", max_sequence_length=256).frames
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)


def test_flow_grpo_trains_a_wan_pipeline_with_lora_for_two_steps(wan, tmp_path) -> None:
    from reference_impls.algorithms import get_method
    from reference_impls.training import build_config, train

    cls = get_method("flow-grpo")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(wan), "reward": "jpeg-compressibility", "prompts": "a cat", "steps": 2,
        "batch_size": 4, "group_size": 2, "minibatch_size": 4, "num_steps": 2, "checkpoint_every": 1,
        "lora_rank": 4})
    policy = load_policy(config.model)
    records = train(cls(policy=policy, reward=get_reward(config.reward), config=config), tmp_path / "run",
                    progress=False)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert records[1]["ratio_first"] == pytest.approx(1.0)
    # The LoRA lands where diffusers' WanPipeline.load_lora_weights finds it.
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(wan), local_files_only=True)
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())
