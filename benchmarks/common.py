"""Shared helpers for the benchmarks: timing with warm-up and medians, machine description, JSON output.

Timings on a shared CPU drift with the load of other processes, so comparisons are measured
*interleaved* (A, B, C, A, B, C, ...) and summarised by the median: a burst of load then slows every
contender of a round instead of one of them, and the ratios stay meaningful.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls of one function."""

    name: str
    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    def as_dict(self) -> dict:
        return {"name": self.name, "median_s": self.median, "min_s": self.best,
                "samples_s": list(self.samples)}


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7,
                     warmup: int = 2) -> dict[str, Timing]:
    """Time each function ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Warm-up absorbs one-off costs (lazy initialisation, allocator growth, first-call dispatch caches).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_once(fn))
    return {name: Timing(name, tuple(values)) for name, values in samples.items()}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", None)


def machine_description() -> dict:
    """What a reader needs to judge the numbers: CPU, cores, threads, load, library versions."""
    import torch

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
    }


def write_results(name: str, payload: dict, directory: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` to ``<directory>/<name>.json`` (the folder is created if needed)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def merge_results(path: Path, section: str, entries: dict, **fields: object) -> dict:
    """Add ``entries`` to ``path``'s ``section`` (a dict of named entries) and set ``fields``, read-modify-write
    under a file lock and replaced atomically, so that processes measuring in parallel all land."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        existing.setdefault(section, {}).update(entries)
        existing.update(fields)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(existing, indent=2, default=_jsonable) + "\n", encoding="utf-8")
        partial.replace(path)
    return existing


def _jsonable(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)  # type: ignore[arg-type]
    return str(value)


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain-text table with right-aligned columns (floats to 3 decimals)."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def print_timings_and_ratios(result: dict) -> None:
    """Print a result's median time per case and its ratios (the figures a ratio benchmark reports)."""
    rows = [[name, f"{t['median_s']:.3f}"] for name, t in result["timings"].items()]
    print(format_table(["case", "median s"], rows))
    print(format_table(["ratio", "value"], [[k, f"{v:.2f}"] for k, v in result["ratios"].items()]))
