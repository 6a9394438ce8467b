"""Every notebook: committed clean, parameterised, and executed by papermill in smoke mode.

Executed copies land in build/notebooks/, where the site build picks them up as pages.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import nbformat
import pytest

from reference_impls.knowledge import notebooks as pipeline

NOTEBOOKS = pipeline.discover()
SMOKE_BUDGET_S = 90  # per notebook on 2 CPU cores


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_clean_and_parameterised(path: Path):
    problems = pipeline.check_notebook(path)
    assert not problems, "\n".join(str(p) for p in problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path: Path):
    start = time.perf_counter()
    executed = pipeline.execute(path, smoke=True, seed=0, device="cpu", timeout_s=300)
    elapsed = time.perf_counter() - start
    notebook = nbformat.read(executed, as_version=4)
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} produced no plot: a notebook must show something computed"
    # The site page made from the executed copy carries its plots as image files.
    docs = executed.parent / f"{path.stem}-page"
    title, page = pipeline.render_page(path, docs / "notebooks", executed_dir=executed.parent)
    assert title and (docs / page).exists()
    assert list((docs / "notebooks" / f"{path.stem}_files").glob("*.png")), "the rendered page has no plots"
    assert "Executed at site build time" in (docs / page).read_text(encoding="utf-8")
    # Reported, not asserted: timing is a CI-time contract, printed for the log.
    print(f"{path.name}: {elapsed:.1f} s (budget {SMOKE_BUDGET_S} s)")


def _copy(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / path.name
    shutil.copy(path, target)
    return target


def test_missing_parameters_tag_is_reported_with_the_fix(tmp_path: Path):
    source = _copy(NOTEBOOKS[0], tmp_path)
    notebook = nbformat.read(source, as_version=4)
    for cell in notebook.cells:
        cell.get("metadata", {}).pop("tags", None)
    nbformat.write(notebook, source)
    problems = [str(p) for p in pipeline.check_notebook(source)]
    assert any(source.name in p and "tagged 'parameters'" in p and "Fix:" in p for p in problems), problems


def test_committed_outputs_are_reported_with_the_fix(tmp_path: Path):
    source = _copy(NOTEBOOKS[0], tmp_path)
    notebook = nbformat.read(source, as_version=4)
    code = next(c for c in notebook.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="left over\n")]
    code.execution_count = 3
    nbformat.write(notebook, source)
    problems = [str(p) for p in pipeline.check_notebook(source)]
    assert any(source.name in p and "outputs" in p and "--strip" in p for p in problems), problems
    pipeline.strip_outputs(source)
    assert pipeline.check_notebook(source) == []


def test_parameters_cell_must_define_smoke_device_seed(tmp_path: Path):
    source = _copy(NOTEBOOKS[0], tmp_path)
    notebook = nbformat.read(source, as_version=4)
    index = pipeline.parameters_cell_index(notebook)
    notebook.cells[index].source = "smoke = True\n"
    nbformat.write(notebook, source)
    problems = [str(p) for p in pipeline.check_notebook(source)]
    assert any("device, seed" in p for p in problems), problems


@pytest.mark.parametrize("chosen", [None, "3"])
def test_kernel_gets_one_torch_thread_unless_the_caller_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              chosen: str | None):
    # A kernel with a thread per core beside a test worker ran a notebook 2.5x slower (37 s against 15 s).
    import papermill

    seen = {}

    def fake_execute(source, output, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen["threads"] = os.environ.get("OMP_NUM_THREADS")
        shutil.copy(source, output)

    if chosen is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", chosen)
    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    pipeline.execute(NOTEBOOKS[0], output_dir=tmp_path)
    assert seen["threads"] == (chosen or "1")
    assert os.environ.get("OMP_NUM_THREADS") == chosen  # the caller's environment is left as it was


def test_the_scheduler_runs_each_notebook_execution_as_its_own_unit():
    """``make test`` spreads the executions over both workers by node id (conftest's ``ONE_BY_ONE``): renaming
    the test or its module would silently put all of them on one worker again."""
    from conftest import ONE_BY_ONE, _runs_one_by_one

    nodeid = f"tests/{Path(__file__).name}::{test_notebook_runs_in_smoke_mode.__name__}[{NOTEBOOKS[0].stem}]"
    assert _runs_one_by_one(nodeid), (nodeid, ONE_BY_ONE)
    assert not _runs_one_by_one(f"tests/{Path(__file__).name}::{test_there_are_notebooks.__name__}")
