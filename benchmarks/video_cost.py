"""What a clip costs against an image: rollout, update and reward, measured interleaved in one run.

Run: ``python -m benchmarks.video_cost [--quick] [--threads N]``.

The video model is ``shapes-flow``'s architecture inflated with temporal attention (8 frames of 32x32);
the image model is that architecture alone. Weights are random (speed does not depend on them). Cases,
for a batch of 8 samples:

* ``rollout``: the Flow-GRPO SDE sampler with log-probabilities, 10 steps, 8 images vs 8 clips;
* ``frames``: the same clip rollout against bare image-UNet calls on the 64 frames it holds (what the
  temporal layers and the video bookkeeping add beyond "8 images per clip");
* ``update``: forward and backward of one transition's log-probability, 8 images vs 8 clips;
* ``reward``: the exact evaluators, ``shapes-composition`` on 8 images vs ``motion-composition`` on 8
  clips (the clip evaluator detects objects in every frame and links them into tracks).

Reported as ratios (clip / image), which is what a reader needs to budget a video run from an image one.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import machine_description, print_timings_and_ratios, time_interleaved, write_results
from reference_impls.models.components import TinyModelConfig
from reference_impls.models.shapes_model import build_shapes_policy, inflate_to_motion_policy
from reference_impls.rewards import get_reward
from reference_impls.sampling import SamplerConfig, rollout, transition_log_prob

BATCH = 8
STEPS = 10
FRAMES = 8


def measure(repeats: int) -> dict:
    image = build_shapes_policy("flow", seed=0)
    image.text_encoder.requires_grad_(False)
    video = inflate_to_motion_policy(image, FRAMES, TinyModelConfig(), seed=0)
    video.text_encoder.requires_grad_(False)
    sampler = SamplerConfig("sde", num_steps=STEPS)
    image_prompts = ["a red circle"] * BATCH
    clip_prompts = ["a red circle moving right"] * BATCH
    image_run = rollout(image, image_prompts, sampler, torch.Generator().manual_seed(0))
    clip_run = rollout(video, clip_prompts, sampler, torch.Generator().manual_seed(0))
    frames = torch.randn(BATCH * FRAMES, 3, 32, 32)
    frame_text = image_run.cond.hidden_states[:1].expand(BATCH * FRAMES, -1, -1)

    def bare_frame_calls() -> None:
        with torch.no_grad():
            for step in range(STEPS):
                t = image_run.schedule.model_timesteps[step].expand(BATCH * FRAMES)
                image.denoiser(frames, t, encoder_hidden_states=frame_text)

    def update(policy, trajectory) -> None:  # noqa: ANN001
        transition_log_prob(policy, trajectory, 3).log_prob.sum().backward()
        policy.denoiser.zero_grad(set_to_none=True)

    shapes_reward, motion_reward = get_reward("shapes-composition"), get_reward("motion-composition")
    fns = {
        "rollout_images": lambda: rollout(image, image_prompts, sampler, torch.Generator().manual_seed(1)),
        "rollout_clips": lambda: rollout(video, clip_prompts, sampler, torch.Generator().manual_seed(1)),
        "bare_calls_on_the_frames": bare_frame_calls,
        "update_images": lambda: update(image, image_run),
        "update_clips": lambda: update(video, clip_run),
        "reward_images": lambda: shapes_reward(image_run.images, image_prompts),
        "reward_clips": lambda: motion_reward(clip_run.images, clip_prompts),
    }
    timings = time_interleaved(fns, repeats=repeats, warmup=1)
    median = {name: t.median for name, t in timings.items()}
    ratios = {
        "rollout_clip_over_image": median["rollout_clips"] / median["rollout_images"],
        "rollout_clip_over_bare_frame_calls": median["rollout_clips"] / median["bare_calls_on_the_frames"],
        "update_clip_over_image": median["update_clips"] / median["update_images"],
        "reward_clip_over_image": median["reward_clips"] / median["reward_images"],
    }
    return {"batch": BATCH, "steps": STEPS, "frames": FRAMES, "timings": {k: v.as_dict() for k, v in timings.items()},
            "ratios": ratios, "parameters_image": sum(p.numel() for p in image.denoiser.parameters()),
            "parameters_video": sum(p.numel() for p in video.denoiser.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = measure(3 if args.quick else 7)
    result["machine"] = machine_description()
    result["threads"] = args.threads
    print_timings_and_ratios(result)
    if not args.quick:
        write_results("video_cost", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
