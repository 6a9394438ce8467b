"""The odd-numbered half of the notebooks, executed by papermill in smoke mode (the even half: test_notebooks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from notebook_runs import NOTEBOOKS, run_in_smoke_mode


@pytest.mark.parametrize("path", NOTEBOOKS[1::2], ids=[p.stem for p in NOTEBOOKS[1::2]])
def test_notebook_runs_in_smoke_mode(path: Path):
    run_in_smoke_mode(path)
