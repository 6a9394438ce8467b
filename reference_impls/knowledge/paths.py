"""Where the project's data lives. ``RLVG_REPO_ROOT`` overrides the checkout location."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    override = os.environ.get("RLVG_REPO_ROOT")
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parents[2]


def bib_dir() -> Path:
    return repo_root() / "bib"


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def executed_notebooks_dir() -> Path:
    """Executed copies (papermill output); never committed."""
    return repo_root() / "build" / "notebooks"


def docs_dir() -> Path:
    return repo_root() / "docs"
