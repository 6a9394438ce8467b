"""The ShapeWorld reward is aligned with accuracy, tasks are GenEval-style, and paired comparisons are honest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference_impls.comparison import ModelScores, bootstrap_interval, compare_scores, per_prompt
from reference_impls.rewards import get_reward
from reference_impls.rewards.registry import accuracy_and_matched
from reference_impls.worlds import (
    EXTRA_OBJECT_COST,
    TASKS,
    PlacedObject,
    all_prompts,
    draw,
    evaluate,
    evaluate_batch,
    layout,
    matched_score,
    parse_prompt,
    prompt_split,
    prompt_task,
    render,
)


def _free_spot(objects: list[PlacedObject], extent: int, rng: np.random.Generator) -> tuple[int, int] | None:
    for _ in range(2000):
        y, x = (int(v) for v in rng.integers(1, 32 - extent, size=2))
        if all(x + extent + 2 <= o.x or o.x + o.extent + 2 <= x or y + extent + 2 <= o.y or o.y + o.extent + 2 <= y
               for o in objects):
            return y, x
    return None


def test_ground_truth_scores_one_for_every_prompt_form():
    prompts = all_prompts()
    rng = np.random.default_rng(0)
    images = np.stack([render(p, rng) for p in prompts])
    evaluations = evaluate_batch(images, prompts)
    assert all(e.correct and e.score == 1.0 for e in evaluations)
    assert {e.task for e in evaluations} == set(TASKS)


@pytest.mark.parametrize("seed", [0, 1])
def test_score_is_one_exactly_when_correct(seed):
    """On renders of other prompts and corrupted layouts, score == 1 if and only if the image is correct."""
    rng = np.random.default_rng(seed)
    prompts = all_prompts()
    asked = [prompts[i] for i in rng.integers(0, len(prompts), 300)]
    shown = [prompts[i] if rng.random() < 0.7 else asked[k] for k, i in enumerate(rng.integers(0, len(prompts), 300))]
    images = np.stack([render(p, rng) for p in shown])
    evaluations = evaluate_batch(images, asked)
    assert all((e.score == 1.0) == e.correct for e in evaluations)
    assert 0 < sum(e.correct for e in evaluations) < len(evaluations)


def test_an_extra_object_never_raises_the_score_and_costs_at_least_a_wrong_attribute():
    rng = np.random.default_rng(3)
    checked = 0
    for prompt in prompt_split("train")[::7]:
        objects = layout(prompt, rng)
        spot = _free_spot(objects, 8, rng)
        if spot is None:
            continue
        exact = evaluate(draw(objects), prompt)
        for colour, shape in (("red", "square"), ("blue", "circle"), ("yellow", "triangle")):
            extra = PlacedObject(colour, shape, spot[0], spot[1], 8, -1)
            sprayed = evaluate(draw([*objects, extra]), prompt)
            assert sprayed.score < exact.score == 1.0
            # one requested object drawn with a wrong shape instead of the extra object
            first = objects[0]
            wrong_shape = next(s for s in ("circle", "square", "triangle") if s != first.shape)
            wrong = PlacedObject(first.colour, wrong_shape, first.y, first.x, first.extent, first.phrase)
            one_wrong = evaluate(draw([wrong, *objects[1:]]), prompt)
            assert sprayed.score <= one_wrong.score + 1e-9
            # the same holds for the reward, half accuracy and half matched score (shapes-composition)
            assert accuracy_and_matched(sprayed) <= accuracy_and_matched(one_wrong) + 1e-9
            assert accuracy_and_matched(sprayed) < accuracy_and_matched(exact) == 1.0
            checked += 1
    assert checked > 50


def test_the_gameable_criteria_score_pays_for_extra_objects_and_the_matched_score_does_not():
    """The issue's example: for "a red circle", a red circle plus a red square against a lone red square."""
    circle = PlacedObject("red", "circle", 4, 4, 10, 0)
    square = PlacedObject("red", "square", 18, 18, 10, 0)
    sprayed = evaluate(draw([circle, square]), "a red circle")
    wrong = evaluate(draw([square]), "a red circle")
    assert sprayed.criteria_score == pytest.approx(2 / 3) and wrong.criteria_score == pytest.approx(1 / 3)
    assert sprayed.score == pytest.approx(1 - EXTRA_OBJECT_COST) and wrong.score == pytest.approx(0.5)
    assert sprayed.score <= wrong.score
    images = torch.from_numpy(np.stack([draw([circle, square]), draw([circle])])).permute(0, 3, 1, 2) / 255.0
    matched = get_reward("shapes-matched")(images, ["a red circle"] * 2)
    composition = get_reward("shapes-composition")(images, ["a red circle"] * 2)
    criteria = get_reward("shapes-criteria")(images, ["a red circle"] * 2)
    assert matched.tolist() == pytest.approx([0.5, 1.0]) and criteria.tolist() == pytest.approx([2 / 3, 1.0])
    # half of the reward is paid only for an exactly right image: the extra square leaves a quarter
    assert composition.tolist() == pytest.approx([0.25, 1.0])


