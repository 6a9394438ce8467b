"""ShapeWorld: grammar, split, renderer and the exact evaluator agree with each other and reject junk."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from reference_impls.worlds import (
    COLOURS,
    PALETTE,
    SHAPES,
    ObjectSpec,
    PromptError,
    PromptSpec,
    aggregate,
    all_prompts,
    evaluate,
    evaluate_batch,
    parse_prompt,
    prompt_split,
    render,
    render_batch,
    sample_prompts,
)

N_PROMPTS = 834  # 108 single-phrase + 198 conjunctions + 528 relations
N_HELDOUT = 156  # pinned: the held-out split must never move


def _instances(text: str) -> Counter:
    """What objects a prompt asks for, ignoring size and relation."""
    return Counter({o.key: o.count for o in parse_prompt(text).objects})


def _derange(prompts: list[str], rng: np.random.Generator) -> list[str]:
    """For each prompt another prompt asking for different objects, so no render can satisfy both."""
    out = []
    for p in prompts:
        while True:
            q = prompts[int(rng.integers(len(prompts)))]
            if _instances(q) != _instances(p):
                out.append(q)
                break
    return out


# ---------------------------------------------------------------- grammar


def test_all_prompts_are_canonical_and_unique() -> None:
    prompts = all_prompts()
    assert len(prompts) == N_PROMPTS
    assert len(set(prompts)) == len(prompts)
    assert all(parse_prompt(p).text == p for p in prompts)
    assert prompts == all_prompts()  # deterministic order


def test_parse_is_case_and_whitespace_tolerant() -> None:
    assert parse_prompt("  A  Red\tCIRCLE. ").text == "a red circle"
    assert parse_prompt("one small green triangle").text == "a small green triangle"
    spec = parse_prompt("two blue squares")
    assert spec.objects == (ObjectSpec("blue", "square", 2, None),)
    # Conjunctions are unordered, so both orders are one spec; relations keep their direction.
    assert parse_prompt("a blue square and a red circle") == parse_prompt("a red circle and a blue square")
    rel = parse_prompt("a yellow triangle above a green circle")
    assert rel.relation == ("above", 0, 1)
    assert rel.text == "a yellow triangle above a green circle"


@pytest.mark.parametrize(
    ("text", "word"),
    [
        ("a purple circle", "purple"),
        ("a red hexagon", "hexagon"),
        ("four red circles", "four"),
        ("two red circle", "circle"),
        ("a red circles", "circles"),
        ("a red circle near a blue square", "near"),
        ("a small red circle and a blue square", "small"),
        ("two red circles left of a blue square", "two"),
        ("two red circles and two blue squares", "two"),
        ("a red circle and two red circles", "circles"),
        ("a red", "<end>"),
    ],
)
def test_parse_errors_name_the_bad_word(text: str, word: str) -> None:
    with pytest.raises(PromptError) as info:
        parse_prompt(text)
    assert isinstance(info.value, ValueError)
    assert info.value.word == word
    message = str(info.value)
    assert repr(word) in message
    assert all(w in message for w in (*COLOURS, *SHAPES, "left of", "above"))


def test_split_is_deterministic_disjoint_and_covering() -> None:
    train, heldout = prompt_split("train"), prompt_split("heldout")
    assert len(heldout) == N_HELDOUT
    assert 0.15 < len(heldout) / N_PROMPTS < 0.25
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(all_prompts())
    assert train == prompt_split("train") and heldout == prompt_split("heldout")
    easy = prompt_split("easy")
    assert easy and set(easy) <= set(train)
    assert all(parse_prompt(p).n_objects == 1 for p in easy)
    # Every word of the grammar is still seen in training.
    train_words = {w for p in train for w in p.split()}
    assert {*COLOURS, *SHAPES, "small", "big", "left", "right", "above", "below", "and"} <= train_words
    with pytest.raises(ValueError):
        prompt_split("test")


def test_sample_prompts_is_deterministic_and_stays_in_split() -> None:
    a = sample_prompts(50, "heldout", np.random.default_rng(3))
    assert a == sample_prompts(50, "heldout", np.random.default_rng(3))
    assert set(a) <= set(prompt_split("heldout"))


# ---------------------------------------------------------------- renderer


def test_render_is_deterministic_and_uses_only_world_colours() -> None:
    spec = parse_prompt("a red circle left of a blue square")
    a = render(spec, np.random.default_rng(7))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render(spec, np.random.default_rng(7)))
    assert not np.array_equal(a, render(spec, np.random.default_rng(8)))
    colours = {tuple(int(v) for v in c) for c in a.reshape(-1, 3)}
    assert colours == {(255, 255, 255), PALETTE["red"], PALETTE["blue"]}
    batch = render_batch(["a red circle", "three big yellow squares"], seed=1)
    assert batch.shape == (2, 32, 32, 3)
    assert np.array_equal(batch, render_batch(["a red circle", "three big yellow squares"], seed=1))


# ---------------------------------------------------------------- evaluator


def test_every_prompt_render_is_correct() -> None:
    prompts = all_prompts()
    evaluations = evaluate_batch(render_batch(prompts, seed=0), prompts)
    wrong = [(e.prompt, e.criteria) for e in evaluations if not e.correct]
    assert not wrong, wrong[:5]
    assert aggregate(evaluations)["accuracy"] == 1.0


@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_renders_are_correct_for_other_seeds(seed: int) -> None:
    prompts = sample_prompts(300, "all", np.random.default_rng(seed))
    evaluations = evaluate_batch(render_batch(prompts, seed=seed), prompts)
    assert all(e.correct and e.score == 1.0 for e in evaluations)


def test_uniform_noise_is_not_correct() -> None:
    rng = np.random.default_rng(0)
    prompts = sample_prompts(300, "all", rng)
    summary = aggregate(evaluate_batch(rng.random((300, 32, 32, 3)), prompts))
    assert summary["accuracy"] < 0.10  # measured 0.0
    assert summary["mean_score"] < 0.10  # measured ~0.0003
    blank = np.ones((32, 32, 3))
    assert not evaluate(blank, "a red circle").correct


def test_renders_of_a_different_prompt_are_not_correct() -> None:
    rng = np.random.default_rng(1)
    prompts = sample_prompts(400, "all", rng)
    summary = aggregate(evaluate_batch(render_batch(prompts, seed=1), _derange(prompts, rng)))
    assert summary["accuracy"] < 0.10  # measured 0.0
    assert summary["mean_score"] < 0.5


def test_relation_fails_when_objects_are_swapped() -> None:
    rng = np.random.default_rng(2)
    for relation, opposite in (("left of", "right of"), ("above", "below")):
        for _ in range(10):
            image = render(f"a red circle {relation} a blue square", rng)
            ok = evaluate(image, f"a red circle {relation} a blue square")
            swapped = evaluate(image, f"a blue square {relation} a red circle")
            opposed = evaluate(image, f"a red circle {opposite} a blue square")
            assert ok.correct
            for bad in (swapped, opposed):
                assert not bad.correct and not bad.criteria["relation"]
                assert bad.criteria["count"] and bad.criteria["colour"] and bad.criteria["shape"]
                assert bad.criteria_score == pytest.approx(0.75)
                assert bad.score == pytest.approx(2 / 3)  # both objects matched, the relation unit lost


def test_count_fails_with_an_extra_object() -> None:
    rng = np.random.default_rng(3)
    for _ in range(10):
        extra_other = evaluate(render("a red circle and a blue square", rng), "a red circle")
        assert extra_other.criteria == {"count": False, "colour": True, "shape": True}
        extra_same = evaluate(render("two red circles", rng), "a red circle")
        assert not extra_same.correct and not extra_same.criteria["count"]
        missing = evaluate(render("two green triangles", rng), "three green triangles")
        assert not missing.correct and not missing.criteria["count"]


def test_size_and_shape_criteria() -> None:
    rng = np.random.default_rng(4)
    small = render("a small red circle", rng)
    assert evaluate(small, "a small red circle").correct
    assert evaluate(small, "a red circle").correct  # no size word: any size will do
    wrong_size = evaluate(small, "a big red circle")
    assert wrong_size.criteria == {"count": True, "colour": True, "shape": True, "size": False}
    wrong_shape = evaluate(render("a red triangle", rng), "a red square")
    assert wrong_shape.criteria == {"count": False, "colour": True, "shape": False}


def test_a_flood_of_colour_is_not_an_object() -> None:
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[...] = PALETTE["red"]
    result = evaluate(image, "a big red square")
    assert not result.correct
    assert [o.shape for o in result.objects] == ["unknown"]


def test_noisy_and_blurred_renders_are_still_parsed() -> None:
    rng = np.random.default_rng(5)
    prompts = sample_prompts(400, "all", rng)
    clean = render_batch(prompts, seed=5).astype(np.float32) / 255.0
    noisy = clean + rng.normal(0.0, 0.05, clean.shape)
    blurred = ndimage.gaussian_filter(clean, sigma=(0, 0.5, 0.5, 0)) + rng.normal(0.0, 0.05, clean.shape)
    for images in (noisy, blurred):
        accuracy = aggregate(evaluate_batch(np.clip(images, 0.0, 1.0), prompts))["accuracy"]
        assert accuracy >= 0.95  # measured 1.00 for both (sigma 0.05 noise; blur sigma 0.5 px + noise)


def test_layouts_and_dtypes_agree() -> None:
    prompts = sample_prompts(16, "all", np.random.default_rng(6))
    images = render_batch(prompts, seed=6)
    as_float_nchw = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    a, b = evaluate_batch(images, prompts), evaluate_batch(as_float_nchw, prompts)
    assert [e.criteria for e in a] == [e.criteria for e in b]
    assert evaluate(as_float_nchw[0], prompts[0]) == b[0]
    spec = PromptSpec((ObjectSpec("green", "square"),))
    assert evaluate(render(spec, np.random.default_rng(0)), spec).correct
    with pytest.raises(ValueError):
        evaluate_batch(images, prompts[:-1])


def test_aggregate_reports_each_criterion() -> None:
    prompts = ["a red circle", "a small blue square", "a red circle left of a blue square"]
    summary = aggregate(evaluate_batch(render_batch(prompts, seed=0), prompts))
    assert summary["n"] == 3 and summary["accuracy"] == 1.0 and summary["mean_score"] == 1.0
    assert {"count", "colour", "shape", "size", "relation"} <= set(summary)


def test_evaluator_is_fast() -> None:
    prompts = sample_prompts(256, "all", np.random.default_rng(7))
    images = render_batch(prompts, seed=7)
    evaluate_batch(images, prompts)  # warm caches
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        evaluate_batch(images, prompts)
        best = min(best, time.perf_counter() - start)
    assert best < 1.0  # measured ~0.05-0.1 s for 256 images of 32x32 on a shared CPU


def test_task_splits_partition_the_training_prompts():
    from reference_impls.worlds.evaluate import TASKS, prompt_task
    from reference_impls.worlds.grammar import prompt_split

    train = prompt_split("train")
    parts = {task: prompt_split(f"train-{task}") for task in TASKS}
    assert sorted(p for part in parts.values() for p in part) == sorted(train)
    assert all(prompt_task(p) == task for task, part in parts.items() for p in part)
    assert not set(parts["position"]) & set(prompt_split("heldout"))
    with pytest.raises(ValueError, match="train-position"):
        prompt_split("train-layout")
