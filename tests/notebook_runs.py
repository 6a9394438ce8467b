"""Executing a notebook in smoke mode and checking what it shows; shared by the two halves of the notebook tests."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat

from reference_impls.knowledge import notebooks as pipeline

NOTEBOOKS = pipeline.discover()
SMOKE_BUDGET_S = 90  # per notebook on 2 CPU cores


def run_in_smoke_mode(path: Path) -> None:
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