def test_the_extra_object_cost_is_a_parameter_of_the_matched_score():
    """lambda = 1: for "a red circle", a red circle plus a red square earns the match (1 + lambda) minus two costs."""
    objects = evaluate(draw([PlacedObject("red", "circle", 4, 4, 10, 0),
                             PlacedObject("red", "square", 18, 18, 10, 0)]), "a red circle").objects
    assert matched_score(objects, "a red circle") == pytest.approx(1 - EXTRA_OBJECT_COST)
    assert matched_score(objects, "a red circle", extra_object_cost=1.0) == pytest.approx(0.0)
    assert matched_score(objects[:1], "a red circle", extra_object_cost=2.0) == pytest.approx(1.0)


def test_the_composition_reward_is_the_mean_of_accuracy_and_matched_score():
    """1 exactly when correct; a partly right image earns half its matched score."""
    rng = np.random.default_rng(4)
    prompts = ["two red circles", "a blue square left of a green triangle", "a red circle"]
    shown = [render(prompts[0], rng), render("a red circle", rng), render("a red square", rng)]
    images = torch.from_numpy(np.stack(shown)).permute(0, 3, 1, 2) / 255.0
    verdicts = evaluate_batch(np.stack(shown), prompts)
    blend = get_reward("shapes-composition")(images, prompts).tolist()
    assert blend[0] == pytest.approx(1.0) and verdicts[0].correct
    for value, verdict in zip(blend[1:], verdicts[1:]):
        assert not verdict.correct and value == pytest.approx(0.5 * verdict.score) and value < 0.5


def test_relation_counts_as_one_unit_of_the_matched_score():
    rng = np.random.default_rng(2)
    image = render("a red circle left of a blue square", rng)
    swapped = evaluate(image, "a red circle right of a blue square")
    assert not swapped.correct and swapped.score == pytest.approx(2 / 3)


@pytest.mark.parametrize(("prompt", "task"), [
    ("a red circle", "single_object"), ("a small red circle", "size"), ("two blue squares", "counting"),
    ("three big green triangles", "counting"), ("a red circle and a red square", "two_objects"),
    ("a red circle and two blue circles", "colors"), ("a red circle and a blue square", "color_attr"),
    ("a red circle above a blue square", "position"),
])
def test_prompt_forms_map_onto_geneval_tasks(prompt, task):
    assert prompt_task(prompt) == task
    assert prompt_task(parse_prompt(prompt)) == task


def test_aggregate_reports_per_task_accuracy_and_their_unweighted_mean():
    from reference_impls.worlds import aggregate

    rng = np.random.default_rng(0)
    prompts = ["a red circle", "two blue squares", "a red circle above a blue square", "a green square"]
    images = np.stack([render(p, rng) for p in prompts[:3]] + [render("a red circle", rng)])
    summary = aggregate(evaluate_batch(images, prompts))
    assert summary["task_single_object"] == 0.5 and summary["task_counting"] == 1.0
    assert summary["task_position"] == 1.0 and summary["accuracy"] == 0.75
    assert summary["task_mean"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)


# -- paired comparison ---------------------------------------------------------------------------------
def test_bootstrap_interval_of_identical_models_is_exactly_zero():
    values = np.random.default_rng(0).random(50)
    interval = bootstrap_interval(values, values[None], ["a"] * 50)
    assert (interval.diff, interval.low, interval.high) == (0.0, 0.0, 0.0) and not interval.significant


