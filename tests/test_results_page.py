"""The Results page and the per-method "Measured in the atlas" sections come from benchmark JSON only."""

from __future__ import annotations

from pathlib import Path

import pytest

from reference_impls.knowledge import results_page, sitegen
from reference_impls.knowledge.catalog import load_catalog


def _cell(base: float, model: float, low: float, high: float, n: int = 156) -> dict:
    return {"base": base, "model": model, "diff": model - base, "ci_low": low, "ci_high": high, "n_prompts": n,
            "significant": low > 0 or high < 0}


ROW = {
    "method": "ddpo", "bib_key": "black2023ddpo", "model": "shapes-diffusion", "reward": "shapes-composition",
    "seeds": [0, 1, 2], "minutes_per_run": 9.5, "samples_seen": 640, "steps": 20,
    "heldout": {"accuracy": _cell(0.2, 0.3, 0.05, 0.15), "mean_score": _cell(0.5, 0.52, -0.01, 0.05),
                "task_counting": _cell(0.3, 0.5, 0.1, 0.3, 19), "task_mean": _cell(0.2, 0.3, 0.02, 0.2)},
    "train_reward": _cell(0.4, 0.45, 0.01, 0.09, 128),
    "per_seed": [{"seed": s, "accuracy": _cell(0.2, 0.3, 0.0 + s / 100, 0.2), "train_wall_s": 570.0,
                  "curve": [{"samples_seen": 0, "accuracy": 0.2}, {"samples_seen": 640, "accuracy": 0.3}]}
                 for s in range(3)],
    "command": "rlvg train ddpo --preset cpu --reward shapes-composition --seed S",
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
    assert "0.200 → 0.300" in page and "+0.100 [+0.050, +0.150]" in page and "**up**" in page
    assert "no effect" in page  # the matched score's interval covers 0
    assert ROW["command"] in page and "test cpu" in page and "seed 2:" in page


def test_rows_sharing_a_page_stay_in_one_table(fake_results: dict[str, dict]) -> None:
    """DDPO and DDPO-SF share a page: the per-seed lines and the grid go below the table, not between its rows."""
    second = {**ROW, "method": "ddpo-sf", "command": "rlvg train ddpo-sf --preset cpu --seed S"}
    fake_results["methods"] = {"rows": {"ddpo": {**ROW, "grid": "grids/ddpo.png"}, "ddpo-sf": second}}
    lines = _page("black2023ddpo").splitlines()
    first_row = next(i for i, line in enumerate(lines) if line.startswith(f"| `{ROW['command']}`"))
    assert lines[first_row + 1].startswith(f"| `{second['command']}`")
    assert lines[first_row - 1].startswith("|---")
    below = "\n".join(lines[first_row + 2:])
    assert "`ddpo-sf` on `shapes-diffusion`" in below and "seed 2:" in below and "grids/ddpo.png" in below


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
    assert "Not yet measured with this protocol: ddpo-sf" in page
    assert "counting (n=19)" in page and "0.30 → 0.50" in page


def test_rows_of_the_old_single_batch_schema_are_not_shown(fake_results: dict[str, dict]) -> None:
    fake_results["methods"] = {"rows": {"ddpo": {"method": "ddpo", "bib_key": "black2023ddpo",
                                                 "heldout_accuracy_before": 0.1, "heldout_accuracy_after": 0.2}}}
    assert "Not measured yet" in results_page.results_page()


def test_write_draws_the_curves_figure_and_removes_it_without_data(fake_results: dict[str, dict],
                                                                         tmp_path: Path) -> None:
    fake_results["methods"] = {"machine": {}, "rows": {"ddpo": ROW}}
    results_page.write(tmp_path)
    figure = tmp_path / results_page.CURVES
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({results_page.CURVES})" in (tmp_path / results_page.PAGE).read_text(encoding="utf-8")
    fake_results.clear()
    results_page.write(tmp_path)
    assert not figure.exists() and "Not measured yet" in (tmp_path / results_page.PAGE).read_text(encoding="utf-8")


def test_variant_rows_are_shown_with_their_change(fake_results: dict[str, dict]) -> None:
    assert "Not measured yet" in results_page._variants_section()
    fake_results["method_variants"] = {"machine": {}, "rows": {"ddpo min_step_std=0.3": dict(
        ROW, variant={"of": "ddpo", "settings": {"min_step_std": 0.3}})}}
    section = results_page._variants_section()
    assert "| ddpo with `min_step_std=0.3` | 0.200 → 0.300 | +0.100 [+0.050, +0.150] | **up** |" in section


def test_overoptimisation_section_tabulates_and_draws_each_learning_rate(fake_results: dict[str, dict],
                                                                         tmp_path: Path) -> None:
    assert "python -m benchmarks.overoptimisation" in results_page.results_page()
    assert "Not measured yet" in results_page._overoptimisation_section()
    curve = [{"step": s, "samples_seen": 16 * s, "kl": 3.0 * s, "proxy_reward": 0.5 + 0.01 * s,
              "accuracy": 0.3 - 0.001 * s, "mean_score": 0.6 - 0.002 * s} for s in (0, 10, 20)]
    fake_results["overoptimisation"] = {"machine": {}, "seed": 0,
                                        "runs": [{"learning_rate": 1e-4, "curve": curve},
                                                 {"learning_rate": 1e-3, "curve": curve}]}
    section = results_page._overoptimisation_section()
    assert "| 0.001 | 20 | 320 | 60 | 0.700 | 0.280 | 0.560 |" in section and "Not measured yet" not in section
    results_page.write(tmp_path)
    figure = tmp_path / results_page.OVEROPTIMISATION
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({results_page.OVEROPTIMISATION})" in (tmp_path / results_page.PAGE).read_text(encoding="utf-8")
    fake_results.clear()
    results_page.write(tmp_path)
    assert not figure.exists()


def test_notebooks_show_the_committed_measurement_or_say_it_is_missing(tmp_path: Path, monkeypatch, capsys) -> None:
    import json

    import matplotlib

    matplotlib.use("Agg")
    from reference_impls import notebook_helpers
    from reference_impls.knowledge import paths

    monkeypatch.setattr(paths, "repo_root", lambda: tmp_path)
    assert notebook_helpers.show_measured("ddpo") is None
    assert "has not been measured" in capsys.readouterr().out
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "methods.json").write_text(json.dumps({"rows": {"ddpo": ROW}}), encoding="utf-8")
    figure = notebook_helpers.show_measured("ddpo")
    out = capsys.readouterr().out
    assert figure is not None and "+0.100, 95% CI [+0.050, +0.150] (up" in out


