"""The Results page and the per-method "Measured in the atlas" sections come from benchmark JSON only."""

from __future__ import annotations

from pathlib import Path

import pytest

from reference_impls.knowledge import results_page, sitegen
from reference_impls.knowledge.catalog import load_catalog

ROW = {
    "method": "ddpo", "bib_key": "black2023ddpo", "model": "shapes-diffusion", "reward": "shapes-composition",
    "steps": 16, "samples_seen": 256, "train_wall_s": 123.4, "s_per_step": 7.7, "reward_first": 0.25,
    "reward_last": 0.375, "heldout_accuracy_before": 0.0859, "heldout_accuracy_after": 0.1211,
    "heldout_score_before": 0.3288, "heldout_score_after": 0.3512, "heldout_prompts": 256,
    "command": "rlvg train ddpo --preset cpu --reward shapes-composition --model shapes-diffusion",
}


@pytest.fixture
def fake_results(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    tables: dict[str, dict] = {}
    monkeypatch.setattr(results_page, "_load", lambda name: tables.get(name))
    return tables


def _page(key: str) -> str:
    catalog = load_catalog()
    entry = next(e for e in catalog.entries if e.key == key)
    return sitegen.method_page(catalog, entry, Path("docs"))


def test_method_page_shows_its_measured_row(fake_results: dict[str, dict]) -> None:
    fake_results["methods"] = {"machine": {"cpu_model": "test cpu", "logical_cores": 2}, "rows": {"ddpo": ROW}}
    page = _page("black2023ddpo")
    assert "## Measured in the atlas" in page
    assert "0.086 → 0.121" in page and "0.329 → 0.351" in page
    assert ROW["command"] in page and "test cpu" in page


def test_unmeasured_implemented_method_says_so(fake_results: dict[str, dict]) -> None:
    page = _page("black2023ddpo")
    assert "Not measured yet" in page and "Measured in the atlas" not in page


def test_catalogued_only_method_has_no_measurement_section(fake_results: dict[str, dict]) -> None:
    fake_results["methods"] = {"rows": {"ddpo": ROW}}
    catalog = load_catalog()
    entry = next(e for e in catalog.entries if not e.implemented and e.family == "grpo")
    page = sitegen.method_page(catalog, entry, Path("docs"))
    assert "Measured in the atlas" not in page and "Not measured yet" not in page


def test_results_page_labels_missing_benchmarks(fake_results: dict[str, dict]) -> None:
    fake_results["methods"] = {"machine": {}, "rows": {"ddpo": ROW}}
    page = results_page.results_page()
    assert "[ddpo](methods/black2023ddpo.md)" in page
    assert "python -m benchmarks.grpo_step_cost" in page and "Not measured yet" in page


def test_write_draws_the_before_after_figure_and_removes_it_without_data(fake_results: dict[str, dict],
                                                                         tmp_path: Path) -> None:
    fake_results["methods"] = {"machine": {}, "rows": {"ddpo": ROW}}
    results_page.write(tmp_path)
    figure = tmp_path / results_page.FIGURE
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({results_page.FIGURE})" in (tmp_path / results_page.PAGE).read_text(encoding="utf-8")
    fake_results.clear()
    results_page.write(tmp_path)
    assert not figure.exists() and "Not measured yet" in (tmp_path / results_page.PAGE).read_text(encoding="utf-8")