def test_bootstrap_interval_finds_a_consistent_gain_and_not_noise():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 200).astype(float)
    better = np.where(rng.random(200) < 0.3, 1.0, base)  # some failures fixed, nothing broken
    gain = bootstrap_interval(base, better[None], ["a"] * 100 + ["b"] * 100)
    assert gain.significant and gain.low > 0 and gain.diff == pytest.approx(better.mean() - base.mean())
    noise = np.where(rng.random(200) < 0.1, 1.0 - base, base)  # flips both ways
    flat = bootstrap_interval(base, noise[None], ["a"] * 200)
    assert flat.low < 0 < flat.high


def test_bootstrap_over_seeds_is_wider_when_seeds_disagree():
    rng = np.random.default_rng(2)
    base = rng.random(100)
    agree = np.stack([base + 0.1 for _ in range(3)])
    disagree = np.stack([base + 0.3, base - 0.1, base + 0.1])
    narrow = bootstrap_interval(base, agree, ["a"] * 100)
    wide = bootstrap_interval(base, disagree, ["a"] * 100)
    assert narrow.diff == pytest.approx(0.1) and wide.diff == pytest.approx(0.1)
    assert wide.high - wide.low > 5 * (narrow.high - narrow.low)


def test_compare_scores_averages_draws_per_prompt_and_reports_tasks():
    prompts = ["a red circle", "two blue squares", "a red circle above a blue square"]
    base = ModelScores(correct=np.array([0, 0, 1, 0, 0, 0.0]), score=np.array([0.5, 0.5, 1, 0.5, 0, 0.0]))
    model = ModelScores(correct=np.array([1, 1, 1, 1, 0, 0.0]), score=np.array([1, 1, 1, 1, 0, 0.0]))
    assert per_prompt(base.correct, 2).tolist() == [0.0, 0.5, 0.0]
    report = compare_scores(prompts, base, [model], samples_per_prompt=2, n_boot=200)
    assert report.rows["accuracy"].diff == pytest.approx(2 / 3 - 1 / 6)
    assert report.rows["task_single_object"].model == 1.0 and report.rows["task_counting"].diff == 0.5
    assert report.rows["task_position"].diff == 0.0
    assert report.rows["task_mean"].diff == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_paired_comparison_of_a_model_with_itself_shows_no_difference():
    from helpers import tiny_policy

    from reference_impls.comparison import compare_models
    from reference_impls.evaluation import default_eval_sampler

    policy = tiny_policy()
    prompts = ["a red circle", "two blue squares"]
    sampler = default_eval_sampler(policy, num_steps=3)
    report = compare_models(policy, [policy], prompts, sampler, samples_per_prompt=2, reward_name="jpeg-compressibility",
                            n_boot=100)
    assert all(row.diff == 0.0 for row in report.rows.values())
    assert report.rows["reward"].base < 0  # minus kB: the reward was computed


def test_random_control_reward_is_deterministic_noise_unrelated_to_the_image():
    reward = get_reward("random-control")
    images = torch.rand(400, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    values = reward(images, ["a red circle"] * 400)
    assert torch.equal(values, reward(images.clone(), ["a blue square"] * 400))  # a function of the pixels only
    assert bool(((values >= 0) & (values < 1)).all())
    assert abs(float(values.mean()) - 0.5) < 0.05 and abs(float(values.std()) - (1 / 12) ** 0.5) < 0.03
    # Not a smooth function of the image a model could climb: uncorrelated with brightness, and one grey level
    # on one pixel gives a new draw.
    brightness = images.flatten(1).mean(dim=1)
    assert abs(float(torch.corrcoef(torch.stack([values, brightness]))[0, 1])) < 0.15
    nudged = images[:1].clone()
    nudged[0, 0, 0, 0] = (nudged[0, 0, 0, 0] * 255).round().add(1 if nudged[0, 0, 0, 0] < 0.5 else -1) / 255
    assert float(reward(nudged, ["x"])) != float(values[0])
    assert reward(torch.rand(2, 3, 4, 8, 8), ["x", "y"]).shape == (2,)  # clips and views too
