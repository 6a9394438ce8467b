"""SolidWorld: the grammar and split, the renderer, and an evaluator that is exact on ground truth and
catches what a generator gets wrong (shape, colour, size, relation, extra objects, views that disagree)."""

from __future__ import annotations

import numpy as np
import pytest

from reference_impls.worlds import solid
from reference_impls.worlds.registry import get_world
from reference_impls.worlds.solid import (
    PlacedSolid,
    SolidPromptError,
    evaluate_views,
    layout_scene,
    parse_solid_prompt,
    render_scenes,
    render_views,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_grammar_canonical_text_and_errors() -> None:
    spec = parse_solid_prompt("A Yellow cone on top of a large green cylinder")
    assert spec.text == "a yellow cone on top of a large green cylinder" and spec.task == "on_top"
    assert parse_solid_prompt("a small red sphere").objects[0].radius == solid.SIZES_3D["small"]
    with pytest.raises(SolidPromptError, match="different colours"):
        parse_solid_prompt("a red cube next to a red sphere")
    with pytest.raises(SolidPromptError, match="can carry"):
        parse_solid_prompt("a red cube on top of a blue sphere")
    with pytest.raises(SolidPromptError, match="cube, sphere, cone, cylinder"):
        parse_solid_prompt("a red pyramid")


def test_split_is_stable_disjoint_and_about_a_fifth() -> None:
    everything = solid.solid_prompt_split("all")
    heldout, train = set(solid.solid_prompt_split("heldout")), set(solid.solid_prompt_split("train"))
    assert len(everything) == 2640 and not heldout & train and heldout | train == set(everything)
    assert 0.15 < len(heldout) / len(everything) < 0.25
    assert all(parse_solid_prompt(p).relation is None for p in solid.solid_prompt_split("easy"))
    assert sorted(heldout)[:3] == sorted(p for p in everything if solid.is_heldout_solid(p))[:3]


def test_registry_knows_the_solid_world() -> None:
    world = get_world("solid")
    assert world.modality == "multiview" and world.tasks == solid.TASKS
    assert world.canonical("A red cube") == "a red cube"


def _sample_prompts() -> list[str]:
    prompts = solid.solid_prompt_split("all")
    return list(prompts[::97]) + ["a small yellow cone on top of a red cylinder", "a small green cone next to a red cone"]


def test_ground_truth_views_are_judged_correct() -> None:
    prompts = _sample_prompts()
    for seed in (0, 1):
        views = render_views(prompts, seed=seed)
        assert views.shape == (len(prompts), 4, 32, 32, 3) and views.dtype == np.uint8
        verdicts = evaluate_views(views, prompts)
        wrong = [(v.prompt, v.criteria) for v in verdicts if not v.correct]
        assert not wrong
        assert all(v.score == 1.0 for v in verdicts)
    assert {v.task for v in verdicts} == set(solid.TASKS)
    metrics = solid.aggregate_solid(verdicts)
    assert metrics["accuracy"] == 1.0 and metrics["task_mean"] == 1.0


def test_rendering_is_deterministic() -> None:
    a = render_views(["a red cube next to a blue sphere"], seed=3)
    b = render_views(["a red cube next to a blue sphere"], seed=3)
    assert np.array_equal(a, b)


def test_tracing_only_live_rays_shows_what_tracing_every_ray_shows() -> None:
    prompts = solid.solid_prompt_split("heldout")[::40]
    scenes = [layout_scene(p, np.random.default_rng([5, i])) for i, p in enumerate(prompts)]
    owners = render_scenes(scenes)[1]
    assert (owners >= 0).any() and (owners == -1).any()
    scene = solid._scene_tensors(scenes)
    origins, directions, scene_of_point, grid = solid._rays(len(scenes), solid.DEFAULT_SIZE)
    points, hit = solid._march_every_ray(origins, directions, scene_of_point, scene)
    every_ray_owners = solid._object_distances(points, scene_of_point, scene).argmin(dim=-1)
    every_ray_owners[~hit] = -1
    assert np.array_equal(owners, every_ray_owners.view(grid).numpy())


def _views(scene: list[PlacedSolid]) -> np.ndarray:
    return render_scenes([scene])[0]


def test_wrong_shape_colour_size_and_relation_are_caught() -> None:
    sphere = PlacedSolid("red", "sphere", 0.0, 0.0, 0.0, 0.4)
    verdict = evaluate_views(_views([sphere]), ["a red cube"])[0]
    assert not verdict.criteria["appearance"] and verdict.score == pytest.approx(2 / 3)
    verdict = evaluate_views(_views([sphere]), ["a blue sphere"])[0]
    assert verdict.score == 0.0 and not verdict.correct
    verdict = evaluate_views(_views([PlacedSolid("red", "sphere", 0.0, 0.0, 0.0, 0.5)]), ["a small red sphere"])[0]
    assert not verdict.correct and verdict.score == pytest.approx(3 / 4)
    side_by_side = layout_scene("a red cube next to a blue cylinder", np.random.default_rng(0))
    verdict = evaluate_views(_views(side_by_side), ["a red cube on top of a blue cylinder"])[0]
    assert verdict.criteria == {"appearance": True, "count": True, "consistency": True, "relation": False}
    assert verdict.score == pytest.approx(2 / 3)


def test_extra_objects_and_empty_views_cost() -> None:
    scene = [PlacedSolid("red", "cube", -0.5, 0.0, 0.0, 0.3), PlacedSolid("blue", "cone", 0.5, 0.0, 0.0, 0.3)]
    verdict = evaluate_views(_views(scene), ["a red cube"])[0]
    assert not verdict.criteria["count"] and verdict.score == pytest.approx(0.5)
    blank = np.full((1, 4, 32, 32, 3), 255, dtype=np.uint8)
    verdict = evaluate_views(blank, ["a red cube"])[0]
    assert verdict.score == 0.0 and not verdict.criteria["appearance"]


def test_a_colour_seen_only_as_specks_is_noise_not_an_object() -> None:
    """A colour of 6+ pixels whose pieces are all under the blob size (a stochastic sampler's leftover noise)
    is not an object: it neither costs nor counts (it once counted as minus one extra object, which lifted a
    score above 1)."""
    views = _views([PlacedSolid("red", "cube", 0.0, 0.0, 0.0, 0.4)])
    blue = np.array(solid.PALETTE["blue"], dtype=np.uint8)
    for view, (row, col) in enumerate([(2, 2), (2, 29), (29, 2), (29, 29)]):
        views[0, view, row, col] = blue  # pairs of pixels in the corners: 8 in all, no blob of 3
        views[0, view, row, col - 1 if col > 2 else col + 1] = blue
    verdict = evaluate_views(views, ["a red cube"])[0]
    assert [obj.colour for obj in verdict.objects] == ["red"]
    assert verdict.correct and verdict.score == 1.0
    # A real second object (a blob) still costs.
    views[0, :, 12:15, 2:5] = blue
    verdict = evaluate_views(views, ["a red cube"])[0]
    assert [obj.colour for obj in verdict.objects] == ["red", "blue"] and not verdict.correct


def test_views_that_do_not_describe_one_object_are_inconsistent() -> None:
    """Each view from a different scene: every view holds a red cube, but no 3D layout explains them all."""
    positions = [(-0.6, 0.0, 0.6), (0.6, 0.0, 0.6), (0.0, 0.7, 0.0), (0.6, 0.0, -0.6)]
    per_view = [_views([PlacedSolid("red", "cube", x, y, z, 0.4)])[0, k] for k, (x, y, z) in enumerate(positions)]
    verdict = evaluate_views(np.stack(per_view)[None], ["a red cube"])[0]
    assert not verdict.criteria["consistency"] and not verdict.correct
    consistent = evaluate_views(_views([PlacedSolid("red", "cube", 0.3, 0.0, -0.2, 0.4)]), ["a red cube"])[0]
    assert consistent.correct


def test_bad_input_names_the_expected_shape() -> None:
    with pytest.raises(ValueError, match=r"\(N, 4, H, W, 3\)"):
        evaluate_views(np.zeros((2, 32, 32, 3), dtype=np.uint8), ["a red cube"] * 2)
