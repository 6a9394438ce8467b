"""The multi-view generator and RL on it: model wiring, the SolidWorld rewards, Carve3D's loss and one update."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY

from reference_impls.algorithms import get_method
from reference_impls.algorithms.carve3d import chain_log_ratio, kl_regularised_reward, on_policy_loss
from reference_impls.models import load_policy
from reference_impls.models.pretrain import write_checkpoint_atomically
from reference_impls.models.shapes_model import build_shapes_policy, inflate_to_motion_policy
from reference_impls.rewards import get_reward
from reference_impls.rewards.registry import reconstruction_consistency
from reference_impls.training import build_config, train
from reference_impls.worlds.solid import FittedSolid, render_views


@pytest.fixture(scope="module")
def tiny_solid(tmp_path_factory) -> Path:
    """A tiny random multi-view flow model (4 views), saved as a checkpoint folder."""
    image = build_shapes_policy("flow", TINY, seed=0)
    views = inflate_to_motion_policy(image, 4, TINY, seed=0, world="solid")
    folder = tmp_path_factory.mktemp("solid") / "mv"
    write_checkpoint_atomically(views, folder, TINY, {"note": "tiny random"})
    return folder


def test_inflated_multiview_model_starts_as_the_image_model_per_view(tiny_solid: Path) -> None:
    image = build_shapes_policy("flow", TINY, seed=0)
    views = load_policy(tiny_solid)
    assert views.world == "solid" and views.latent_shape == (3, 4, 32, 32)
    x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    prompt = ["a red square"]  # words both vocabularies share, so both encoders see the same ids
    with torch.no_grad():
        out = views.predict(x, torch.tensor([500.0, 500.0]), views.encode_text(prompt * 2))
        per_view = image.predict(x[:, :, 1], torch.tensor([500.0, 500.0]), image.encode_text(prompt * 2))
    # Cross-view attention starts at zero: view 1 of the multi-view output is the image model's output.
    torch.testing.assert_close(out[:, :, 1], per_view, atol=1e-5, rtol=1e-4)


def test_solid_rewards_score_ground_truth_views_as_correct() -> None:
    prompts = ["a red cube on top of a blue cylinder", "a small green sphere"]
    views = torch.from_numpy(render_views(prompts, seed=3)).permute(0, 4, 1, 2, 3).float() / 255
    assert get_reward("solid-composition").fn(views, prompts).tolist() == [1.0, 1.0]
    assert get_reward("solid-accuracy").fn(views, prompts).tolist() == [1.0, 1.0]
    consistency = get_reward("solid-consistency").fn(views, prompts)
    assert bool((consistency > 0.8).all())
    # Swapping the prompts makes composition fail; consistency reads no prompt and does not change.
    swapped = list(reversed(prompts))
    assert get_reward("solid-composition").fn(views, swapped).max() < 1.0
    torch.testing.assert_close(get_reward("solid-consistency").fn(views, swapped), consistency)


def test_reconstruction_consistency_by_hand() -> None:
    def solid(iou: float, blobs: int) -> FittedSolid:
        return FittedSolid("red", "cube", "medium", 0.0, 0.0, 0.0, iou, 4, blobs)

    assert reconstruction_consistency([]) == 0.0
    assert reconstruction_consistency([solid(0.9, 1), solid(0.7, 1)]) == pytest.approx(0.8)
    # One object split into 3 blobs in some view: 2 extra blobs divide the mean IoU by 3.
    assert reconstruction_consistency([solid(0.9, 3)]) == pytest.approx(0.3)


def test_kl_folded_reward_and_on_policy_loss_by_hand() -> None:
    policy = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    reference = torch.tensor([[-1.5, -2.0], [-0.5, -1.5]])
    log_ratio = chain_log_ratio(policy, reference)
    torch.testing.assert_close(log_ratio, torch.tensor([0.5, 1.0]))
    shaped = kl_regularised_reward(torch.tensor([1.0, 1.0]), log_ratio, kl_coef=0.2)
    torch.testing.assert_close(shaped, torch.tensor([0.9, 0.8]))
    # -mean(A_i log p_it) = -(1 * (-1 - 2) + (-1) * (-0.5 - 0.5)) / 4 = -(-3 + 1) / 4 = 0.5
    assert float(on_policy_loss(policy, torch.tensor([1.0, -1.0]))) == pytest.approx(0.5)


def test_carve3d_update_is_on_policy_and_rejects_image_models(tiny_solid: Path, tmp_path: Path) -> None:
    cls = get_method("carve3d")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(tiny_solid), "steps": 2, "batch_size": 4, "samples_per_prompt": 2,
        "num_steps": 3, "eval_prompts": 2, "checkpoint_every": 2, "min_step_std": 0.0}, cls.video_presets)
    torch.manual_seed(0)
    policy = load_policy(config.model)
    records = train(cls(policy=policy, reward=get_reward(config.reward), config=config), tmp_path / "run",
                    progress=False)
    steps = [r for r in records if "ratio_mean" in r]
    assert len(steps) == 2
    # The first update evaluates the samples under the weights that drew them: ratio exactly 1, and the
    # policy is the base model, so the KL estimate is exactly 0.
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert steps[0]["kl_estimate"] == pytest.approx(0.0, abs=1e-5)
    assert all(math.isfinite(r["reward_mean"]) for r in steps)
    assert np.isfinite(steps[1]["kl_estimate"])
    image_config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": "shapes-flow"})
    with pytest.raises(ValueError, match="multi-view generator"):
        cls(policy=load_policy("shapes-flow"), reward=get_reward("jpeg-compressibility"), config=image_config)


def test_voxel_field_fits_ground_truth_views_and_exports_a_mesh(tmp_path: Path) -> None:
    """The renderer is differentiable enough to carve views into a field the evaluator accepts."""
    import trimesh

    from reference_impls.models.voxel_field import VoxelField, VoxelFieldConfig
    from reference_impls.worlds.registry import to_uint8
    from reference_impls.worlds.solid import evaluate_views

    prompt = "a large green cube"
    truth = torch.from_numpy(render_views([prompt], seed=1)[0]).permute(0, 3, 1, 2).float() / 255
    torch.manual_seed(0)
    field = VoxelField(VoxelFieldConfig(samples_per_ray=64))
    optimiser = torch.optim.Adam(field.parameters(), lr=0.1)
    first = None
    for _ in range(60):
        loss = ((field.render() - truth) ** 2).mean()
        first = first if first is not None else float(loss.detach())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert float(loss.detach()) < 0.1 * first
    with torch.no_grad():
        verdict = evaluate_views(to_uint8(field.render().permute(1, 0, 2, 3)[None]), [prompt])[0]
    # 60 steps carve one consistent green object (its corners are still soft: the shape is not asserted).
    assert verdict.criteria["count"] and verdict.criteria["consistency"]
    assert [obj.colour for obj in verdict.objects] == ["green"]
    counts = field.mesh(tmp_path / "cube.ply")
    mesh = trimesh.load(tmp_path / "cube.ply")
    assert len(mesh.faces) == counts["faces"] > 100
    # The surface sits where the cube stands: on the ground, about 0.5 units either side of the centre.
    assert mesh.bounds[0][1] < 0.2 and 0.7 < mesh.bounds[1][1] < 1.4
    field.turntable(tmp_path / "turn.gif", frames=4, size=16)
    from PIL import Image

    assert Image.open(tmp_path / "turn.gif").n_frames == 4


def test_dreamdpo_direction_by_hand() -> None:
    from reference_impls.algorithms.dreamdpo import preference_direction

    x = torch.tensor([[1.0, 0.0]])
    first, second = torch.tensor([[0.5, 0.5]]), torch.tensor([[2.0, -1.0]])
    # The second wins by 0.5 >= tau: (x - x0_w) - (x - x0_l) = x0_l - x0_w = first - second.
    direction, pair = preference_direction(x, first, second, torch.tensor([0.25, 0.75]), threshold=0.1)
    assert pair
    torch.testing.assert_close(direction, torch.tensor([[-1.5, 1.5]]))
    # A gap under tau: SDS towards the winner only, x - x0_w.
    direction, pair = preference_direction(x, first, second, torch.tensor([0.70, 0.75]), threshold=0.1)
    assert not pair
    torch.testing.assert_close(direction, torch.tensor([[-1.0, 1.0]]))
    # The loss the field minimises has exactly this gradient in x.
    from reference_impls.algorithms.score_distillation import gradient_as_loss

    x = x.clone().requires_grad_(True)
    gradient_as_loss(x, direction).backward()
    torch.testing.assert_close(x.grad, direction)


def test_dreamdpo_run_resumes_exactly_and_writes_its_outputs(tiny_solid: Path, tmp_path: Path) -> None:
    cls = get_method("dreamdpo")

    def run(out: Path, steps: int, resume: bool = False) -> list[dict]:
        config = build_config(cls.config_class, cls.presets, {
            "preset": "smoke", "model": str(tiny_solid), "steps": steps, "eval_every": 2, "checkpoint_every": 2,
            "samples_per_ray": 32, "prompts": "a red cube"})
        return train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config), out,
                     resume=resume, progress=False)

    straight = run(tmp_path / "a", 4)
    # A run killed after its step-2 checkpoint: the same run with step 4's checkpoint and outputs gone.
    run(tmp_path / "b", 4)
    checkpoints = tmp_path / "b" / "checkpoints"
    shutil.rmtree(checkpoints / "step_000004")
    shutil.rmtree(tmp_path / "b" / "final")
    (checkpoints / "latest").write_text("step_000002", encoding="utf-8")
    resumed = run(tmp_path / "b", 4, resume=True)
    drop = ("wall_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in drop} for r in straight]
    final = tmp_path / "a" / "final"
    for name in ("views.png", "turntable.gif", "verdict.json", "field.safetensors"):
        assert (final / name).exists(), name
    with pytest.raises(ValueError, match="one SolidWorld prompt"):
        config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": str(tiny_solid),
                                                               "prompts": "a red circle"})
        cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config)


def test_paired_benchmarks_put_methods_on_the_solid_world() -> None:
    from benchmarks.field_table import fixed_prompts
    from benchmarks.method_table import default_reward, world_setup

    assert default_reward(get_method("carve3d"), "solid") == "solid-consistency"  # the method's own MRC reward
    assert default_reward(get_method("flow-grpo"), "solid") == "solid-composition"
    assert world_setup("flow-grpo", "solid") == ({"model": "solid-mv-flow"}, "flow-grpo@solid")
    assert world_setup("carve3d", "solid") == ({}, "carve3d")  # made for SolidWorld: its rows keep its name
    prompts = fixed_prompts(2)
    assert len(prompts) == 6 and prompts == fixed_prompts(2)  # 2 per task, the same every call


def test_stability_on_fitted_layouts_by_hand() -> None:
    from reference_impls.worlds.solid import scene_stands, stands

    def solid(shape: str, x: float, y0: float, z: float = 0.0, size: str = "medium") -> FittedSolid:
        return FittedSolid("red", shape, size, x, y0, z, 0.9, 4, 1)

    base = solid("cube", 0.0, 0.0)  # medium: half extent 0.4, top at 0.8
    assert stands(base, [base])
    assert stands(solid("sphere", 0.3, 0.8), [base])          # centre over the top face
    assert not stands(solid("sphere", 0.5, 0.8), [base])      # centre beyond the edge: tips over
    assert not stands(solid("sphere", 0.0, 1.4), [base])      # floating above it
    cone = solid("cone", 0.0, 0.0)
    assert not stands(solid("cube", 0.0, 0.8), [cone])        # a cone carries nothing
    assert not scene_stands([])
    assert scene_stands([base, solid("sphere", 0.1, 0.8)])
    # Ground-truth stacked scenes stand; the reward reads no prompt.
    prompts = ["a red sphere on top of a blue cylinder", "a small green cone on top of a large yellow cube"]
    views = torch.from_numpy(render_views(prompts, seed=5)).permute(0, 4, 1, 2, 3).float() / 255
    assert get_reward("solid-stability").fn(views, prompts).tolist() == [1.0, 1.0]


def test_dro_loss_by_hand_and_dso_needs_a_multiview_model(tiny_solid: Path, tmp_path: Path) -> None:
    from reference_impls.algorithms.dso import dro_loss

    loss, stats = dro_loss(torch.tensor([0.2, 0.4]), torch.tensor([0.5, 0.3]))
    assert float(loss) == pytest.approx(0.5 * ((0.2 - 0.5) + (0.4 - 0.3)) / 2)
    assert stats.implicit_acc == 0.5
    cls = get_method("dso")
    config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": "shapes-flow",
                                                           "reward": "shapes-composition"})
    with pytest.raises(ValueError, match="multi-view generator"):
        cls(policy=load_policy("shapes-flow"), reward=get_reward("shapes-composition"), config=config)


# -- on the shipped multi-view model ------------------------------------------------------------------
def test_shipped_multiview_model_draws_four_consistent_views_of_ground_truth_quality() -> None:
    from reference_impls.evaluation import default_eval_sampler, evaluate_policy
    from reference_impls.worlds.solid import as_solid_spec, solid_prompt_split

    policy = load_policy("solid-mv-flow")
    assert policy.world == "solid" and policy.latent_shape == (3, 4, 32, 32)
    prompts = [p for p in solid_prompt_split("heldout") if as_solid_spec(p).task == "single_object"][:8]
    result = evaluate_policy(policy, prompts, default_eval_sampler(policy, 20), seed=0)
    # Single objects: most are one consistent solid across the four views (the evaluator's check).
    assert result.metrics["consistency"] >= 0.5, result.metrics


def test_carve3d_smoke_raises_its_reward(tmp_path: Path) -> None:
    from helpers import run_smoke, training_rewards

    records = run_smoke("carve3d", "solid-consistency", tmp_path / "run")
    rewards = training_rewards(records)
    assert sum(rewards[-2:]) / 2 > sum(rewards[:2]) / 2, rewards
    assert records[1]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "run" / "final" / "rlvg_model.json").exists()


def test_dreamdpo_smoke_writes_a_turntable_and_a_mesh_trimesh_loads(tmp_path: Path) -> None:
    import json

    import trimesh
    from PIL import Image

    from reference_impls.cli import main

    out = tmp_path / "dreamdpo"
    assert main(["train", "dreamdpo", "--prompt", "a red cube", "--preset", "smoke", "--out", str(out),
                 "--threads", "1", "--no-progress"]) == 0
    final = out / "final"
    assert Image.open(final / "turntable.gif").n_frames == 12
    verdict = json.loads((final / "verdict.json").read_text(encoding="utf-8"))
    assert "error" not in verdict["mesh"], verdict["mesh"]
    mesh = trimesh.load(final / "mesh.ply")
    assert len(mesh.faces) == verdict["mesh"]["faces"] > 0
    # The field now holds a red object: the evaluator finds that colour in the renders.
    assert "red" in [obj["colour"] for obj in verdict["objects"]]


def test_the_grpo_cell_runs_on_views_with_a_3d_reward(tiny_solid: Path, tmp_path: Path) -> None:
    """Flow-GRPO needs no change for 3D: groups of view sets, scored by the exact SolidWorld evaluator."""
    cls = get_method("flow-grpo")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(tiny_solid), "reward": "solid-composition", "steps": 1, "num_steps": 3,
        "eval_prompts": 2}, cls.video_presets)
    assert config.batch_size == cls.video_presets["smoke"]["batch_size"]  # the clip-sized variant applies
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config),
                    tmp_path / "run", progress=False)
    step = next(r for r in records if r["step"] == 1)
    assert 0.0 <= step["reward_mean"] <= 1.0 and math.isfinite(step["reward_std"])


# -- AR3D-R1's hierarchical reward, the learned multi-view reward and DreamReward ----------------------
def test_hierarchical_rewards_by_hand() -> None:
    prompts = ["a red cube", "a small blue sphere on top of a large green cylinder"]
    views = torch.from_numpy(render_views(prompts, seed=0)).permute(0, 4, 1, 2, 3).float() / 255
    coarse, fine = get_reward("solid-global"), get_reward("solid-parts")
    assert coarse(views, prompts).tolist() == fine(views, prompts).tolist() == [1.0, 1.0]
    # The stacked scene judged as 'next to': count and consistency hold, the relation does not (2 of 3).
    # Its parts judged against 'a small blue cube ...': blue has size but not shape (2 of 3 checks with colour),
    # green all (3 of 3): (2/3 + 1) / 2.
    asked = ["a blue cube", "a small blue cube on top of a large green cylinder"]
    assert fine(views, asked).tolist() == pytest.approx([0.0, (2 / 3 + 1) / 2])
    assert coarse(views[1:], ["a small blue sphere next to a large green cylinder"]).tolist() == pytest.approx([2 / 3])


def test_hierarchical_advantages_split_the_chain_into_coarse_and_fine_steps(tiny_solid: Path) -> None:
    from types import SimpleNamespace

    from reference_impls.algorithms.grpo_common import grpo_advantages

    cls = get_method("flow-grpo")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(tiny_solid), "reward": "solid-composition", "hierarchical": True,
        "num_steps": 4, "sde_steps": 0, "group_size": 2, "batch_size": 4, "kl_coef": 0.0}, cls.video_presets)
    method = cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config)
    # Group 1: correct views vs views of another prompt; group 2: the same pair the other way round.
    prompts = ["a red cube", "a red cube", "a blue sphere next to a green cube", "a blue sphere next to a green cube"]
    rendered = ["a red cube", "a yellow cone", "a blue sphere on top of a green cube", "a blue sphere next to a green cube"]
    views = torch.from_numpy(render_views(rendered, seed=1)).permute(0, 4, 1, 2, 3).float() / 255
    batch = SimpleNamespace(trajectory=SimpleNamespace(images=views, prompts=prompts))
    steps = torch.tensor([[0, 1, 2]] * 4)
    per_step, metrics = method.hierarchical_advantages(batch, steps)
    coarse = grpo_advantages(get_reward("solid-global")(views, prompts), config)
    fine = grpo_advantages(get_reward("solid-parts")(views, prompts), config)
    # Steps 0 and 1 lie in the first half of the 4 stochastic steps: the coarse level; step 2: the fine one.
    torch.testing.assert_close(per_step, torch.stack([coarse, coarse, fine], dim=1))
    assert metrics["coarse_step_share"] == pytest.approx(2 / 3)
    # The stacked-instead-of-side-by-side pair differs in layout only: its fine advantages are 0.
    assert fine[2:].abs().max() == 0 and coarse[2] < 0 < coarse[3]


def test_one_hierarchical_flow_grpo_step_starts_on_policy(tiny_solid: Path, tmp_path: Path) -> None:
    cls = get_method("flow-grpo")
    config = build_config(cls.config_class, cls.presets, {
        "preset": "smoke", "model": str(tiny_solid), "reward": "solid-composition", "hierarchical": True,
        "steps": 1, "num_steps": 3, "eval_prompts": 2}, cls.video_presets)
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config),
                    tmp_path / "run", progress=False)
    step = next(r for r in records if r["step"] == 1)
    assert step["ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert 0.0 <= step["coarse_reward_mean"] <= 1.0 and 0.0 <= step["fine_reward_mean"] <= 1.0


def test_learned_solid_reward_features_and_gradient() -> None:
    from reference_impls.rewards.learned_solid import (
        PROMPT_FEATURES,
        SolidRewardNet,
        predicted_score,
        solid_criteria_mask,
        solid_prompt_features,
    )
    from reference_impls.worlds.grammar import COLOURS

    features = solid_prompt_features(["a small red cube", "a blue cone on top of a large green cylinder"])
    assert features.shape == (2, PROMPT_FEATURES)
    assert features.sum(dim=1).tolist() == [3 + 1, 6 + 1]  # colour, shape, size per object, and the relation
    assert features[0, COLOURS.index("red")] == 1
    assert solid_criteria_mask(["a red cube", "a red cube next to a blue cone"]).tolist() == \
        [[1, 1, 1, 0], [1, 1, 1, 1]]
    logits = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 0.0]])
    # The relation logit is masked out of a one-object prompt's score.
    assert predicted_score(logits, torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])).tolist() == [0.5, 0.5]
    torch.manual_seed(0)
    net = SolidRewardNet()
    views = torch.rand(2, 3, 4, 32, 32, requires_grad=True)
    net(views, features).sum().backward()
    assert views.grad is not None and views.grad[:, :, 3].abs().sum() > 0  # every view reaches the score
    with pytest.raises(ValueError, match="4 views"):
        net(torch.rand(1, 3, 2, 32, 32), features[:1])


def test_shipped_solid_reward_prefers_the_prompt_it_was_asked_for() -> None:
    """The shipped Reward3D analogue ranks ground-truth views of held-out prompts above views of a changed prompt."""
    from reference_impls.worlds.solid import solid_prompt_split

    heldout = solid_prompt_split("heldout")[::21][:24]
    views = torch.from_numpy(render_views(heldout, seed=3)).permute(0, 4, 1, 2, 3).float() / 255
    reward = get_reward("solid-learned")
    right = reward(views, heldout)
    wrong = reward(views.roll(5, dims=0), heldout)  # every prompt paired with another prompt's views
    truly_wrong = get_reward("solid-composition")(views.roll(5, dims=0), heldout) < 1  # by the exact evaluator
    assert int(truly_wrong.sum()) >= 20
    agreement = float((right > wrong)[truly_wrong].float().mean())
    assert agreement >= 0.85, (agreement, right, wrong)
    x = views[:2].clone().requires_grad_(True)
    reward(x, heldout[:2]).sum().backward()
    assert x.grad.abs().sum() > 0


def test_dreamreward_pieces_by_hand() -> None:
    from reference_impls.algorithms.dreamreward import hinge_reward_loss, magnitude_match, scored_views

    assert magnitude_match(350.0, 0.4) == pytest.approx(100.0)  # 10^(3 digits - 1 digit)
    assert magnitude_match(5.0, 0.5) == pytest.approx(1.0)
    assert magnitude_match(12345.0, 23.0) == pytest.approx(1000.0)
    assert magnitude_match(350.0, 0.4) == magnitude_match(350.0, 0.004)  # no growth as the hinge closes
    assert float(hinge_reward_loss(torch.tensor([0.25, 1.2]), margin=1.0)) == pytest.approx(0.75 / 2)
    x = torch.tensor([[0.2, -0.4]], requires_grad=True)
    x0_hat = torch.tensor([[0.6, 0.0]])
    # Straight-through: the value is x0_hat's (mapped to [0, 1]), the gradient is the render's (1/2 per pixel).
    views = scored_views(x, x0_hat, use_estimate=True)
    torch.testing.assert_close(views.detach(), torch.tensor([[0.8, 0.5]]))
    views.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5]]))
    torch.testing.assert_close(scored_views(x, x0_hat, use_estimate=False).detach(), torch.tensor([[0.6, 0.3]]))


def test_dreamreward_adds_the_reward_term_after_its_warm_up(tiny_solid: Path, tmp_path: Path) -> None:
    cls = get_method("dreamreward")

    def run(out: Path, **settings) -> list[dict]:  # noqa: ANN003
        config = build_config(cls.config_class, cls.presets, {
            "preset": "smoke", "model": str(tiny_solid), "steps": 4, "eval_every": 0, "checkpoint_every": 4,
            "samples_per_ray": 32, "prompts": "a red cube", "reward_start": 0.5, **settings})
        return train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config), out,
                     progress=False)

    steps = [r for r in run(tmp_path / "a") if "sds_loss" in r]
    assert [r["reward_term"] for r in steps] == [0.0, 0.0, 1.0, 1.0]  # steps 0, 1 are warm-up SDS
    assert all(0 <= r["reward_mean"] <= 1 and r["reward_weight"] > 0 for r in steps[2:])
    plain = [r for r in run(tmp_path / "b", reward_weight=0.0) if "sds_loss" in r]
    assert [r["reward_term"] for r in plain] == [0.0] * 4
    # Until the reward joins, the two runs are the same SDS run.
    assert [r["sds_loss"] for r in plain[:2]] == [r["sds_loss"] for r in steps[:2]]
    config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "model": str(tiny_solid)})
    with pytest.raises(ValueError, match="differentiable"):
        cls(policy=load_policy(config.model), reward=get_reward("solid-composition"), config=config)


def test_solid_reward_training_writes_a_loadable_checkpoint_with_provenance(tmp_path: Path) -> None:
    import json

    from reference_impls.rewards.learned_solid import (
        SolidRewardNetConfig,
        SolidRewardTrainConfig,
        load_solid_reward_net,
        synthetic_views,
        train_solid_reward,
    )

    config = SolidRewardTrainConfig(synthetic=24, model_samples=0, heldout_synthetic=8, heldout_model_samples=0,
                                    steps=3, batch_size=8)
    network = SolidRewardNetConfig(widths=(4, 4, 4, 4), prompt_hidden=8, head_hidden=8)
    provenance = train_solid_reward(tmp_path / "reward", config, network, command="test", progress=False)
    assert provenance["quality"]["heldout"]["all"]["n"] == 8
    assert not (tmp_path / "reward.partial").exists()  # written aside, then renamed into place
    net = load_solid_reward_net(str(tmp_path / "reward"))
    assert net.config.widths == (4, 4, 4, 4)
    assert json.loads((tmp_path / "reward" / "provenance.json").read_text())["config"]["steps"] == 3
    # The data are deterministic in the seed.
    prompts = ["a red cube", "a blue cone next to a green sphere"]
    assert np.array_equal(synthetic_views(prompts, seed=4), synthetic_views(prompts, seed=4))


def test_dreamreward_smoke_raises_its_learned_reward(tmp_path: Path) -> None:
    cls = get_method("dreamreward")
    config = build_config(cls.config_class, cls.presets, {"preset": "smoke", "prompts": "a red cube", "eval_every": 0,
                                                           "threads": 1})
    records = train(cls(policy=load_policy(config.model), reward=get_reward(config.reward), config=config),
                    tmp_path / "run", progress=False)
    rewards = [r["reward_mean"] for r in records if "reward_mean" in r]
    assert len(rewards) >= 20 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards
    assert (tmp_path / "run" / "final" / "turntable.gif").exists()