def test_rows_under_a_renamed_key_link_the_current_page():
    from reference_impls.knowledge import results_page

    data = {"rows": {"d3po": {"method": "d3po", "bib_key": "yang2024d3po", "heldout": {}}}}
    assert [row["bib_key"] for row in results_page._measured_rows(data)] == ["yang2023d3po"]


def test_method_table_overrides_parse_to_typed_settings_and_label_the_variant() -> None:
    from benchmarks.method_table import _settings, parse_overrides, variant_label

    overrides = parse_overrides(["min_step_std=0.3", "prompts=train-position", "train-last-step=true"])
    assert overrides == {"min_step_std": 0.3, "prompts": "train-position", "train_last_step": True}
    assert variant_label("ddpo", {}) == "ddpo"
    assert variant_label("ddpo", {"min_step_std": 0.3}) == "ddpo min_step_std=0.3"
    assert _settings("ddpo", False, {"min_step_std": 0.3})["min_step_std"] == 0.3
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["min_step_std"])


def test_reuse_refuses_a_run_trained_with_other_settings(tmp_path) -> None:
    """After a preset changes, a run folder kept from the old preset must not be merged as today's setting."""
    import dataclasses
    import json

    from benchmarks.method_table import METHODS, _settings, build_config, run_seed

    cls = METHODS["ddpo-sf"]
    config = build_config(cls.config_class, cls.presets, {**_settings("ddpo-sf", False), "seed": 0})
    run_dir = tmp_path / "ddpo-sf" / "seed0"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "scores.json").write_text(json.dumps({"seed": 0, "marker": "reused"}), encoding="utf-8")
    saved = {**dataclasses.asdict(config), "method": "ddpo-sf", "threads": 2}  # threads do not change training
    (run_dir / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    assert run_seed("ddpo-sf", 0, tmp_path, quick=False, reuse=True)["marker"] == "reused"
    saved.update(steps=20, learning_rate=5e-5)
    (run_dir / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(ValueError, match=r"learning_rate: run 5e-05, asked 0\.001.*steps: run 20, asked 300"):
        run_seed("ddpo-sf", 0, tmp_path, quick=False, reuse=True)


def test_results_are_merged_entry_by_entry_and_replaced_atomically(tmp_path):
    from benchmarks.common import merge_results

    path = tmp_path / "results.json"
    merge_results(path, "rows", {"a": {"x": 1}}, machine="m1")
    merge_results(path, "rows", {"b": {"x": 2}}, machine="m2")
    merged = merge_results(path, "rows", {"a": {"x": 3}})
    assert merged == {"rows": {"a": {"x": 3}, "b": {"x": 2}}, "machine": "m2"}
    assert not path.with_suffix(".partial").exists()


def _command_settings(command: str) -> tuple[str, dict]:
    """(method, settings) of a row's ``rlvg train METHOD --flag value ... --seed S`` command."""
    import shlex

    from benchmarks.method_table import parse_overrides

    words = shlex.split(command)
    assert words[:2] == ["rlvg", "train"], command
    pairs = [f"{flag[2:]}={value}" for flag, value in zip(words[3::2], words[4::2]) if flag != "--seed"]
    return words[2], parse_overrides(pairs)


@pytest.mark.parametrize("table", ["methods", "method_variants"])
def test_every_committed_row_command_gives_the_budget_it_was_measured_with(table: str) -> None:
    """A preset whose budget changes without its rows being relabelled would leave stale rows behind."""
    import json

    from benchmarks.common import RESULTS_DIR
    from reference_impls.algorithms import METHODS
    from reference_impls.training import build_config

    rows = json.loads((RESULTS_DIR / f"{table}.json").read_text(encoding="utf-8"))["rows"]
    assert rows
    for key, row in rows.items():
        name, settings = _command_settings(row["command"])
        cls = METHODS[name]
        config = build_config(cls.config_class, cls.presets, settings, cls.video_presets)
        assert config.steps == row["steps"], f"{table}.json row {key!r}: its command now trains {config.steps} steps"
        assert row["samples_seen"] in (config.steps * config.batch_size, 2 * config.steps * config.batch_size), key
