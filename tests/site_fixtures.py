"""Session fixtures for the site tests: one strict MkDocs build shared by test_site and test_browser.

Loaded from conftest.py through ``pytest_plugins`` so that both test modules get the same build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site with the repository's mkdocs.yml into a temporary directory; return that directory.

    ``--strict`` without ``-q``: with ``-q`` MkDocs exits 0 even when it has warnings, so the output is
    also searched for WARNING. Under pytest-xdist the workers of one run share a single build: whichever
    needs the site first builds it, the other waits on the lock and reads the same directory.
    """
    site_dir = _site_dir(tmp_path_factory)
    done = site_dir / ".built-by-this-test-run"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    # The build writes generated pages into docs/: parallel test workers must not build at the same time.
    import fcntl

    lock_path = REPO_ROOT / "build" / ".site-build.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if done.exists():
            return _finish(site_dir, start, "shared with the other worker")
        result = _build(site_dir, env)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"mkdocs build --strict failed (exit {result.returncode}):\n{output}"
        warnings = [line for line in output.splitlines() if "WARNING" in line]
        assert not warnings, "mkdocs build printed warnings:\n" + "\n".join(warnings)
        done.touch()
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    return _finish(site_dir, start, "built")


def _site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of this test run: per process, or under xdist the run's directory that all workers share."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each worker's base temp is <run dir>/popen-gwN; the run dir is new for every pytest invocation.
        shared = tmp_path_factory.getbasetemp().parent / "site"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("site")


def _build(site_dir: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(REPO_ROOT / "mkdocs.yml"),
            "-d",
            str(site_dir),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )


def _finish(site_dir: Path, start: float, how: str) -> Path:
    print(f"\nsite {how} in {time.perf_counter() - start:.1f} s: {site_dir}")
    return site_dir
